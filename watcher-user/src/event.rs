//! The one event type every backend produces and the rest of the pipeline consumes.

use std::path::PathBuf;

/// What happened to a path. The pipeline only needs to know *which* paths are dirty
/// (rsync reads the final state from disk), but the kind decides how much is dirty:
/// a directory that appears must be synced with its whole subtree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Created,
    Modified,
    /// A file open for writing was closed (inotify's `IN_CLOSE_WRITE`). The daemon treats
    /// it as `Modified`; `watcher watch` prints it apart, as inotifywait does.
    CloseWrite,
    Attrib,
    Deleted,
    MovedFrom,
    MovedTo,
}

impl ChangeKind {
    /// Whether a file's change of this kind ends a write: closed after writing, or moved
    /// into place (the atomic-save pattern). Nothing more is expected for it soon.
    pub fn ends_a_write(self, is_dir: bool) -> bool {
        match self {
            ChangeKind::CloseWrite => true,
            ChangeKind::MovedTo => !is_dir,
            _ => false,
        }
    }

    /// Whether the change adds or removes a name (and so changes its directory's mtime),
    /// rather than changing what is behind the name.
    pub fn adds_or_removes(self) -> bool {
        !matches!(
            self,
            ChangeKind::Modified | ChangeKind::CloseWrite | ChangeKind::Attrib
        )
    }
}

/// One event from a backend, with its path already resolved to an absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `path` (absolute) was changed.
    Change {
        kind: ChangeKind,
        path: PathBuf,
        is_dir: bool,
        /// Process that made the change, when the backend knows it (0 otherwise).
        pid: i32,
    },
    /// `from` was renamed to `to` (both absolute), as one operation the kernel reported
    /// whole (fanotify's FAN_RENAME). It comes right after the `MovedFrom` and `MovedTo`
    /// changes of the same rename, which say what is dirty; this only lets a target
    /// replay the rename instead of copying the data again (rsync then still checks it).
    Renamed {
        from: PathBuf,
        to: PathBuf,
        is_dir: bool,
    },
    /// Something under `path` changed but the backend cannot say what: sync the subtree.
    Rescan { path: PathBuf },
    /// A write or attribute change went through `path`, a name unlinked before the backend
    /// could look at it, to a file that still has other names (inode `ino` on device
    /// `dev`): they changed too, and no event names them (`ln a b; echo x >b; rm b`). It
    /// comes right after the removal of `path`.
    OtherNamesChanged { path: PathBuf, dev: u64, ino: u64 },
    /// The backend lost events (queue overflow): every root must be rescanned.
    Overflow,
}

#[cfg(test)]
mod tests {
    use super::ChangeKind::*;

    #[test]
    fn a_close_after_writing_is_a_modification() {
        for kind in [Modified, CloseWrite, Attrib] {
            assert!(!kind.adds_or_removes(), "{kind:?}");
        }
        for kind in [Created, Deleted, MovedFrom, MovedTo] {
            assert!(kind.adds_or_removes(), "{kind:?}");
        }
    }
}
