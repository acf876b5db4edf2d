//! Turning the VFS probes' records (watcher-ebpf's vfs.rs) into [`Event`]s: a record
//! names a dentry by its filesystem (the kernel `dev_t`) and its path below that
//! filesystem's root, written leaf first; this side puts the names in order and finds
//! where the filesystem is mounted. A filesystem mounted at several places (bind
//! mounts) gives one path per mount; only paths under a root become events.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use watcher_ebpf_common::{VFS_PATH_BUF, VfsRecord, vfs_op};

use crate::backend::mountinfo::{Mount, kernel_dev};
use crate::event::{ChangeKind, Event};

/// The path below its filesystem's root that a record's leaf-first bytes spell, or None
/// when the probe could not walk up to the root (negative length) or the bytes are bad.
pub fn fs_path(bytes: &[u8; VFS_PATH_BUF], len: i32) -> Option<PathBuf> {
    let len = usize::try_from(len).ok()?.min(VFS_PATH_BUF);
    let mut path = PathBuf::from("/");
    for name in bytes[..len].split(|&b| b == b'/').rev() {
        if name.is_empty() {
            continue;
        }
        if name == b"." || name == b".." {
            return None;
        }
        path.push(OsStr::from_bytes(name));
    }
    Some(path)
}

/// Counters for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct VfsStats {
    pub records: u64,
    /// Paths the probe could not walk to their filesystem's root: every root rescanned.
    pub incomplete: u64,
    /// Filesystems not mounted in this namespace.
    pub unmounted: u64,
}

/// Translates VFS records for a set of roots.
pub struct VfsTranslator {
    roots: Vec<PathBuf>,
    mounts: Vec<Mount>,
    /// Re-reads the mount table (when a record names a filesystem it does not list).
    reload: Box<dyn FnMut() -> Vec<Mount> + Send>,
    /// When it was last re-read: at most once a second, so records of a filesystem this
    /// namespace does not mount do not re-read it each time.
    reloaded: Option<std::time::Instant>,
    pub stats: VfsStats,
}

impl VfsTranslator {
    pub fn new(roots: &[PathBuf], mut reload: Box<dyn FnMut() -> Vec<Mount> + Send>) -> Self {
        VfsTranslator {
            roots: roots.to_vec(),
            mounts: reload(),
            reload,
            reloaded: None,
            stats: VfsStats::default(),
        }
    }

    /// Where `rel` (below the root of filesystem `dev`) is in the mount tree.
    fn absolute(&mut self, dev: u32, rel: &Path) -> Vec<PathBuf> {
        let find = |mounts: &[Mount]| -> Vec<PathBuf> {
            mounts
                .iter()
                .filter(|m| kernel_dev(m.major, m.minor) == dev)
                .filter_map(|m| {
                    let below = rel.strip_prefix(&m.root).ok()?;
                    Some(if below.as_os_str().is_empty() {
                        m.mount_point.clone()
                    } else {
                        m.mount_point.join(below)
                    })
                })
                .collect()
        };
        let mut found = find(&self.mounts);
        let listed = |mounts: &[Mount]| mounts.iter().any(|m| kernel_dev(m.major, m.minor) == dev);
        let due = self
            .reloaded
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
        if found.is_empty() && !listed(&self.mounts) && due {
            self.mounts = (self.reload)();
            self.reloaded = Some(std::time::Instant::now());
            found = find(&self.mounts);
        }
        if found.is_empty() && !listed(&self.mounts) {
            self.stats.unmounted += 1;
        }
        found
    }

    fn under_roots(&self, path: &Path) -> bool {
        self.roots.iter().any(|r| path.starts_with(r))
    }

