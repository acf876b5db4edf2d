//! Where a replica lives: a local directory, an rsync daemon module or an ssh path.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A replica destination as rsync understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A directory on this machine (absolute, canonical).
    Local(PathBuf),
    /// `host::module[/path]`, `rsync://[user@]host[:port]/module[/path]` or `[user@]host:/path`,
    /// passed to rsync unchanged.
    Remote(OsString),
}

/// A target that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("target is empty")]
    Empty,
    #[error("target {0:?} starts with '-' and would be read as an rsync option")]
    LooksLikeOption(OsString),
    #[error("cannot create or open local target {path}: {source}")]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "target {target} lies inside source {source_root}: the daemon would copy its own copies"
    )]
    InsideSource {
        target: PathBuf,
        source_root: PathBuf,
    },
    #[error(
        "source {source_root} lies inside target {target}: syncing with --delete would remove the source"
    )]
    ContainsSource {
        target: PathBuf,
        source_root: PathBuf,
    },
}

impl Target {
    /// Parses a destination the way rsync does: `rsync://`, `::` or a `:` before the first
    /// `/` make it remote; anything else is a local directory, created if missing.
    pub fn parse(spec: &OsStr) -> Result<Target, TargetError> {
        let bytes = spec.as_bytes();
        if bytes.is_empty() {
            return Err(TargetError::Empty);
        }
        if bytes[0] == b'-' {
            return Err(TargetError::LooksLikeOption(spec.to_owned()));
        }
        let first_slash = bytes.iter().position(|&b| b == b'/').unwrap_or(bytes.len());
        let remote = bytes.starts_with(b"rsync://") || bytes[..first_slash].contains(&b':');
        if remote {
            return Ok(Target::Remote(spec.to_owned()));
        }
        let path = Path::new(spec);
        std::fs::create_dir_all(path)
            .and_then(|()| path.canonicalize())
            .map(Target::Local)
            .map_err(|source| TargetError::Local {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Refuses a local target that overlaps `source` (canonical) in either direction.
    pub fn check_overlap(&self, source: &Path) -> Result<(), TargetError> {
        let Target::Local(target) = self else {
            return Ok(());
        };
        if target.starts_with(source) {
            return Err(TargetError::InsideSource {
                target: target.clone(),
                source_root: source.to_path_buf(),
            });
        }
        if source.starts_with(target) {
            return Err(TargetError::ContainsSource {
                target: target.clone(),
                source_root: source.to_path_buf(),
            });
        }
        Ok(())
    }

    /// The destination argument for rsync: the directory itself, with a trailing slash.
    pub fn rsync_arg(&self) -> OsString {
        let mut arg = match self {
            Target::Local(p) => p.as_os_str().to_owned(),
            Target::Remote(s) => s.clone(),
        };
        if !arg.as_bytes().ends_with(b"/") {
            arg.push("/");
        }
        arg
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Local(p) => write!(f, "{}", p.display()),
            Target::Remote(s) => write!(f, "{}", s.to_string_lossy()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_forms_are_passed_through() {
        for spec in [
            "host::module",
            "user@host::module/sub",
            "rsync://user@127.0.0.1:8730/mod/",
            "host:/srv/replica",
            "user@host:relative",
        ] {
            let t = Target::parse(OsStr::new(spec)).expect(spec);
            assert_eq!(t, Target::Remote(spec.into()), "{spec}");
        }
    }

    #[test]
    fn local_target_is_created_and_canonical() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = dir.path().join("a/b/../c");
        let t = Target::parse(spec.as_os_str()).expect("local");
        assert_eq!(
            t,
            Target::Local(dir.path().canonicalize().unwrap().join("a/c"))
        );
        assert!(t.rsync_arg().as_bytes().ends_with(b"/c/"));
    }

    #[test]
    fn overlap_is_refused_both_ways() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().unwrap();
        let inside = Target::Local(root.join("replica"));
        assert!(matches!(
            inside.check_overlap(&root),
            Err(TargetError::InsideSource { .. })
        ));
        let outside = Target::Local(root.clone());
        assert!(matches!(
            outside.check_overlap(&root.join("src")),
            Err(TargetError::ContainsSource { .. })
        ));
        assert!(
            Target::Local(root.join("b"))
                .check_overlap(&root.join("a"))
                .is_ok()
        );
    }

    #[test]
    fn option_like_target_is_refused() {
        assert!(matches!(
            Target::parse(OsStr::new("--delete")),
            Err(TargetError::LooksLikeOption(_))
        ));
    }
}
