//! ssh targets (`[user@]host:path`): one OpenSSH connection per target, reused.
//!
//! Without help every rsync run over ssh opens a connection of its own: a full handshake
//! and authentication per lone change, and one auth-log and wtmp entry each. Here each ssh
//! target gets a [`Link`]: an OpenSSH master connection (`ControlMaster=auto`,
//! `ControlPersist`) whose control socket lives in a directory of the daemon's own (mode
//! 0700, owned by the daemon's user), under a name derived from the group, the target and
//! the ssh command, so two targets never share one. Every rsync run (`rsync -e 'ssh -o
//! ControlPath=...'`) and every remote command of the target rides that connection; the
//! first one to find no master becomes it, so a connection lost to an outage is made again
//! by the target's next retry, on the target's backoff. A control socket whose master died
//! is removed before the next run, and [`Link::close`] ends the master on exit.
//!
//! The user's ssh settings are kept: the command comes from the target's `ssh` key, else
//! from an `-e`/`--rsh` in its rsync arguments, else from `RSYNC_RSH`, else `ssh`; the
//! control options go first (ssh takes the first value it sees for an option, so they
//! win), then the user's options, then defaults the daemon needs but a user may override
//! (`BatchMode=yes`: never prompt; `ConnectTimeout`; keepalives that notice a dead peer).
//! Host keys are checked as ssh always does: an unknown host is refused, never accepted.
//!
//! - `quote`: the `-e` string rsync splits, and commands for the remote shell;
//! - `check`: what ssh's failures mean, and the remote side's start-up check.

mod check;
pub(crate) mod quote;

pub use check::{CheckError, RemoteInfo, diagnose};
pub use quote::{join_rsh, remote_command, sh_quote, split_rsh, take_rsh};

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Longest control path: the 104 bytes of the smallest `sun_path` (BSDs; Linux has 108),
/// less the 17 bytes of the temporary name OpenSSH binds before renaming it into place,
/// less the terminating NUL.
pub const MAX_CONTROL_PATH: usize = 104 - 17 - 1;

/// How long a start-up check or a remote command may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The control options, first on the command line so that they win.
const CONTROL_OPTIONS: [&str; 2] = ["ControlMaster=auto", "ControlPersist=yes"];

/// Defaults for options a user may set otherwise (theirs come first and win).
const DEFAULT_OPTIONS: [&str; 4] = [
    // A daemon has nobody to type a password or accept a host key.
    "BatchMode=yes",
    "ConnectTimeout=10",
    // A master whose peer vanished without a word notices within 45 s.
    "ServerAliveInterval=15",
    "ServerAliveCountMax=3",
];

/// The parts of an ssh destination, `[user@]host:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// `[user@]host` as ssh takes it (an IPv6 address without its brackets).
    pub host: OsString,
    /// The path on the remote side (relative paths start at the login directory).
    pub path: OsString,
}

impl Remote {
    /// The ssh form of an rsync destination: a `:` before the first `/`, not `::` (an rsync
    /// daemon) and not `rsync://`; `[addr]:path` for IPv6. None for any other form.
    pub fn parse(spec: &OsStr) -> Option<Remote> {
        let b = spec.as_bytes();
        if b.starts_with(b"rsync://") {
            return None;
        }
        let colon = match b.iter().position(|&c| c == b'[') {
            // user@[v6addr]:path
            Some(open) if b[..open].iter().all(|&c| c != b':' && c != b'/') => {
                let close = open + b[open..].iter().position(|&c| c == b']')?;
                (b.get(close + 1) == Some(&b':')).then_some(close + 1)?
            }
            _ => b.iter().position(|&c| c == b':')?,
        };
        if b[..colon].contains(&b'/') || b.get(colon + 1) == Some(&b':') || colon == 0 {
            return None;
        }
        let host: Vec<u8> = b[..colon]
            .iter()
            .copied()
            .filter(|&c| c != b'[' && c != b']')
            .collect();
        Some(Remote {
            host: OsString::from_vec(host),
            path: OsStr::from_bytes(&b[colon + 1..]).to_owned(),
        })
    }
}

