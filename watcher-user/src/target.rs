//! Where a replica lives: a local directory, an rsync daemon module or an ssh path.
//!
//! Parsing a destination has no side effect, so the configuration can parse every target
//! once, when it is checked (`watcher config check` included); creating a missing local
//! directory is a separate step, [`Target::create_local_dir`], taken by the daemon when it
//! starts using the target.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// A replica destination as rsync understands it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A directory on this machine: absolute, every part that exists canonical, the rest
    /// normalized (no `.` or `..`).
    Local(PathBuf),
    /// `host::module[/path]`, `rsync://[user@]host[:port]/module[/path]` or `[user@]host:/path`,
    /// passed to rsync unchanged.
    Remote(OsString),
}

/// What kind of place a destination names, the way rsync tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A directory on this machine.
    Local,
    /// `host::module` or `rsync://`: an rsync daemon, which may want a password.
    Daemon,
    /// `host:path`: rsync over ssh.
    Ssh,
}

/// A target that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Nothing was given.
    #[error("target is empty")]
    Empty,
    /// rsync would take it for an option.
    #[error("target {0:?} starts with '-' and would be read as an rsync option")]
    LooksLikeOption(OsString),
    /// A local directory given as a relative path (relative to what would be a guess).
    #[error("local target {0:?} is not an absolute path")]
    NotAbsolute(PathBuf),
    /// The path exists and is a file or something else that is not a directory.
    #[error("target {} exists and is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// A missing local directory whose parent is missing too.
    #[error(
        "local target {} cannot be created: its parent {} does not exist (an unmounted mount \
         point?); create it first",
        path.display(),
        parent.display()
    )]
    MissingParent {
        /// The directory.
        path: PathBuf,
        /// Its missing parent.
        parent: PathBuf,
    },
    /// A missing local directory could not be created.
    #[error("cannot create or open local target {path}: {source}")]
    Local {
        /// The directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The daemon would copy its own copies.
    #[error(
        "target {target} lies inside source {source_root}: the daemon would copy its own copies"
    )]
    InsideSource {
        /// The local target.
        target: PathBuf,
        /// The source it lies in.
        source_root: PathBuf,
    },
    /// `rsync --delete` would remove the source.
    #[error(
        "source {source_root} lies inside target {target}: syncing with --delete would remove the source"
    )]
    ContainsSource {
        /// The local target.
        target: PathBuf,
        /// The source inside it.
        source_root: PathBuf,
    },
}

/// The kind of destination `spec` names: `rsync://`, or `::` before the first `/`, is an
/// rsync daemon; any other `:` before the first `/` is ssh; anything else is local.
pub fn kind_of(spec: &OsStr) -> TargetKind {
    let bytes = spec.as_bytes();
    if bytes.starts_with(b"rsync://") {
        return TargetKind::Daemon;
    }
    let head = &bytes[..bytes.iter().position(|&b| b == b'/').unwrap_or(bytes.len())];
    if head.windows(2).any(|w| w == b"::") {
        TargetKind::Daemon
    } else if head.contains(&b':') {
        TargetKind::Ssh
    } else {
        TargetKind::Local
    }
}

impl Target {
    /// Parses a destination the way rsync does (see [`kind_of`]). A local directory must be
    /// absolute; it is resolved as far as it exists, and need not exist. Reads the
    /// filesystem, changes nothing.
    pub fn parse(spec: &OsStr) -> Result<Target, TargetError> {
        let bytes = spec.as_bytes();
        if bytes.is_empty() {
            return Err(TargetError::Empty);
        }
        if bytes[0] == b'-' {
            return Err(TargetError::LooksLikeOption(spec.to_owned()));
        }
        if kind_of(spec) != TargetKind::Local {
            return Ok(Target::Remote(spec.to_owned()));
        }
        let path = Path::new(spec);
        if !path.is_absolute() {
            return Err(TargetError::NotAbsolute(path.to_path_buf()));
        }
        if let Ok(meta) = std::fs::metadata(path)
            && !meta.is_dir()
        {
            return Err(TargetError::NotADirectory(path.to_path_buf()));
        }
        Ok(Target::Local(resolve(path)))
    }

