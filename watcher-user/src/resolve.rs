//! fanotify directory handle -> path, with a bounded cache.
//!
//! The cache stays correct because events are processed in queue order: a cached path is
//! right until a directory rename or removal is processed. A rename moves the paths at and
//! below the old name ([`Resolver::move_under`]); a removal drops them
//! ([`Resolver::invalidate_under`]); paths elsewhere stay. A directory moved away to a name
//! not known drops every path of its filesystem ([`Resolver::invalidate`]), and an overflow
//! every path ([`Resolver::clear`]). A directory removed whose own name is not known (its
//! parent went first) drops nothing: it was empty, and its handle is never reused, so its
//! entry is only memory, and wiping the cache for it would lose the paths of directories
//! renamed and then deleted elsewhere (`mv k k2; rm -rf k2`), whose handles no longer open.
//! Paths learned from the kernel are the current ones at read time, which can be "newer"
//! than the event; that is fine because the rename that made them newer also dirties both
//! its old and its new path.
//!
//! Both operations are range scans of a path index, so a `rm -rf` of a big tree costs
//! the same whatever else the cache holds.

use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
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

/// The cached paths of one filesystem, indexed both ways: by handle for lookups, by path
/// (ordered, so a directory and everything below it are one range) for the renames and
/// removals that move or drop a subtree's paths without scanning the whole cache.
#[derive(Default)]
struct Level {
    by_handle: HashMap<Box<[u8]>, PathBuf>,
    by_path: BTreeMap<PathBuf, Box<[u8]>>,
}

impl Level {
    fn insert(&mut self, handle: Box<[u8]>, path: PathBuf) {
        if let Some(old) = self.by_handle.insert(handle.clone(), path.clone()) {
            self.by_path.remove(&old);
        }
        // One path names one directory: a handle cached for it before is a directory gone
        // (deleted without its path known); the newest wins.
        if let Some(stale) = self.by_path.insert(path, handle.clone())
            && stale != handle
        {
            self.by_handle.remove(&stale);
        }
    }

    /// The paths at or below `prefix` (component-wise: `/a/b` holds `/a/b/c`, not `/a/bc`),
    /// which sort together right after `prefix` itself.
    fn under(&self, prefix: &Path) -> Vec<PathBuf> {
        self.by_path
            .range::<Path, _>((Bound::Included(prefix), Bound::Unbounded))
            .map(|(path, _)| path)
            .take_while(|path| path.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn remove_under(&mut self, prefix: &Path) {
        for path in self.under(prefix) {
            if let Some(handle) = self.by_path.remove(&path) {
                self.by_handle.remove(&handle);
            }
        }
    }

    fn move_under(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, Box<[u8]>)> = self
            .under(from)
            .into_iter()
            .filter_map(|path| self.by_path.remove_entry(&path))
            .collect();
        for (path, handle) in moved {
            let rest = path.strip_prefix(from).expect("under `from`");
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            self.insert(handle, new);
        }
    }

    fn len(&self) -> usize {
        self.by_handle.len()
    }
}

/// Handles of one or more filesystems, each with a directory on it to open handles against.
pub struct Resolver {
    mounts: Vec<(Fsid, MountDir)>,
    cache: HashMap<Fsid, Level>,
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
        self.cache.remove(&fsid);
    }

    /// Forgets the cached paths at or below `prefix` on `fsid`: that directory moved away
    /// to a place not known. Paths elsewhere stay right.
    pub fn invalidate_under(&mut self, fsid: Fsid, prefix: &Path) {
        if let Some(level) = self.cache.get_mut(&fsid) {
            level.remove_under(prefix);
        }
    }

    /// A directory moved from `from` to `to`: the cached paths at or below `from` move
    /// with it. Kept rather than forgotten because a directory deleted right after its
    /// move (`mv k k2; rm -rf k2`) can no longer be resolved from its handle, and the
    /// deletions inside it would be lost.
    pub fn move_under(&mut self, fsid: Fsid, from: &Path, to: &Path) {
        if let Some(level) = self.cache.get_mut(&fsid) {
            level.move_under(from, to);
        }
    }

    /// Forgets everything (after an overflow, when renames may have been lost).
    pub fn clear(&mut self) {
        self.cache.clear();
    }