/// An ssh target cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The control directory cannot be made or is not private.
    #[error("ssh control directory {}: {why}", .dir.display())]
    ControlDir { dir: PathBuf, why: String },
    /// The control socket's path is too long for a unix socket address.
    #[error(
        "ssh control path {} is {len} bytes, more than the {MAX_CONTROL_PATH} a unix socket takes: put the status socket in a shorter directory",
        .path.display()
    )]
    ControlPathTooLong { path: PathBuf, len: usize },
    /// The ssh command is empty (`ssh = []`, `-e ''`).
    #[error("the ssh command for {host} is empty")]
    EmptyCommand { host: String },
}

/// The port given in ssh options (`-p N`, `-pN`, `-o Port=N`), for messages.
fn port_in(args: &[OsString]) -> Option<String> {
    let mut it = args.iter().map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        if a == "-p" {
            return it.next().map(|p| p.into_owned());
        }
        if let Some(p) = a.strip_prefix("-p") {
            return Some(p.to_owned());
        }
        let option = if a == "-o" {
            it.next().map(|o| o.into_owned())
        } else {
            a.strip_prefix("-o").map(str::to_owned)
        };
        if let Some(o) = option
            && let Some(p) = o.strip_prefix("Port=").or_else(|| o.strip_prefix("port="))
        {
            return Some(p.to_owned());
        }
    }
    None
}

/// 64-bit FNV-1a: stable across builds, so a restarted daemon finds its own master.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(&[0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The directory for control sockets: `ssh/` next to the status socket.
pub fn control_dir(status_socket: &Path) -> PathBuf {
    status_socket.parent().unwrap_or(Path::new("/")).join("ssh")
}

/// Makes `dir` (mode 0700) if missing, and refuses it unless it is a directory of this
/// user's that nobody else can enter: a control socket is a logged-in session.
pub fn ensure_control_dir(dir: &Path) -> Result<(), SshError> {
    let fail = |why: String| SshError::ControlDir {
        dir: dir.to_path_buf(),
        why,
    };
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| fail(format!("creating its parent: {e}")))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(format!("creating it: {e}"))),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| fail(e.to_string()))?;
    if !meta.is_dir() {
        return Err(fail("not a directory (a symlink?)".into()));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(fail(format!(
            "owned by uid {}, not by the daemon's uid {euid}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(format!("making it private: {e}")))?;
    }
    Ok(())
}

/// Which master a control socket belongs to: a new master binds a new socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MasterId {
    pub dev: u64,
    pub ino: u64,
    /// When its socket was made (the master's connection time), ms since the epoch.
    pub born_unix_ms: u64,
}

/// The connection of one target as the daemon saw it, for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// A master answers on the control socket.
    pub up: bool,
    /// Since when it has been up (or down), ms since the epoch; None before the first look.
    pub since_unix_ms: Option<u64>,
    /// Masters made after the first: connections lost and made again.
    pub reconnects: u64,
}

/// Tracks a target's master from what its control socket shows. Pure.
#[derive(Debug, Clone, Default)]
pub struct LinkState {
    status: LinkStatus,
    master: Option<MasterId>,
    /// A master has been seen since start.
    seen_any: bool,
}

impl LinkState {
    /// Takes in one look at the control socket: the master answering there, if any.
    pub fn observe(&mut self, seen: Option<MasterId>, now_unix_ms: u64) {
        match seen {
            Some(id) if self.master != Some(id) => {
                if self.seen_any {
                    self.status.reconnects += 1;
                }
                self.seen_any = true;
                self.master = Some(id);
                self.status.up = true;
                self.status.since_unix_ms = Some(id.born_unix_ms.min(now_unix_ms));
            }
            Some(_) => {}
            None => {
                if self.status.up || self.status.since_unix_ms.is_none() {
                    self.status.since_unix_ms = Some(now_unix_ms);
                }
                self.status.up = false;
                self.master = None;
            }
        }
    }

