//! fanotify directory handle -> path, with a bounded cache.
//!
//! The cache stays correct because events are processed in queue order: a cached path is
//! right until a directory rename or removal is processed, and then the paths at and below
//! the old name are dropped ([`Resolver::invalidate_under`]); paths elsewhere stay. When
//! the old name is not known, every path of that filesystem is dropped
//! ([`Resolver::invalidate`]), and after an overflow every path
//! ([`Resolver::clear`]). Paths learned from the kernel are the current ones at read
//! time, which can be "newer" than the event; that is fine because the rename that made
//! them newer also dirties both its old and its new path.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use fanotify_fid::handle::{Fsid, open_by_handle_at};
use hashbrown::HashMap;

/// What a handle turned into.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    /// The directory's current path.
    Path(PathBuf),
    /// The object no longer exists (ESTALE, or unlinked but still held open).
    Gone,
}

/// Where handles of one filesystem are opened: a directory on it.
enum MountDir {
    /// Held open (a root: the daemon keeps it busy anyway).
    Fd(OwnedFd),
    /// Opened per lookup (a filesystem mounted below a root: a descriptor held open would
    /// make its unmount fail with EBUSY).
    Path(PathBuf),
}

/// Handles of one or more filesystems, each with a directory on it to open handles against.
pub struct Resolver {
    mounts: Vec<(Fsid, MountDir)>,
    cache: HashMap<Fsid, HashMap<Box<[u8]>, PathBuf>>,
    len: usize,
    capacity: usize,
    /// Lookups answered by the cache / by the kernel, for stats.
    pub hits: u64,
    pub misses: u64,
}

impl Resolver {
    /// A resolver whose cache holds at most `capacity` directories.
    pub fn new(capacity: usize) -> Self {
        Resolver {
            mounts: Vec::new(),
            cache: HashMap::new(),
            len: 0,
            capacity: capacity.max(1),
            hits: 0,
            misses: 0,
        }
    }

    /// Handles of filesystem `fsid` are opened against `dir_fd` (a directory on it).
    pub fn add_mount(&mut self, fsid: Fsid, dir_fd: OwnedFd) {
        self.mounts.push((fsid, MountDir::Fd(dir_fd)));
    }

    /// Handles of filesystem `fsid` are opened against directory `dir`, opened per lookup.
    pub fn add_mount_path(&mut self, fsid: Fsid, dir: PathBuf) {
        self.mounts.push((fsid, MountDir::Path(dir)));
    }

    /// Forgets filesystem `fsid` (it was unmounted): its handles resolve no more.
    pub fn remove_mount(&mut self, fsid: Fsid) {
        self.mounts.retain(|(f, _)| *f != fsid);
        self.invalidate(fsid);
    }

    /// Forgets every cached path of `fsid`: a directory moved, so any path below it may be stale.
    pub fn invalidate(&mut self, fsid: Fsid) {
        if let Some(level) = self.cache.remove(&fsid) {
            self.len -= level.len();
        }
    }

    /// Forgets the cached paths at or below `prefix` on `fsid`: that directory moved or was
    /// removed. Paths elsewhere stay right.
    pub fn invalidate_under(&mut self, fsid: Fsid, prefix: &Path) {
        if let Some(level) = self.cache.get_mut(&fsid) {
            let before = level.len();
            level.retain(|_, path| !path.starts_with(prefix));
            self.len -= before - level.len();
        }
    }

    /// A directory moved from `from` to `to`: the cached paths at or below `from` move
    /// with it. Kept rather than forgotten because a directory deleted right after its
    /// move (`mv k k2; rm -rf k2`) can no longer be resolved from its handle, and the
    /// deletions inside it would be lost.
    pub fn move_under(&mut self, fsid: Fsid, from: &Path, to: &Path) {
        if let Some(level) = self.cache.get_mut(&fsid) {
            for path in level.values_mut() {
                if let Ok(rest) = path.strip_prefix(from) {
                    *path = if rest.as_os_str().is_empty() {
                        to.to_path_buf()
                    } else {
                        to.join(rest)
                    };
                }
            }
        }
    }

    /// Forgets everything (after an overflow, when renames may have been lost).
    pub fn clear(&mut self) {
        self.cache.clear();
        self.len = 0;
    }

    /// The path of directory `handle` on `fsid`.
    pub fn resolve(&mut self, fsid: Fsid, handle: &[u8]) -> io::Result<Resolved> {
        if let Some(path) = self.cache.get(&fsid).and_then(|level| level.get(handle)) {
            self.hits += 1;
            return Ok(Resolved::Path(path.clone()));
        }
        self.misses += 1;
        let opened_dir;
        let mount = match self
            .mounts
            .iter()
            .find(|(f, _)| *f == fsid)
            .map(|(_, dir)| dir)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EXDEV))?
        {
            MountDir::Fd(fd) => fd,
            MountDir::Path(dir) => {
                opened_dir = OwnedFd::from(std::fs::File::open(dir)?);
                &opened_dir
            }
        };
        // A real allocation failure would pass on a second try; a directory being torn down
        // answers ENOMEM again.
        let opened = match open_by_handle_at(mount.as_fd(), handle) {
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                open_by_handle_at(mount.as_fd(), handle)
            }
            other => other,
        };
        let fd = match opened {
            Ok(fd) => fd,
            // ESTALE: the directory is gone. ENOMEM: seen (Linux 6.x, ext4) for handles of
            // directories removed while the kernel tried to reconnect them to the tree; the
            // marks are filesystem-wide, so this happens for every `rm -rf` anywhere on the
            // filesystem, and a rescan of every root each time would cost far more than the
            // event is worth. Either way the removal itself arrives as an event in a parent.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE) | Some(libc::ENOMEM)) => {
                return Ok(Resolved::Gone);
            }
            Err(e) => return Err(e),
        };
        // A directory removed while someone still holds it open resolves, with nlink 0.
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(io::Error::from)?;
        if st.st_nlink == 0 {
            return Ok(Resolved::Gone);
        }
        let path = std::fs::read_link(Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())))?;
        self.remember(fsid, handle, path.clone());
        Ok(Resolved::Path(path))
    }

    /// Caches `path` as the current path of directory `handle`.
    pub fn remember(&mut self, fsid: Fsid, handle: &[u8], path: PathBuf) {
        if self.len >= self.capacity {
            // Bounded memory; refilling costs one open_by_handle_at per directory.
            self.clear();
        }
        if self
            .cache
            .entry(fsid)
            .or_default()
            .insert(handle.into(), path)
            .is_none()
        {
            self.len += 1;
        }
    }

    /// Number of cached directories.
    pub fn cached(&self) -> usize {
        self.len
    }
}
