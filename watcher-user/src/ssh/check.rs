//! What can be wrong on the remote side of an ssh target, from ssh's own words, and the
//! script the start-up check runs there.

/// Why the remote side of an ssh target cannot be used, from ssh's own words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// No connection: refused, timed out, no route, unknown name.
    #[error("ssh {host}: cannot reach the host: {detail}")]
    Unreachable { host: String, detail: String },
    /// The host's key is in no known_hosts file.
    #[error(
        "ssh {host}: the host key is not known (add it to the known_hosts file, e.g. from ssh-keyscan after checking its fingerprint; the daemon never accepts one on its own): {detail}"
    )]
    HostKeyUnknown { host: String, detail: String },
    /// The host presented a key other than the known one.
    #[error(
        "ssh {host}: the host key does not match the known one (a reinstalled host, or someone in between): {detail}"
    )]
    HostKeyChanged { host: String, detail: String },
    /// The server refused every key offered.
    #[error(
        "ssh {host}: authentication refused (is the daemon's key in the remote authorized_keys?): {detail}"
    )]
    AuthRefused { host: String, detail: String },
    /// No rsync on the remote side.
    #[error("ssh {host}: no rsync on the remote side (install rsync 3.1.3 or later there)")]
    NoRemoteRsync { host: String },
    /// The remote rsync lacks what every run relies on.
    #[error("ssh {host}: the remote rsync is version {version}; 3.1.3 or later is needed")]
    RemoteRsyncTooOld { host: String, version: String },
    /// The target directory (or, when it does not exist yet, its parent) takes no new file.
    #[error("ssh {host}: cannot write to the target path {path:?} (checked in {dir:?})")]
    NotWritable {
        host: String,
        path: String,
        dir: String,
    },
    /// ssh could not be started.
    #[error("ssh {host}: cannot run {program}: {detail}")]
    Spawn {
        host: String,
        program: String,
        detail: String,
    },
    /// No answer in time.
    #[error("ssh {host}: no answer within {secs} s")]
    Timeout { host: String, secs: u64 },
    /// Anything else ssh or the remote shell said.
    #[error("ssh {host}: {detail}")]
    Other { host: String, detail: String },
}

impl CheckError {
    /// Whether the daemon must not start with this target: retrying cannot help until
    /// someone changes a key, a known_hosts file or the remote host. An unreachable host
    /// may come back: its target is retried like any target that is down.
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            CheckError::Unreachable { .. } | CheckError::Timeout { .. } | CheckError::Other { .. }
        )
    }
}

/// What ssh's stderr says went wrong, if it is one of the failures ssh itself reports.
pub fn diagnose(host: &str, stderr: &str) -> Option<CheckError> {
    let detail = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("rsync") && !l.starts_with('@'))
        .collect::<Vec<_>>()
        .join("; ");
    let host = host.to_owned();
    let has = |needle: &str| stderr.contains(needle);
    if has("REMOTE HOST IDENTIFICATION HAS CHANGED") || has("Host key for") && has("has changed") {
        Some(CheckError::HostKeyChanged { host, detail })
    } else if has("Host key verification failed") || has("No ") && has("host key is known") {
        Some(CheckError::HostKeyUnknown { host, detail })
    } else if has("Permission denied (") || has("Too many authentication failures") {
        Some(CheckError::AuthRefused { host, detail })
    } else if has("Connection refused")
        || has("Connection timed out")
        || has("No route to host")
        || has("Network is unreachable")
        || has("Could not resolve hostname")
        || has("Connection closed by")
        || has("Connection reset by")
        || has("kex_exchange_identification")
    {
        Some(CheckError::Unreachable { host, detail })
    } else {
        None
    }
}

/// What the start-up check found on the remote side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteInfo {
    pub rsync_version: String,
}

/// Run on the remote side by [`super::Link::check`], with the target path as `$1`: prints the
/// rsync version line and whether a file can be made where rsync will write.
pub(super) const CHECK_SCRIPT: &str = r#"v=$(rsync --version 2>/dev/null | head -n 1)
printf 'rsync:%s\n' "$v"
d=$1
[ -n "$d" ] || d=.
[ -d "$d" ] || d=$(dirname -- "$d")
t="$d/.watcher-check.$$"
if ( : > "$t" ) 2>/dev/null; then rm -f -- "$t"; echo 'writable:yes'; else echo 'writable:no'; fi
"#;

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::process::Command;

    use super::*;
    use crate::ssh::quote::remote_command;
    use crate::ssh::tests::hostile;

    /// The check script takes the path as `$1`: hostile names are tested for writability,
    /// not run.
    #[test]
    fn check_script_handles_hostile_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in hostile() {
            if name.is_empty() || name.as_bytes().contains(&b'/') {
                continue;
            }
            let target = dir.path().join(&name);
            for exists in [false, true] {
                if exists {
                    std::fs::create_dir_all(&target).expect("mkdir");
                }
                let line = remote_command(&[
                    OsStr::new("sh"),
                    OsStr::new("-c"),
                    OsStr::new(CHECK_SCRIPT),
                    OsStr::new("watcher-check"),
                    target.as_os_str(),
                ]);
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(&line)
                    .current_dir(dir.path())
                    .output()
                    .expect("sh");
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(stdout.contains("writable:yes"), "{name:?}: {stdout}");
                assert!(stdout.contains("rsync:rsync"), "{name:?}: {stdout}");
            }
        }
        assert!(!dir.path().join("pwned").exists(), "a name was run");
        let entries: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().as_bytes().starts_with(b".watcher-check"))
            .collect();
        assert!(entries.is_empty(), "check files left behind");
    }

    #[test]
    fn ssh_failures_are_named() {
        let h = "root@127.0.0.1 port 2222";
        type Is = fn(&CheckError) -> bool;
        let table: &[(&str, Is)] = &[
            (
                "ssh: connect to host 127.0.0.1 port 2222: Connection refused\r\nrsync: connection unexpectedly closed",
                |e| matches!(e, CheckError::Unreachable { .. }),
            ),
            (
                "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\r\nHost key verification failed.",
                |e| matches!(e, CheckError::HostKeyUnknown { .. }),
            ),
            (
                "@@@@@@@@@@@\r\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\nHost key verification failed.",
                |e| matches!(e, CheckError::HostKeyChanged { .. }),
            ),
            ("root@127.0.0.1: Permission denied (publickey).", |e| {
                matches!(e, CheckError::AuthRefused { .. })
            }),
        ];
        for (stderr, is) in table {
            let e = diagnose(h, stderr).expect(stderr);
            assert!(is(&e), "{stderr}: {e:?}");
            assert!(
                e.to_string().starts_with("ssh root@127.0.0.1 port 2222: "),
                "{e}"
            );
        }
        assert!(diagnose(h, "rsync: some other error").is_none());
        assert!(
            !CheckError::Unreachable {
                host: h.into(),
                detail: String::new()
            }
            .is_fatal()
        );
    }
}