    pub fn status(&self) -> LinkStatus {
        self.status
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One ssh target's connection: the ssh command that rides its master, the master's
/// control socket, and what the daemon saw of it.
#[derive(Debug)]
pub struct Link {
    remote: Remote,
    /// The whole ssh command: program, control options, the user's options, defaults.
    argv: Vec<OsString>,
    control_path: PathBuf,
    /// `user@host` and the port when one is given, for messages.
    label: String,
    state: Mutex<(LinkState, Option<Instant>)>,
}

impl Link {
    /// The link of the target `target` of group `group` if `dest` is an ssh destination.
    /// `ssh` is the target's ssh command (empty: none given), `rsync_args` its rsync
    /// arguments (an `-e` there is the ssh command otherwise).
    pub fn new(
        control_dir: &Path,
        group: &str,
        target: &str,
        dest: &OsStr,
        ssh: &[OsString],
        rsync_args: &[OsString],
    ) -> Result<Option<Link>, SshError> {
        let Some(remote) = Remote::parse(dest) else {
            return Ok(None);
        };
        let user: Vec<OsString> = if !ssh.is_empty() {
            ssh.to_vec()
        } else if let Some(rsh) = take_rsh(&mut rsync_args.to_vec()) {
            split_rsh(&rsh)
        } else if let Some(rsh) = std::env::var_os("RSYNC_RSH").filter(|r| !r.is_empty()) {
            split_rsh(&rsh)
        } else {
            vec!["ssh".into()]
        };
        let mut label = remote.host.to_string_lossy().into_owned();
        let Some((program, options)) = user.split_first() else {
            return Err(SshError::EmptyCommand { host: label });
        };
        if let Some(port) = port_in(options) {
            label.push_str(&format!(" port {port}"));
        }
        let mut parts: Vec<&[u8]> = vec![group.as_bytes(), target.as_bytes(), dest.as_bytes()];
        parts.extend(user.iter().map(|a| a.as_bytes()));
        let control_path = control_dir.join(format!("{:016x}", fnv1a(&parts)));
        let len = control_path.as_os_str().len();
        if len > MAX_CONTROL_PATH {
            return Err(SshError::ControlPathTooLong {
                path: control_path,
                len,
            });
        }
        // ssh expands %-tokens in ControlPath and splits option values at spaces.
        let mut path_option = OsString::from("ControlPath=");
        path_option.push(OsStr::from_bytes(
            &control_path
                .as_os_str()
                .as_bytes()
                .iter()
                .flat_map(|&c| if c == b'%' { vec![b'%', b'%'] } else { vec![c] })
                .collect::<Vec<u8>>(),
        ));
        if control_path.as_os_str().as_bytes().contains(&b' ') {
            return Err(SshError::ControlDir {
                dir: control_dir.to_path_buf(),
                why: "its path holds a space, which ssh's ControlPath option cannot carry".into(),
            });
        }
        let mut argv = vec![program.clone(), "-o".into(), path_option];
        for o in CONTROL_OPTIONS {
            argv.extend(["-o".into(), o.into()]);
        }
        argv.extend(options.iter().cloned());
        for o in DEFAULT_OPTIONS {
            argv.extend(["-o".into(), o.into()]);
        }
        Ok(Some(Link {
            remote,
            argv,
            control_path,
            label,
            state: Mutex::new((LinkState::default(), None)),
        }))
    }

    /// `user@host` (and the port, when one is given), for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn control_path(&self) -> &Path {
        &self.control_path
    }

    /// The ssh command every run and remote command of this target uses.
    pub fn ssh_argv(&self) -> &[OsString] {
        &self.argv
    }

    /// `rsync_args` with the user's remote shell replaced by this link's (`-e`, as one
    /// string rsync splits itself).
    pub fn rsync_args(&self, rsync_args: &[OsString]) -> Vec<OsString> {
        let mut args = rsync_args.to_vec();
        take_rsh(&mut args);
        args.push("-e".into());
        args.push(join_rsh(&self.argv));
        args
    }

    /// The path of the replica on the remote side, as the destination gives it.
    pub fn remote_path(&self) -> &OsStr {
        &self.remote.path
    }

    /// Runs `words` on the remote side over this connection; its stdout when it exits 0.
    pub fn run(&self, words: &[&OsStr], timeout: Duration) -> Result<String, String> {
        match output_within(self.command(words), timeout) {
            Ok((Some(0), stdout, _)) => Ok(stdout),
            Ok((code, _, stderr)) => Err(format!(
                "{}: {}",
                code.map_or("killed".to_string(), |c| format!("exit {c}")),
                stderr.trim()
            )),
            Err(RunError::Spawn(e)) => Err(format!("cannot run ssh: {e}")),
            Err(RunError::Timeout) => Err(format!("no answer within {}s", timeout.as_secs())),
        }
    }

    /// A command running `words` on the remote side over this target's connection.
    pub fn command(&self, words: &[&OsStr]) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .arg("--")
            .arg(&self.remote.host)
            .arg(remote_command(words));
        cmd
    }