    /// The record's path(s) as absolute paths under a root; None after queuing a rescan.
    fn paths(
        &mut self,
        rec: &VfsRecord,
        second: bool,
        out: &mut Vec<Event>,
    ) -> Option<Vec<PathBuf>> {
        let (bytes, len) = if second {
            (&rec.path2, rec.len2)
        } else {
            (&rec.path1, rec.len1)
        };
        let Some(rel) = fs_path(bytes, len) else {
            self.stats.incomplete += 1;
            tracing::debug!(
                op = rec.op,
                tgid = rec.tgid,
                len,
                "ebpf vfs: path not walked to its root"
            );
            out.extend(self.roots.iter().map(|r| Event::Rescan { path: r.clone() }));
            return None;
        };
        let paths = self.absolute(rec.dev, &rel);
        Some(paths.into_iter().filter(|p| self.under_roots(p)).collect())
    }

    /// Appends what `rec` means to `out`.
    pub fn translate(&mut self, rec: &VfsRecord, out: &mut Vec<Event>) {
        self.stats.records += 1;
        let pid = rec.tgid as i32;
        let push = |out: &mut Vec<Event>, kind, path: PathBuf, is_dir| {
            out.push(Event::Change {
                kind,
                path,
                is_dir,
                pid,
            })
        };
        let is_dir = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
        let (kind, dir) = match rec.op {
            vfs_op::CREATE => (ChangeKind::Created, Some(false)),
            vfs_op::MKDIR => (ChangeKind::Created, Some(true)),
            vfs_op::REMOVE => (ChangeKind::Deleted, Some(false)),
            vfs_op::REMOVE_DIR => (ChangeKind::Deleted, Some(true)),
            vfs_op::ATTRIB => (ChangeKind::Attrib, None),
            vfs_op::MODIFY => (ChangeKind::Modified, Some(false)),
            vfs_op::CLOSE_WRITE => (ChangeKind::CloseWrite, Some(false)),
            vfs_op::RENAME => {
                let Some(old) = self.paths(rec, false, out) else {
                    return;
                };
                let Some(new) = self.paths(rec, true, out) else {
                    return;
                };
                // Gone again already: take it for a directory, which syncs more, never less.
                let moved_dir = new.first().is_none_or(|n| {
                    std::fs::symlink_metadata(n)
                        .map(|m| m.is_dir())
                        .unwrap_or(true)
                });
                // Two halves, not a rename to replay: with these probes, replaying renames
                // left directories with rsync's transient modes on the replica in the
                // guest's initial-sync test (cause not found yet). The syscall set replays.
                for p in old {
                    push(out, ChangeKind::MovedFrom, p, moved_dir);
                }
                for p in new {
                    push(out, ChangeKind::MovedTo, p, moved_dir);
                }
                return;
            }
            _ => return,
        };
        let Some(paths) = self.paths(rec, false, out) else {
            return;
        };
        for p in paths {
            let d = dir.unwrap_or_else(|| is_dir(&p));
            push(out, kind, p, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(leaf_first: &str) -> ([u8; VFS_PATH_BUF], i32) {
        let mut b = [0u8; VFS_PATH_BUF];
        b[..leaf_first.len()].copy_from_slice(leaf_first.as_bytes());
        (b, leaf_first.len() as i32)
    }

    fn record(op: u32, dev: u32, p1: &str, p2: &str) -> VfsRecord {
        let (path1, len1) = bytes(p1);
        let (path2, len2) = bytes(p2);
        VfsRecord {
            tgid: 7,
            pid: 7,
            op,
            dev,
            len1,
            len2,
            path1,
            path2,
        }
    }

    fn mount(major: u32, minor: u32, root: &str, at: &str) -> Mount {
        Mount {
            id: 0,
            major,
            minor,
            root: root.into(),
            mount_point: at.into(),
            fstype: "ext4".into(),
        }
    }

    #[test]
    fn leaf_first_names_become_a_path() {
        let (b, len) = bytes("c/b x/a/");
        assert_eq!(fs_path(&b, len), Some(PathBuf::from("/a/b x/c")));
        let (b, _) = bytes("");
        assert_eq!(fs_path(&b, 0), Some(PathBuf::from("/")));
        assert_eq!(fs_path(&b, -1), None);
        let (b, len) = bytes("c/../a/");
        assert_eq!(fs_path(&b, len), None);
    }

    #[test]
    fn paths_are_placed_under_every_mount_of_their_filesystem() {
        let dev = kernel_dev(8, 1);
        let mounts = vec![
            mount(8, 1, "/", "/"),
            // The same filesystem's /srv/data bind-mounted at /data.
            mount(8, 1, "/srv/data", "/data"),
            mount(0, 40, "/", "/tmp"),
        ];
        let mut t = VfsTranslator::new(
            &[PathBuf::from("/data/src"), PathBuf::from("/srv/data/src")],
            Box::new(move || mounts.clone()),
        );
        let mut out = Vec::new();
        t.translate(
            &record(vfs_op::CREATE, dev, "f/src/data/srv/", ""),
            &mut out,
        );
        let paths: Vec<_> = out
            .iter()
            .map(|e| match e {
                Event::Change {
                    kind, path, is_dir, ..
                } => {
                    assert_eq!((*kind, *is_dir), (ChangeKind::Created, false));
                    path.clone()
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/srv/data/src/f"),
                PathBuf::from("/data/src/f")
            ]
        );
        // Outside the roots, or on another filesystem: nothing.
        out.clear();
        t.translate(&record(vfs_op::CREATE, dev, "f/etc/", ""), &mut out);
        t.translate(
            &record(vfs_op::CREATE, kernel_dev(0, 40), "f/src/data/srv/", ""),
            &mut out,
        );
        assert_eq!(out, vec![]);
    }

    #[test]
    fn renames_and_incomplete_paths() {
        let dev = kernel_dev(8, 1);
        let mounts = vec![mount(8, 1, "/", "/")];
        let mut t = VfsTranslator::new(&[PathBuf::from("/r")], Box::new(move || mounts.clone()));
        let mut out = Vec::new();
        t.translate(&record(vfs_op::RENAME, dev, "old/r/", "new/r/"), &mut out);
        // /r/new does not exist here: taken for a directory.
        assert_eq!(
            out,
            vec![
                Event::Change {
                    kind: ChangeKind::MovedFrom,
                    path: "/r/old".into(),
                    is_dir: true,
                    pid: 7
                },
                Event::Change {
                    kind: ChangeKind::MovedTo,
                    path: "/r/new".into(),
                    is_dir: true,
                    pid: 7
                },
            ]
        );
        out.clear();
        let mut rec = record(vfs_op::MODIFY, dev, "", "");
        rec.len1 = -1;
        t.translate(&rec, &mut out);
        assert_eq!(out, vec![Event::Rescan { path: "/r".into() }]);
        assert_eq!(t.stats.incomplete, 1);
    }

    #[test]
    fn an_unknown_filesystem_rereads_the_mount_table() {
        let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = reads.clone();
        let mut t = VfsTranslator::new(
            &[PathBuf::from("/mnt/new/r")],
            Box::new(move || {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut m = vec![mount(8, 1, "/", "/")];
                if n > 0 {
                    m.push(mount(0, 50, "/", "/mnt/new"));
                }
                m
            }),
        );
        let mut out = Vec::new();
        t.translate(
            &record(vfs_op::MKDIR, kernel_dev(0, 50), "d/r/", ""),
            &mut out,
        );
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
        // A filesystem mounted nowhere here: the table is not re-read again at once.
        let mut none = Vec::new();
        t.translate(
            &record(vfs_op::MKDIR, kernel_dev(0, 99), "x/", ""),
            &mut none,
        );
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!((none, t.stats.unmounted), (vec![], 1));
        assert_eq!(
            out,
            vec![Event::Change {
                kind: ChangeKind::Created,
                path: "/mnt/new/r/d".into(),
                is_dir: true,
                pid: 7
            }]
        );
    }
}