    /// What kind of place this is.
    pub fn kind(&self) -> TargetKind {
        match self {
            Target::Local(_) => TargetKind::Local,
            Target::Remote(spec) => kind_of(spec),
        }
    }

    /// Creates a local target's directory if it is missing and its parent exists; nothing
    /// for a remote one. A missing parent is refused rather than created: it is most often
    /// an unmounted mount point, and the replica would fill the filesystem below it. Taken
    /// when the daemon starts using the target (after every check passed), not when it is
    /// parsed.
    pub fn create_local_dir(&self) -> Result<(), TargetError> {
        let Target::Local(path) = self else {
            return Ok(());
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(_) => return Err(TargetError::NotADirectory(path.clone())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TargetError::Local {
                    path: path.clone(),
                    source,
                });
            }
        }
        if let Some(parent) = path.parent()
            && !std::fs::metadata(parent).is_ok_and(|m| m.is_dir())
        {
            return Err(TargetError::MissingParent {
                path: path.clone(),
                parent: parent.to_path_buf(),
            });
        }
        std::fs::create_dir(path).map_err(|source| TargetError::Local {
            path: path.clone(),
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

/// `path` (absolute) with every existing prefix canonicalized and the rest normalized
/// lexically: where the directory is, or will be once created.
fn resolve(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    let mut exists = true;
    for component in path.components() {
        match component {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                if exists {
                    match out.canonicalize() {
                        Ok(canonical) => out = canonical,
                        Err(_) => exists = false,
                    }
                }
            }
        }
    }
    out
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
    fn kinds() {
        for (dest, kind) in [
            ("/mnt/replica", TargetKind::Local),
            ("/mnt/a:b", TargetKind::Local),
            ("host::module", TargetKind::Daemon),
            ("user@host::module/sub", TargetKind::Daemon),
            ("rsync://user@127.0.0.1:8730/mod/", TargetKind::Daemon),
            ("host:/srv/replica", TargetKind::Ssh),
            ("user@host:relative", TargetKind::Ssh),
        ] {
            assert_eq!(kind_of(OsStr::new(dest)), kind, "{dest}");
            let target = Target::parse(OsStr::new(dest)).expect(dest);
            assert_eq!(target.kind(), kind, "{dest}");
        }
    }

    #[test]
    fn local_target_is_created_and_canonical() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = dir.path().join("a/b/../c");
        let t = Target::parse(spec.as_os_str()).expect("local");
        let expected = dir.path().canonicalize().unwrap().join("a/c");
        assert_eq!(t, Target::Local(expected.clone()));
        assert!(t.rsync_arg().as_bytes().ends_with(b"/c/"));
        // Parsing changed nothing on disk; creating is the separate step, and only where
        // the parent exists (a missing one may be an unmounted mount point).
        assert!(!dir.path().join("a").exists());
        let err = t.create_local_dir().unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!dir.path().join("a").exists());
        std::fs::create_dir(dir.path().join("a")).unwrap();
        t.create_local_dir().expect("create");
        assert!(expected.is_dir());
        assert_eq!(expected.canonicalize().unwrap(), expected);
    }

    #[test]
    fn local_target_through_a_symlink_is_canonical() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("link")).unwrap();
        let t = Target::parse(root.join("link/new").as_os_str()).expect("local");
        assert_eq!(t, Target::Local(root.join("real/new")));
    }

    #[test]
    fn unusable_local_targets_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            Target::parse(file.as_os_str()),
            Err(TargetError::NotADirectory(_))
        ));
        assert!(matches!(
            Target::parse(OsStr::new("replica")),
            Err(TargetError::NotAbsolute(_))
        ));
        assert!(matches!(
            Target::parse(OsStr::new("")),
            Err(TargetError::Empty)
        ));
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