    /// Asks the master: `ssh -O check|exit`.
    fn control(&self, op: &str) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .args(["-O", op, "--"])
            .arg(&self.remote.host);
        cmd
    }

    /// Checks the remote side, making the master connection on the way: the host answers,
    /// its key is known, the key is accepted, rsync is there and recent enough, and the
    /// target path takes a new file.
    pub fn check(&self, timeout: Duration) -> Result<RemoteInfo, CheckError> {
        self.clean_stale();
        let cmd = self.command(&[
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new(check::CHECK_SCRIPT),
            OsStr::new("watcher-check"),
            &self.remote.path,
        ]);
        let result = output_within(cmd, timeout);
        self.observe();
        let host = self.label.clone();
        let (code, stdout, stderr) = match result {
            Ok(out) => out,
            Err(RunError::Spawn(e)) => {
                return Err(CheckError::Spawn {
                    host,
                    program: self.argv[0].to_string_lossy().into_owned(),
                    detail: e.to_string(),
                });
            }
            Err(RunError::Timeout) => {
                return Err(CheckError::Timeout {
                    host,
                    secs: timeout.as_secs(),
                });
            }
        };
        if code != Some(0) {
            return Err(
                diagnose(&host, &stderr).unwrap_or_else(|| CheckError::Other {
                    host,
                    detail: match stderr.trim() {
                        "" => format!("ssh exited with {code:?} and said nothing"),
                        said => format!("ssh exited with {code:?}: {said}"),
                    },
                }),
            );
        }
        let line = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::to_owned)
        };
        let version = line("rsync:")
            .and_then(|v| crate::rsync::version_in(&v))
            .ok_or_else(|| CheckError::NoRemoteRsync { host: host.clone() })?;
        if !crate::rsync::recent_enough(&version) {
            return Err(CheckError::RemoteRsyncTooOld { host, version });
        }
        match line("writable:").as_deref() {
            Some("yes") => Ok(RemoteInfo {
                rsync_version: version,
            }),
            Some(_) => Err(CheckError::NotWritable {
                host,
                path: self.remote.path.to_string_lossy().into_owned(),
                dir: "the path, or its parent if it does not exist".into(),
            }),
            None => Err(CheckError::Other {
                host,
                detail: format!(
                    "the remote shell printed no check result: {}",
                    stdout.trim()
                ),
            }),
        }
    }

    /// The master answering on the control socket, if any. A socket nobody answers on (its
    /// master was killed) is removed, so the next run makes a new master instead of failing.
    fn master(&self) -> Option<MasterId> {
        let meta = std::fs::symlink_metadata(&self.control_path).ok()?;
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return None;
        }
        match std::os::unix::net::UnixStream::connect(&self.control_path) {
            Ok(_) => Some(MasterId {
                dev: meta.dev(),
                ino: meta.ino(),
                born_unix_ms: u64::try_from(meta.mtime())
                    .unwrap_or(0)
                    .saturating_mul(1000)
                    .saturating_add(u64::try_from(meta.mtime_nsec() / 1_000_000).unwrap_or(0)),
            }),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                // Only if it is still the dead one (a new master may have just replaced it).
                if std::fs::symlink_metadata(&self.control_path)
                    .is_ok_and(|m| m.ino() == meta.ino() && m.dev() == meta.dev())
                {
                    tracing::info!(host = %self.label, path = %self.control_path.display(),
                        "removing the control socket of a dead ssh master");
                    let _ = std::fs::remove_file(&self.control_path);
                }
                None
            }
            Err(_) => None,
        }
    }

    /// Removes the control socket of a dead master.
    pub fn clean_stale(&self) {
        self.master();
    }

    /// Looks at the control socket and updates the link's status.
    pub fn observe(&self) {
        let seen = self.master();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = state.0.status();
        state.0.observe(seen, unix_ms(SystemTime::now()));
        state.1 = Some(Instant::now());
        let after = state.0.status();
        if before.up != after.up || before.reconnects != after.reconnects {
            if after.up {
                tracing::info!(host = %self.label, reconnects = after.reconnects, "ssh connection up");
            } else if before.since_unix_ms.is_some() {
                tracing::warn!(host = %self.label, "ssh connection down");
            }
        }
    }

    /// Like [`observe`](Self::observe), at most once per `every`.
    pub fn observe_every(&self, every: Duration) {
        let due = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.1.is_none_or(|at| at.elapsed() >= every)
        };
        if due {
            self.observe();
        }
    }

    pub fn status(&self) -> LinkStatus {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .status()
    }

    /// Ends the master connection (`ssh -O exit`), if one is up.
    pub fn close(&self) {
        if self.master().is_none() {
            return;
        }
        match output_within(self.control("exit"), Duration::from_secs(10)) {
            Ok((Some(0), _, _)) => {
                tracing::debug!(host = %self.label, "ssh connection closed")
            }
            Ok((_, _, stderr)) => {
                tracing::warn!(host = %self.label, "closing the ssh connection: {}", stderr.trim())
            }
            Err(_) => tracing::warn!(host = %self.label, "closing the ssh connection failed"),
        }
    }
}