    /// The path of directory `handle` on `fsid`.
    pub fn resolve(&mut self, fsid: Fsid, handle: &[u8]) -> io::Result<Resolved> {
        if let Some(path) = self
            .cache
            .get(&fsid)
            .and_then(|level| level.by_handle.get(handle))
        {
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

    /// The device, inode number and link count of the object `handle` names, if it still
    /// exists: a file whose name is gone may have others.
    pub fn identity(&self, fsid: Fsid, handle: &[u8]) -> io::Result<(u64, u64, u64)> {
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
        let fd = open_by_handle_at(mount.as_fd(), handle)?;
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(io::Error::from)?;
        Ok((st.st_dev, st.st_ino, st.st_nlink))
    }

    /// Caches `path` as the current path of directory `handle`.
    pub fn remember(&mut self, fsid: Fsid, handle: &[u8], path: PathBuf) {
        if self.cached() >= self.capacity {
            // Bounded memory; refilling costs one open_by_handle_at per directory.
            self.clear();
        }
        self.cache
            .entry(fsid)
            .or_default()
            .insert(handle.into(), path);
    }

    /// Number of cached directories.
    pub fn cached(&self) -> usize {
        self.cache.values().map(Level::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FS: Fsid = (1, 2);

    /// A resolver with no mount (a miss is an error) caching `dirs` as (handle, path).
    fn cached(dirs: &[(&str, &str)]) -> Resolver {
        let mut r = Resolver::new(64);
        for (handle, path) in dirs {
            r.remember(FS, handle.as_bytes(), (*path).into());
        }
        r
    }

    fn path_of(r: &mut Resolver, handle: &str) -> Option<PathBuf> {
        match r.resolve(FS, handle.as_bytes()) {
            Ok(Resolved::Path(p)) => Some(p),
            _ => None,
        }
    }

    const TREE: &[(&str, &str)] = &[
        ("k", "/r/k"),
        ("k-sub", "/r/k/sub"),
        ("k-sub-deep", "/r/k/sub/deep"),
        ("k2", "/r/k2"),
        ("k.old", "/r/k.old"),
        ("other", "/r/other"),
    ];

    #[test]
    fn a_move_carries_the_subtree_and_nothing_beside_it() {
        let mut r = cached(TREE);
        r.move_under(FS, Path::new("/r/k"), Path::new("/r/moved"));
        for (handle, want) in [
            ("k", "/r/moved"),
            ("k-sub", "/r/moved/sub"),
            ("k-sub-deep", "/r/moved/sub/deep"),
            // Names that only start with the same characters are other directories.
            ("k2", "/r/k2"),
            ("k.old", "/r/k.old"),
            ("other", "/r/other"),
        ] {
            assert_eq!(path_of(&mut r, handle), Some(want.into()), "{handle}");
        }
        assert_eq!(r.cached(), TREE.len());
    }

    #[test]
    fn a_move_into_its_own_sibling_name_and_back() {
        let mut r = cached(TREE);
        // k2 gone first (its path is free), then k takes the name.
        r.invalidate_under(FS, Path::new("/r/k2"));
        r.move_under(FS, Path::new("/r/k"), Path::new("/r/k2"));
        assert_eq!(path_of(&mut r, "k-sub"), Some("/r/k2/sub".into()));
        r.move_under(FS, Path::new("/r/k2"), Path::new("/r/k"));
        assert_eq!(path_of(&mut r, "k-sub-deep"), Some("/r/k/sub/deep".into()));
        assert_eq!(path_of(&mut r, "k2"), None);
    }

    #[test]
    fn a_removal_drops_the_subtree_only() {
        let mut r = cached(TREE);
        r.invalidate_under(FS, Path::new("/r/k"));
        assert_eq!(path_of(&mut r, "k"), None);
        assert_eq!(path_of(&mut r, "k-sub-deep"), None);
        assert_eq!(path_of(&mut r, "k2"), Some("/r/k2".into()));
        assert_eq!(path_of(&mut r, "k.old"), Some("/r/k.old".into()));
        assert_eq!(r.cached(), 3);
    }

    #[test]
    fn a_path_names_one_directory_the_newest() {
        // The directory at /r/k was deleted without its name known; a new one took it.
        let mut r = cached(TREE);
        r.remember(FS, b"k-new", "/r/k".into());
        assert_eq!(path_of(&mut r, "k-new"), Some("/r/k".into()));
        assert_eq!(path_of(&mut r, "k"), None);
        // A handle learned again under a new path leaves no trace of the old one.
        r.remember(FS, b"other", "/r/elsewhere".into());
        r.invalidate_under(FS, Path::new("/r/other"));
        assert_eq!(path_of(&mut r, "other"), Some("/r/elsewhere".into()));
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut r = Resolver::new(4);
        for i in 0..10 {
            r.remember(FS, format!("h{i}").as_bytes(), format!("/r/{i}").into());
            assert!(r.cached() <= 4);
        }
    }
}