/// An ssh target of the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("sync group {group}: target {target}: {source}")]
    Setup {
        group: String,
        target: String,
        #[source]
        source: SshError,
    },
    #[error("sync group {group}: target {target}: {source}")]
    Check {
        group: String,
        target: String,
        #[source]
        source: Box<CheckError>,
    },
}

/// The links of every ssh target of a configuration, by group and target name.
#[derive(Debug, Default)]
pub struct Links(Vec<(String, String, std::sync::Arc<Link>)>);

impl Links {
    /// Makes a link for every ssh target in `targets` (group, target, dest, ssh command,
    /// rsync arguments) with control sockets in `control_dir`, and checks their remote
    /// sides, all at once. A failure retrying cannot fix (host key, authentication, rsync,
    /// a path that takes no file) is an error; an unreachable host is logged and its
    /// target retried like any other that is down.
    pub fn start<'a>(
        control_dir: &Path,
        targets: impl IntoIterator<Item = (&'a str, &'a str, &'a OsStr, &'a [OsString], Vec<OsString>)>,
    ) -> Result<Links, LinkError> {
        let mut links = Vec::new();
        for (group, target, dest, ssh, rsync_args) in targets {
            let setup = |source| LinkError::Setup {
                group: group.to_owned(),
                target: target.to_owned(),
                source,
            };
            if let Some(link) =
                Link::new(control_dir, group, target, dest, ssh, &rsync_args).map_err(setup)?
            {
                links.push((
                    group.to_owned(),
                    target.to_owned(),
                    std::sync::Arc::new(link),
                ));
            }
        }
        if links.is_empty() {
            return Ok(Links(links));
        }
        ensure_control_dir(control_dir).map_err(|source| LinkError::Setup {
            group: links[0].0.clone(),
            target: links[0].1.clone(),
            source,
        })?;
        let results: Vec<Result<RemoteInfo, CheckError>> = std::thread::scope(|s| {
            let handles: Vec<_> = links
                .iter()
                .map(|(_, _, link)| s.spawn(|| link.check(CHECK_TIMEOUT)))
                .collect();
            handles
                .into_iter()
                .zip(&links)
                .map(|(h, (_, _, link))| {
                    h.join().unwrap_or_else(|_| {
                        Err(CheckError::Other {
                            host: link.label.clone(),
                            detail: "the check panicked".into(),
                        })
                    })
                })
                .collect()
        });
        for ((group, target, link), result) in links.iter().zip(results) {
            match result {
                Ok(info) => tracing::info!(group = %group, target = %target, host = %link.label,
                    rsync = %info.rsync_version, control = %link.control_path.display(),
                    "ssh target checked; its runs share one connection"),
                Err(e) if e.is_fatal() => {
                    return Err(LinkError::Check {
                        group: group.clone(),
                        target: target.clone(),
                        source: Box::new(e),
                    });
                }
                Err(e) => tracing::warn!(group = %group, target = %target,
                    "{e}; the target is retried with backoff"),
            }
        }
        Ok(Links(links))
    }

    /// The link of one target, if it is an ssh target.
    pub fn get(&self, group: &str, target: &str) -> Option<std::sync::Arc<Link>> {
        self.0
            .iter()
            .find(|(g, t, _)| g == group && t == target)
            .map(|(_, _, l)| l.clone())
    }

    /// Closes every master not also in `keep` (same control socket).
    pub fn close_except(&self, keep: &Links) {
        for (_, _, link) in &self.0 {
            if !keep
                .0
                .iter()
                .any(|(_, _, k)| k.control_path == link.control_path)
            {
                link.close();
            }
        }
    }
}

enum RunError {
    Spawn(std::io::Error),
    Timeout,
}

/// Runs `cmd` with no stdin and collects its exit code and output; kills it after `timeout`.
fn output_within(
    mut cmd: Command,
    timeout: Duration,
) -> Result<(Option<i32>, String, String), RunError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RunError::Spawn)?;
    // Read both pipes on threads: a master forked by this ssh holds no copy of them, so
    // they end when ssh exits.
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunError::Timeout);
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok((status.code(), stdout, stderr))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn os(s: &str) -> OsString {
        s.into()
    }

    /// Names that break naive quoting, option parsing, line-based parsing or UTF-8.
    pub(crate) fn hostile() -> Vec<OsString> {
        let mut v: Vec<OsString> = [
            "plain",
            "with space",
            "it's",
            "''",
            "\"double\"",
            "new\nline",
            "$HOME",
            "$(touch pwned)",
            "`touch pwned`",
            "-rf",
            "--help",
            "back\\slash",
            "semi;colon&amp|pipe>gt<lt",
            "*glob?[a]",
            "tab\there",
            "~tilde",
            "",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        v.push(OsString::from_vec(b"latin1-\xe9\xff".to_vec()));
        v
    }

    #[test]
    fn ssh_destinations_are_told_from_the_others() {
        let table: &[(&str, Option<(&str, &str)>)] = &[
            ("host:/srv/replica", Some(("host", "/srv/replica"))),
            ("root@127.0.0.1:/srv/r", Some(("root@127.0.0.1", "/srv/r"))),
            ("user@host:relative", Some(("user@host", "relative"))),
            ("host:", Some(("host", ""))),
            ("[::1]:/srv", Some(("::1", "/srv"))),
            ("u@[fe80::1]:/a:b", Some(("u@fe80::1", "/a:b"))),
            ("host:/with: colon", Some(("host", "/with: colon"))),
            ("host::module", None),
            ("user@host::module/sub", None),
            ("rsync://host/mod", None),
            ("/local/dir", None),
            ("./a:b", None),
            (":nothing", None),
        ];
        for (spec, want) in table {
            let got = Remote::parse(OsStr::new(spec));
            let want = want.map(|(h, p)| Remote {
                host: h.into(),
                path: p.into(),
            });
            assert_eq!(got, want, "{spec}");
        }
    }

    #[test]
    fn link_command_puts_control_options_first_and_defaults_last() {
        let dir = Path::new("/run/watcher/ssh");
        let user = [
            os("ssh"),
            os("-p"),
            os("2222"),
            os("-o"),
            os("BatchMode=no"),
        ];
        let link = Link::new(dir, "g", "t", OsStr::new("root@h:/r"), &user, &[])
            .expect("link")
            .expect("ssh");
        let argv: Vec<String> = link
            .ssh_argv()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let path = link.control_path().display().to_string();
        assert!(
            path.starts_with("/run/watcher/ssh/") && path.len() == 17 + 16,
            "{path}"
        );
        assert_eq!(
            argv[..7],
            [
                "ssh".to_owned(),
                "-o".into(),
                format!("ControlPath={path}"),
                "-o".into(),
                "ControlMaster=auto".into(),
                "-o".into(),
                "ControlPersist=yes".into()
            ]
        );
        assert_eq!(argv[7..12], ["-p", "2222", "-o", "BatchMode=no", "-o"]);
        assert_eq!(argv[12], "BatchMode=yes");
        assert_eq!(link.label(), "root@h port 2222");
        // rsync gets the same words back from -e.
        let args = link.rsync_args(&[os("-z"), os("--rsh=ssh -p 1")]);
        assert_eq!(args[..2], [os("-z"), os("-e")]);
        assert_eq!(split_rsh(&args[2]), link.ssh_argv());
    }

    #[test]
    fn control_paths_differ_between_targets_and_fit_a_socket_address() {
        let dir = Path::new("/run/watcher/ssh");
        let path = |g: &str, t: &str, dest: &str, rsh: &[&str]| {
            let args: Vec<OsString> = rsh.iter().map(|a| os(a)).collect();
            Link::new(dir, g, t, OsStr::new(dest), &[], &args)
                .expect("link")
                .expect("ssh")
                .control_path()
                .to_path_buf()
        };
        let a = path("g", "t", "h:/r", &[]);
        assert_eq!(a, path("g", "t", "h:/r", &[]));
        assert_ne!(a, path("g", "t2", "h:/r", &[]));
        assert_ne!(a, path("g2", "t", "h:/r", &[]));
        assert_ne!(a, path("g", "t", "h:/r2", &[]));
        assert_ne!(a, path("g", "t", "h:/r", &["--rsh=ssh -p 2"]));
        // Group and target names are separated, not concatenated.
        assert_ne!(path("ab", "c", "h:/r", &[]), path("a", "bc", "h:/r", &[]));
        let long = Path::new("/run").join("x".repeat(80));
        assert!(matches!(
            Link::new(&long, "g", "t", OsStr::new("h:/r"), &[], &[]),
            Err(SshError::ControlPathTooLong { .. })
        ));
        assert!(
            Link::new(dir, "g", "t", OsStr::new("h::mod"), &[], &[])
                .expect("not ssh")
                .is_none()
        );
    }

    #[test]
    fn control_dir_is_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("run/ssh");
        ensure_control_dir(&dir).expect("made");
        let mode = std::fs::metadata(&dir).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_control_dir(&dir).expect("made private again");
        assert_eq!(std::fs::metadata(&dir).expect("stat").mode() & 0o777, 0o700);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).expect("symlink");
        assert!(ensure_control_dir(&link).is_err(), "a symlink is refused");
    }

    #[test]
    fn link_state_counts_reconnects() {
        let id = |ino, born| MasterId {
            dev: 1,
            ino,
            born_unix_ms: born,
        };
        let mut s = LinkState::default();
        assert_eq!(s.status(), LinkStatus::default());
        s.observe(None, 100);
        assert_eq!(
            s.status(),
            LinkStatus {
                up: false,
                since_unix_ms: Some(100),
                reconnects: 0
            }
        );
        s.observe(Some(id(7, 150)), 200);
        assert_eq!((s.status().up, s.status().since_unix_ms), (true, Some(150)));
        s.observe(Some(id(7, 150)), 300);
        assert_eq!(s.status().reconnects, 0);
        s.observe(None, 400);
        s.observe(None, 500);
        assert_eq!(
            (s.status().up, s.status().since_unix_ms),
            (false, Some(400))
        );
        s.observe(Some(id(8, 550)), 600);
        assert_eq!(
            s.status(),
            LinkStatus {
                up: true,
                since_unix_ms: Some(550),
                reconnects: 1
            }
        );
        // A new master with no gap seen in between is a reconnect too.
        s.observe(Some(id(9, 650)), 700);
        assert_eq!(s.status().reconnects, 2);
    }
}
