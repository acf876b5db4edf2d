//! The fanotify backend: one `FAN_MARK_FILESYSTEM` mark per filesystem holding a source root
//! or mounted below one, events reported as (directory handle, name) and resolved to paths
//! in user space.
//!
//! A mark covers one filesystem, so every filesystem mounted below a root gets its own, and
//! the mount table is followed while running: a filesystem mounted later is marked and its
//! mount point rescanned (what was written before the mark is not lost); one unmounted
//! dirties its mount point (the directory below shows again). Roots that stop at mount
//! points (`one_file_system`) are left out of both.
//!
//! Set-up is O(1) in the size of the tree (no per-directory watches), so it is ready in
//! milliseconds on millions of files.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use fanotify_fid::consts::*;
use fanotify_fid::handle::{Fsid, fsid_of_path};
use fanotify_fid::{Fanotify, FanotifyError, FidEvent};

use super::mountinfo::{self, Mount, MountWatch};
use super::read_loop::{self, EventSource, OwnFilter};
use super::vanished::Vanished;
use super::{Backend, BackendError, OwnPids, Support, join_name, mask};
use crate::event::{ChangeKind, Event};
use crate::resolve::{Resolved, Resolver};

const INIT_FLAGS: u32 =
    FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_FID | FAN_REPORT_DFID_NAME;

/// Everything that changes a tree's content, metadata or shape.
const BASE_MASK: u64 = FAN_CREATE
    | FAN_DELETE
    | FAN_CLOSE_WRITE
    | FAN_MODIFY
    | FAN_ATTRIB
    | FAN_ONDIR
    | FAN_DELETE_SELF
    | FAN_MOVE_SELF;

/// Read buffer: many events per syscall on a deep queue.
const READ_BUF_BYTES: usize = 256 * 1024;

/// Directories whose paths are kept; refilled by open_by_handle_at on a miss.
const RESOLVE_CACHE_DIRS: usize = 1 << 16;

/// A fanotify group with its marks set.
pub struct FanotifyBackend {
    group: Fanotify,
    /// Where reads land; the events read borrow it.
    buf: Vec<u8>,
    translator: Translator,
    /// Linux 5.17+ reports a rename as one event with both names.
    rename_events: bool,
    own_pids: Arc<OwnPids>,
    /// The mounts below the roots that are followed; None when every root stops at mount
    /// points or the mount table cannot be read.
    mounts: Option<MountWatch>,
    /// Filesystems marked for mounts below roots, by device: their fsid and how many of
    /// the followed mounts show them.
    nested: hashbrown::HashMap<(u32, u32), (Fsid, usize)>,
    /// Devices of the filesystems holding roots (marked already).
    root_devs: hashbrown::HashSet<(u32, u32)>,
    /// Mount points of filesystems mounted below a root after start-up that refused a
    /// mark (an overlay): nothing reports their changes, so they are rescanned every
    /// [`POLL_UNMARKED`] until unmounted.
    polled: std::collections::BTreeSet<PathBuf>,
    next_poll: Option<std::time::Instant>,
}

/// How often a filesystem below a root that cannot be marked is rescanned.
const POLL_UNMARKED: std::time::Duration = std::time::Duration::from_secs(5);

/// Turns parsed fanotify events into [`Event`]s with absolute paths. Its only system call
/// is `open_by_handle_at` on a cache miss, so it is tested with a pre-filled cache.
pub struct Translator {
    resolver: Resolver,
    /// Source roots per filesystem, to rescan when an event there cannot be resolved.
    roots_by_fs: BTreeMap<Fsid, Vec<PathBuf>>,
    /// Files written through a name gone before it was looked at (see `vanished.rs`).
    vanished: Vanished,
}

fn errno_of(e: &FanotifyError) -> io::Error {
    io::Error::from_raw_os_error(e.errno().unwrap_or(libc::EIO))
}

/// A group with the flags the backend needs, or why the kernel refuses it. Not
/// `FAN_REPORT_TARGET_FID`: with the child's handle on its creation too, the kernel merges
/// a file's unread creation and close into one event, and `watch` would lose `close_write`.
fn init_group() -> Result<Fanotify, BackendError> {
    Fanotify::new(INIT_FLAGS).map_err(|e| match e.errno() {
        Some(libc::EPERM) => BackendError::NoPermission(errno_of(&e)),
        Some(libc::EINVAL) => BackendError::KernelUnsupported(
            "FAN_REPORT_DFID_NAME was refused (needs Linux 5.9 or later)".into(),
        ),
        Some(libc::ENOSYS) => {
            BackendError::KernelUnsupported("fanotify_init is not implemented".into())
        }
        _ => BackendError::Syscall {
            call: "fanotify_init",
            path: PathBuf::new(),
            source: errno_of(&e),
        },
    })
}

/// Sets the filesystem mark for `path`; returns whether FAN_RENAME was accepted.
fn mark_filesystem(group: &Fanotify, path: &Path) -> Result<bool, BackendError> {
    let with_rename = group.mark(
        FAN_MARK_ADD | FAN_MARK_FILESYSTEM,
        BASE_MASK | FAN_RENAME,
        path.as_os_str(),
    );
    let err = match with_rename {
        Ok(()) => return Ok(true),
        // Kernels before 5.17 do not know FAN_RENAME: fall back to the MOVED_FROM/TO pair.
        Err(e) if e.errno() == Some(libc::EINVAL) => match group.mark(
            FAN_MARK_ADD | FAN_MARK_FILESYSTEM,
            BASE_MASK | FAN_MOVED_FROM | FAN_MOVED_TO,
            path.as_os_str(),
        ) {
            Ok(()) => return Ok(false),
            Err(e) => e,
        },
        Err(e) => e,
    };
    let source = errno_of(&err);
    Err(match err.errno() {
        Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::ENODEV) => {
            BackendError::FilesystemUnsupported {
                path: path.to_path_buf(),
                fstype: super::filesystem_type(path),
                source,
            }
        }
        Some(libc::EPERM) => BackendError::NoPermission(source),
        _ => BackendError::Syscall {
            call: "fanotify_mark",
            path: path.to_path_buf(),
            source,
        },
    })
}

fn open_dir(path: &Path) -> Result<OwnedFd, BackendError> {
    std::fs::File::open(path)
        .map(OwnedFd::from)
        .map_err(|source| BackendError::Syscall {
            call: "open",
            path: path.to_path_buf(),
            source,
        })
}

fn fsid(path: &Path) -> Result<Fsid, BackendError> {
    fsid_of_path(path).map_err(|source| BackendError::Syscall {
        call: "statfs",
        path: path.to_path_buf(),
        source,
    })
}

/// A place fanotify cannot mark (an overlay, say): a root, or a filesystem mounted below
/// one, with its whole subtree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmarked {
    pub path: PathBuf,
    pub fstype: String,
    /// The refusal, for the log and `watcher check`.
    pub why: String,
}

impl FanotifyBackend {
    /// Marks every filesystem holding one of `roots` or mounted below one (once per
    /// filesystem), except below the roots in `stop_at_mounts`. A filesystem that cannot
    /// be marked fails the start.
    pub fn start(
        roots: &[PathBuf],
        stop_at_mounts: &[PathBuf],
        own_pids: Arc<OwnPids>,
    ) -> Result<Self, BackendError> {
        Self::start_marking(roots, stop_at_mounts, own_pids, None)
    }

    /// As [`start`](Self::start), but a filesystem that refuses a mark is left out and
    /// returned with the place it covers, for another backend to watch. Nothing is
    /// marked below such a place: that backend sees all of it.
    pub fn start_where_possible(
        roots: &[PathBuf],
        stop_at_mounts: &[PathBuf],
        own_pids: Arc<OwnPids>,
    ) -> Result<(Self, Vec<Unmarked>), BackendError> {
        let mut unmarked = Vec::new();
        let backend = Self::start_marking(roots, stop_at_mounts, own_pids, Some(&mut unmarked))?;
        Ok((backend, unmarked))
    }

    /// Whether no filesystem is marked.
    pub fn marks_nothing(&self) -> bool {
        self.translator.roots_by_fs.is_empty()
    }

    fn start_marking(
        roots: &[PathBuf],
        stop_at_mounts: &[PathBuf],
        own_pids: Arc<OwnPids>,
        mut unmarked: Option<&mut Vec<Unmarked>>,
    ) -> Result<Self, BackendError> {
        let group = init_group()?;
        let mut roots_by_fs: BTreeMap<Fsid, Vec<PathBuf>> = BTreeMap::new();
        for root in roots {
            roots_by_fs
                .entry(fsid(root)?)
                .or_default()
                .push(root.clone());
        }
        let mut resolver = Resolver::new(RESOLVE_CACHE_DIRS);
        let mut rename_events = true;
        let mut left_out = Vec::new();
        for (fs, fs_roots) in &roots_by_fs {
            let first = &fs_roots[0];
            match (mark_filesystem(&group, first), unmarked.as_deref_mut()) {
                (Ok(rename), _) => rename_events &= rename,
                (Err(e @ BackendError::FilesystemUnsupported { .. }), Some(unmarked)) => {
                    let why = super::error_chain(&e);
                    unmarked.extend(fs_roots.iter().map(|root| Unmarked {
                        path: root.clone(),
                        fstype: super::filesystem_type(root),
                        why: why.clone(),
                    }));
                    left_out.push(*fs);
                    continue;
                }
                (Err(e), _) => return Err(e),
            }
            for root in fs_roots {
                resolver.add_mount(*fs, open_dir(root)?);
            }
            tracing::debug!(root = %first.display(), fsid = ?fs, "filesystem marked");
        }
        roots_by_fs.retain(|fs, _| !left_out.contains(fs));
        let is_left_out = |path: &Path, unmarked: &Option<&mut Vec<Unmarked>>| {
            unmarked
                .as_deref()
                .is_some_and(|u| u.iter().any(|u| path.starts_with(&u.path)))
        };
        let table = mountinfo::mounts();
        let root_devs = roots
            .iter()
            .filter(|r| !is_left_out(r, &unmarked))
            .filter_map(|r| mountinfo::containing(&table, r))
            .map(|m| (m.major, m.minor))
            .collect();
        let followed: Vec<PathBuf> = roots
            .iter()
            .filter(|r| !stop_at_mounts.contains(r) && !is_left_out(r, &unmarked))
            .cloned()
            .collect();
        let mut backend = FanotifyBackend {
            group,
            buf: Vec::with_capacity(READ_BUF_BYTES),
            translator: Translator::new(resolver, roots_by_fs),
            rename_events,
            own_pids,
            mounts: None,
            nested: Default::default(),
            root_devs,
            polled: Default::default(),
            next_poll: None,
        };
        if followed.is_empty() {
            return Ok(backend);
        }
        let watch = match MountWatch::new(followed.clone()) {
            Ok(watch) => Some(watch),
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow /proc/self/mountinfo: filesystems mounted below a root later are not seen");
                None
            }
        };
        for root in &followed {
            for m in mountinfo::below(&table, root) {
                if is_left_out(&m.mount_point, &unmarked) {
                    continue;
                }
                // A filesystem that cannot be marked fails the start, as for a root, or
                // is left to another backend.
                match (backend.mark_nested(m), unmarked.as_deref_mut()) {
                    (Ok(()), _) => {}
                    (Err(e @ BackendError::FilesystemUnsupported { .. }), Some(unmarked)) => {
                        unmarked.push(Unmarked {
                            path: m.mount_point.clone(),
                            fstype: m.fstype.clone(),
                            why: super::error_chain(&e),
                        })
                    }
                    (Err(e), _) => return Err(e),
                }
            }
        }
        backend.mounts = watch;
        Ok(backend)
    }

    /// Marks the filesystem of `m`, a mount below a root, unless it is marked already, and
    /// resolves its handles against its mount point (opened per lookup: a descriptor
    /// kept open would make the filesystem busy and refuse its unmount).
    fn mark_nested(&mut self, m: &Mount) -> Result<(), BackendError> {
        let dev = (m.major, m.minor);
        if self.root_devs.contains(&dev) {
            // Another view (a bind mount, a btrfs subvolume) of a marked filesystem.
            return Ok(());
        }
        if let Some((_, count)) = self.nested.get_mut(&dev) {
            *count += 1;
            return Ok(());
        }
        let fs = fsid(&m.mount_point)?;
        self.rename_events &= mark_filesystem(&self.group, &m.mount_point)?;
        self.translator
            .resolver
            .add_mount_path(fs, m.mount_point.clone());
        self.translator
            .roots_by_fs
            .entry(fs)
            .or_default()
            .push(m.mount_point.clone());
        self.nested.insert(dev, (fs, 1));
        tracing::info!(
            mount_point = %m.mount_point.display(),
            fstype = %m.fstype,
            "filesystem below a root marked"
        );
        Ok(())
    }

    /// `m` was unmounted: forget its filesystem once no followed mount shows it (the
    /// kernel drops the mark with the filesystem).
    fn unmarked_nested(&mut self, m: &Mount) {
        let dev = (m.major, m.minor);
        let Some((fs, count)) = self.nested.get_mut(&dev) else {
            return;
        };
        *count -= 1;
        let fs = *fs;
        if *count == 0 {
            self.nested.remove(&dev);
            self.translator.resolver.remove_mount(fs);
            self.translator.roots_by_fs.remove(&fs);
        } else if let Some(points) = self.translator.roots_by_fs.get_mut(&fs) {
            points.retain(|p| *p != m.mount_point);
        }
    }

    /// Whether renames arrive as single FAN_RENAME events.
    pub fn has_rename_events(&self) -> bool {
        self.rename_events
    }
}

impl Translator {
    /// A translator resolving handles with `resolver`, rescanning `roots_by_fs` when lost.
    pub fn new(resolver: Resolver, roots_by_fs: BTreeMap<Fsid, Vec<PathBuf>>) -> Self {
        Translator {
            resolver,
            roots_by_fs,
            vanished: Vanished::default(),
        }
    }

    /// Every source root on `fs`: what must be rescanned when an event there is lost.
    fn rescan_fs(&self, fs: Option<Fsid>, out: &mut Vec<Event>) {
        for (f, roots) in &self.roots_by_fs {
            if fs.is_none_or(|fs| fs == *f) {
                out.extend(roots.iter().map(|r| Event::Rescan { path: r.clone() }));
            }
        }
    }

    /// `dir_handle`/`name` as a path; None when the directory is gone. A directory that no
    /// longer exists was deleted, and its deletion (which comes later in the queue, in a
    /// parent that still exists, or as an overflow) covers everything that happened inside.
    fn path_of(
        &mut self,
        fs: Fsid,
        dir_handle: &[u8],
        name: &std::ffi::OsStr,
        out: &mut Vec<Event>,
    ) -> Option<PathBuf> {
        match self.resolver.resolve(fs, dir_handle) {
            Ok(Resolved::Path(dir)) => Some(join_name(&dir, name)),
            Ok(Resolved::Gone) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot resolve a directory handle; rescanning");
                self.rescan_fs(Some(fs), out);
                None
            }
        }
    }

    /// Appends what `ev` means to `out`.
    pub fn translate(&mut self, ev: &FidEvent<'_>, out: &mut Vec<Event>) {
        if ev.is_overflow() {
            tracing::warn!("fanotify queue overflow: rescanning every root");
            self.resolver.clear();
            self.vanished.clear();
            out.push(Event::Overflow);
            return;
        }
        let mask = ev.mask();
        let is_dir = mask & FAN_ONDIR != 0;
        let pid = ev.pid();
        let Some(fs) = ev.fsid() else {
            self.rescan_fs(None, out);
            return;
        };

        if mask & FAN_RENAME != 0 {
            if let (Some(from), Some(to)) = (ev.rename_source(), ev.rename_target()) {
                let old = self.path_of(fs, from.handle(), from.name(), out);
                let new = self.path_of(fs, to.handle(), to.name(), out);
                if is_dir {
                    self.directory_moved(fs, old.as_deref(), new.as_deref(), ev.self_handle());
                }
                match (&old, &new, is_dir) {
                    (Some(old), Some(new), true) => self.vanished.directory_moved(old, new),
                    (Some(old), None, true) => self.vanished.directory_gone(old),
                    (Some(old), _, false) => self.vanished.moved_away(old),
                    (None, ..) => {}
                }
                if let Some(path) = &old {
                    out.push(Event::Change {
                        kind: ChangeKind::MovedFrom,
                        path: path.clone(),
                        is_dir,
                        pid,
                    });
                }
                if let Some(path) = &new {
                    out.push(Event::Change {
                        kind: ChangeKind::MovedTo,
                        path: path.clone(),
                        is_dir,
                        pid,
                    });
                }
                if let (Some(from), Some(to)) = (old, new) {
                    out.push(Event::Renamed { from, to, is_dir });
                }
            } else {
                if is_dir {
                    self.resolver.invalidate(fs);
                }
                self.rescan_fs(Some(fs), out);
            }
        }

        let rest = mask & !(FAN_RENAME | FAN_ONDIR);
        if rest == 0 {
            return;
        }
        let kind = match mask::change_kind(rest) {
            Some(kind) => kind,
            None if rest & (FAN_DELETE_SELF | FAN_MOVE_SELF) != 0 => {
                // Every deleted or moved object also reports this; only a root itself
                // matters, and its parent's DELETE/MOVED_FROM event is not in a marked
                // tree's view of it.
                self.self_event(fs, ev, out);
                return;
            }
            None => return,
        };
        let path = match (ev.dfid_name_handle(), ev.dfid_name()) {
            (Some(dir), name) => self.path_of(fs, dir, name.unwrap_or_default(), out),
            // No parent record (an event on the filesystem root): the object's own handle.
            (None, _) => match ev.self_handle() {
                Some(handle) => self.path_of(fs, handle, Default::default(), out),
                None => {
                    self.rescan_fs(Some(fs), out);
                    None
                }
            },
        };
        if is_dir {
            match kind {
                ChangeKind::MovedFrom | ChangeKind::Deleted => match &path {
                    Some(p) => self.resolver.invalidate_under(fs, p),
                    // Moved to a name not known: the paths below it are stale.
                    None if kind == ChangeKind::MovedFrom => self.resolver.invalidate(fs),
                    // Deleted, so empty: nothing cached below it (see resolve.rs).
                    None => {}
                },
                ChangeKind::Created | ChangeKind::MovedTo => {
                    if kind == ChangeKind::MovedTo && path.is_none() {
                        self.resolver.invalidate(fs);
                    }
                    // The new directory's own handle comes with the event: remembering it
                    // lets events inside it resolve even after it is gone again.
                    if let (Some(p), Some(handle)) = (&path, ev.self_handle()) {
                        self.resolver.remember(fs, handle, p.clone());
                    }
                }
                _ => {}
            }
        }
        if let Some(path) = path {
            let mut other_names = None;
            match (kind, is_dir) {
                (ChangeKind::Modified | ChangeKind::CloseWrite | ChangeKind::Attrib, false) => {
                    other_names = self.written_vanished(fs, ev, &path);
                }
                (ChangeKind::Deleted, false) => {
                    other_names =
                        self.vanished
                            .unlinked(&path)
                            .map(|(dev, ino)| Event::OtherNamesChanged {
                                path: path.clone(),
                                dev,
                                ino,
                            });
                }
                (ChangeKind::MovedFrom, false) => self.vanished.moved_away(&path),
                (ChangeKind::Deleted | ChangeKind::MovedFrom, true) => {
                    self.vanished.directory_gone(&path)
                }
                _ => {}
            }
            out.push(Event::Change {
                kind,
                path,
                is_dir,
                pid,
            });
            out.extend(other_names);
        }
    }

    /// A write or attribute change through `path`: if that name is gone already while the
    /// file still has links, the file is noted until the name's removal says whether its
    /// other names need looking up (see `vanished.rs`); returns the lookup when it cannot
    /// wait.
    fn written_vanished(&mut self, fs: Fsid, ev: &FidEvent<'_>, path: &Path) -> Option<Event> {
        if std::fs::symlink_metadata(path).is_ok() {
            return None;
        }
        let (dev, ino, nlink) = self.resolver.identity(fs, ev.self_handle()?).ok()?;
        if nlink == 0 || self.vanished.note(path, (dev, ino)) {
            return None;
        }
        Some(Event::OtherNamesChanged {
            path: path.to_path_buf(),
            dev,
            ino,
        })
    }

    /// A directory moved from `old` to `new`: cached paths below the old name move with
    /// it; with either name unknown they are stale.
    fn directory_moved(
        &mut self,
        fs: Fsid,
        old: Option<&Path>,
        new: Option<&Path>,
        handle: Option<&[u8]>,
    ) {
        match (old, new) {
            (Some(old), Some(new)) => self.resolver.move_under(fs, old, new),
            (Some(old), None) => self.resolver.invalidate_under(fs, old),
            (None, _) => self.resolver.invalidate(fs),
        }
        if let (Some(new), Some(handle)) = (new, handle) {
            self.resolver.remember(fs, handle, new.to_path_buf());
        }
    }

    /// A root directory deleted or moved away: warn and rescan (the target keeps its copy
    /// until the rescan finds the source gone).
    fn self_event(&mut self, fs: Fsid, ev: &FidEvent<'_>, out: &mut Vec<Event>) {
        if ev.mask() & FAN_ONDIR == 0 {
            return;
        }
        let Some(handle) = ev.self_handle() else {
            return;
        };
        if let Ok(Resolved::Path(path)) = self.resolver.resolve(fs, handle) {
            let roots = self.roots_by_fs.get(&fs).cloned().unwrap_or_default();
            if roots.contains(&path) {
                tracing::warn!(root = %path.display(), "a source root itself was moved or deleted");
                out.push(Event::Rescan { path });
            }
        } else {
            for root in self.roots_by_fs.get(&fs).cloned().unwrap_or_default() {
                if std::fs::symlink_metadata(&root).is_err() {
                    tracing::error!(root = %root.display(), "a source root no longer exists");
                }
            }
        }
    }
}

impl EventSource for FanotifyBackend {
    fn fd(&self) -> BorrowedFd<'_> {
        self.group.as_fd()
    }

    fn read(&mut self, own: &mut OwnFilter<'_>, out: &mut Vec<Event>) -> io::Result<usize> {
        let events = self
            .group
            .read_events(&mut self.buf)
            .map_err(|e| errno_of(&e))?;
        for ev in &events {
            if !ev.is_overflow() && own.contains(ev.pid()) {
                continue;
            }
            self.translator.translate(ev, out);
        }
        Ok(events.len())
    }

    fn mounts_fd(&self) -> Option<BorrowedFd<'_>> {
        self.mounts.as_ref().map(MountWatch::fd)
    }

    fn tick(&mut self, now: std::time::Instant, out: &mut Vec<Event>) -> std::time::Duration {
        self.poll_unmarked(now, out)
            .map_or(read_loop::POLL_INTERVAL, |d| {
                d.min(read_loop::POLL_INTERVAL)
            })
    }

    fn mounts_changed(&mut self, out: &mut Vec<Event>) {
        let Some(watch) = &mut self.mounts else {
            return;
        };
        let changes = match watch.changes() {
            Ok(changes) => changes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read /proc/self/mountinfo");
                return;
            }
        };
        for m in &changes.gone {
            tracing::info!(mount_point = %m.mount_point.display(), fstype = %m.fstype, "filesystem below a root unmounted: rescanning its mount point");
            self.unmarked_nested(m);
            self.polled.remove(&m.mount_point);
            out.push(Event::Rescan {
                path: m.mount_point.clone(),
            });
        }
        for m in &changes.appeared {
            if let Err(e) = self.mark_nested(m) {
                tracing::warn!(
                    mount_point = %m.mount_point.display(),
                    fstype = %m.fstype,
                    error = %super::error_chain(&e),
                    every_s = POLL_UNMARKED.as_secs(),
                    "filesystem mounted below a root cannot be marked: rescanned periodically until unmounted; restart the daemon to have `auto` watch it with inotify"
                );
                self.polled.insert(m.mount_point.clone());
            }
            // Marked first, rescanned after: nothing written in between is lost.
            out.push(Event::Rescan {
                path: m.mount_point.clone(),
            });
        }
    }
}

impl FanotifyBackend {
    /// Rescans the mount points in `polled` when due; returns how long until the next.
    fn poll_unmarked(
        &mut self,
        now: std::time::Instant,
        out: &mut Vec<Event>,
    ) -> Option<std::time::Duration> {
        if self.polled.is_empty() {
            self.next_poll = None;
            return None;
        }
        let due = *self.next_poll.get_or_insert(now + POLL_UNMARKED);
        if now < due {
            return Some(due - now);
        }
        out.extend(
            self.polled
                .iter()
                .map(|p| Event::Rescan { path: p.clone() }),
        );
        self.next_poll = Some(now + POLL_UNMARKED);
        Some(POLL_UNMARKED)
    }
}

impl Backend for FanotifyBackend {
    fn name(&self) -> &'static str {
        "fanotify"
    }

    fn run(
        mut self: Box<Self>,
        sink: &mut dyn FnMut(Vec<Event>) -> bool,
        stop: &AtomicBool,
    ) -> Result<(), BackendError> {
        let own_pids = self.own_pids.clone();
        read_loop::run(&mut *self, &own_pids, sink, stop)
    }
}

/// Rows for `watcher check`: kernel support, privilege, and each path's filesystem.
pub fn check(paths: &[PathBuf]) -> Vec<Support> {
    let mut rows = Vec::new();
    let group = match init_group() {
        Ok(g) => {
            // fanotify_init works unprivileged since Linux 5.13; filesystem marks do not.
            let admin = crate::caps::sys_admin();
            rows.push(Support {
                backend: "fanotify",
                path: None,
                ok: admin,
                detail: if admin {
                    "kernel accepts FAN_REPORT_FID | FAN_REPORT_DFID_NAME; CAP_SYS_ADMIN held"
                } else {
                    "kernel accepts FAN_REPORT_FID | FAN_REPORT_DFID_NAME, but this process lacks \
                     CAP_SYS_ADMIN, which filesystem marks need"
                }
                .into(),
            });
            g
        }
        Err(e) => {
            rows.push(Support {
                backend: "fanotify",
                path: None,
                ok: false,
                detail: super::error_chain(&e),
            });
            return rows;
        }
    };
    let table = mountinfo::mounts();
    for path in paths {
        let detail = match mark_filesystem(&group, path) {
            Ok(rename) => Ok(format!(
                "{} filesystem reports file handles{}",
                super::filesystem_type(path),
                if rename {
                    "; FAN_RENAME available"
                } else {
                    "; no FAN_RENAME (before 5.17)"
                }
            )),
            Err(e) => Err(super::error_chain(&e)),
        };
        // Filesystems mounted below the path need marks of their own (unless the group
        // stops at mount points); one that refuses is left to inotify under `auto`.
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        let detail = mountinfo::below(&table, &canonical).fold(detail, |detail, m| {
            let at = format!("{} at {}", m.fstype, m.mount_point.display());
            match (detail, mark_filesystem(&group, &m.mount_point)) {
                (Ok(d), Ok(_)) => Ok(format!("{d}; {at} marked too")),
                (Ok(d), Err(e)) => Err(format!(
                    "{d}, but {at} (mounted below it) cannot be marked ({}); `auto` watches it \
                     with inotify and the rest with fanotify",
                    super::error_chain(&e)
                )),
                (Err(d), Ok(_)) => Err(d),
                (Err(d), Err(_)) => Err(format!("{d}; {at} cannot be marked either")),
            }
        });
        rows.push(Support {
            backend: "fanotify",
            path: Some(path.clone()),
            ok: detail.is_ok(),
            detail: detail.unwrap_or_else(|e| e),
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use fanotify_fid::RenameSide;

    use super::*;

    const FS: Fsid = (7, 9);
    const ROOT: &[u8] = b"handle-root";
    const DIR: &[u8] = b"handle-dir";
    const UNKNOWN: &[u8] = b"handle-unknown";

    /// A translator that knows /srv/data (a root) and /srv/data/d, and has no mount to
    /// open unknown handles against (a miss is an error, as for a lost filesystem).
    fn translator() -> Translator {
        let mut resolver = Resolver::new(64);
        resolver.remember(FS, ROOT, "/srv/data".into());
        resolver.remember(FS, DIR, "/srv/data/d".into());
        let mut roots = BTreeMap::new();
        roots.insert(FS, vec![PathBuf::from("/srv/data")]);
        Translator::new(resolver, roots)
    }

    fn dirent(mask: u64, dir: &'static [u8], name: &'static [u8]) -> FidEvent<'static> {
        let mut ev = FidEvent::new();
        ev.set_mask(mask)
            .set_fsid(FS)
            .set_pid(42)
            .set_dfid_name(Cow::Borrowed(dir), Cow::Borrowed(name));
        ev
    }

    fn change(kind: ChangeKind, path: &str, is_dir: bool) -> Event {
        Event::Change {
            kind,
            path: path.into(),
            is_dir,
            pid: 42,
        }
    }

    /// The directory `from` in the root renamed to `to`, in the root too.
    fn dir_renamed(from: &'static [u8], to: &'static [u8]) -> FidEvent<'static> {
        let mut ev = FidEvent::new();
        ev.set_mask(FAN_RENAME | FAN_ONDIR)
            .set_fsid(FS)
            .set_pid(42)
            .set_rename_source(RenameSide {
                handle: Cow::Borrowed(ROOT),
                name: Cow::Borrowed(from),
            })
            .set_rename_target(RenameSide {
                handle: Cow::Borrowed(ROOT),
                name: Cow::Borrowed(to),
            });
        ev
    }

    fn run(t: &mut Translator, ev: &FidEvent<'_>) -> Vec<Event> {
        let mut out = Vec::new();
        t.translate(ev, &mut out);
        out
    }

    /// mask, directory handle, name -> expected events.
    type Row = (u64, &'static [u8], &'static [u8], Vec<Event>);

    #[test]
    fn directory_entry_events_become_paths() {
        let table: &[Row] = &[
            (
                FAN_CREATE,
                DIR,
                b"f",
                vec![change(ChangeKind::Created, "/srv/data/d/f", false)],
            ),
            (
                FAN_CREATE | FAN_ONDIR,
                ROOT,
                b"new",
                vec![change(ChangeKind::Created, "/srv/data/new", true)],
            ),
            // Merged masks: creation wins, so a new directory is synced with its contents.
            (
                FAN_CREATE | FAN_MODIFY | FAN_CLOSE_WRITE,
                DIR,
                b"f",
                vec![change(ChangeKind::Created, "/srv/data/d/f", false)],
            ),
            (
                FAN_MODIFY,
                DIR,
                b"f",
                vec![change(ChangeKind::Modified, "/srv/data/d/f", false)],
            ),
            (
                FAN_CLOSE_WRITE,
                DIR,
                b"-x\nname",
                vec![change(
                    ChangeKind::CloseWrite,
                    "/srv/data/d/-x\nname",
                    false,
                )],
            ),
            (
                FAN_ATTRIB,
                DIR,
                b"f",
                vec![change(ChangeKind::Attrib, "/srv/data/d/f", false)],
            ),
            (
                FAN_DELETE,
                DIR,
                b"f",
                vec![change(ChangeKind::Deleted, "/srv/data/d/f", false)],
            ),
            (
                FAN_MOVED_FROM,
                DIR,
                b"f",
                vec![change(ChangeKind::MovedFrom, "/srv/data/d/f", false)],
            ),
            (
                FAN_MOVED_TO,
                DIR,
                b"f",
                vec![change(ChangeKind::MovedTo, "/srv/data/d/f", false)],
            ),
            // An attribute change of a directory itself is reported with the name ".".
            (
                FAN_ATTRIB | FAN_ONDIR,
                DIR,
                b".",
                vec![change(ChangeKind::Attrib, "/srv/data/d", true)],
            ),
            // Self events of ordinary objects are covered by their parent's event.
            (FAN_DELETE_SELF, DIR, b"f", vec![]),
        ];
        for (mask, dir, name, want) in table {
            let mut t = translator();
            assert_eq!(
                &run(&mut t, &dirent(*mask, dir, name)),
                want,
                "mask {mask:#x}"
            );
        }
    }

    #[test]
    fn non_utf8_names_are_kept_as_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let mut t = translator();
        let out = run(&mut t, &dirent(FAN_CREATE, DIR, b"caf\xe9"));
        let Event::Change { path, .. } = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(path.as_os_str().as_bytes(), b"/srv/data/d/caf\xe9");
    }

    #[test]
    fn rename_event_gives_both_paths_and_moves_cached_directories() {
        let mut t = translator();
        let ev = dir_renamed(b"d", b"e");
        assert_eq!(
            run(&mut t, &ev),
            [
                change(ChangeKind::MovedFrom, "/srv/data/d", true),
                change(ChangeKind::MovedTo, "/srv/data/e", true),
                // The rename as one operation, for targets that can replay it.
                Event::Renamed {
                    from: "/srv/data/d".into(),
                    to: "/srv/data/e".into(),
                    is_dir: true
                }
            ]
        );
        // The moved directory's cached path moved with it (it may be deleted before the
        // events inside it are read, and then its handle no longer resolves); the root's
        // path is still right.
        assert_eq!(t.resolver.cached(), 2);
        let out = run(&mut t, &dirent(FAN_DELETE, DIR, b"f"));
        assert_eq!(out, [change(ChangeKind::Deleted, "/srv/data/e/f", false)]);
        let out = run(&mut t, &dirent(FAN_CREATE, ROOT, b"g"));
        assert_eq!(out, [change(ChangeKind::Created, "/srv/data/g", false)]);
    }

    #[test]
    fn moved_directory_without_rename_events_drops_the_cache_too() {
        let mut t = translator();
        let out = run(&mut t, &dirent(FAN_MOVED_FROM | FAN_ONDIR, ROOT, b"d"));
        assert_eq!(out, [change(ChangeKind::MovedFrom, "/srv/data/d", true)]);
        assert_eq!(t.resolver.cached(), 1);
    }

    #[test]
    fn unresolvable_handle_rescans_the_roots_of_its_filesystem() {
        let mut t = translator();
        let out = run(&mut t, &dirent(FAN_CREATE, UNKNOWN, b"f"));
        assert_eq!(
            out,
            [Event::Rescan {
                path: "/srv/data".into()
            }]
        );
    }

    #[test]
    fn a_directory_deleted_where_it_cannot_be_named_keeps_the_other_paths() {
        // A `rm -rf` elsewhere on the filesystem: the parent is gone by the time the event
        // is read. The paths cached for other directories stay, so a directory renamed
        // and then deleted still names what was deleted inside it.
        let mut t = translator();
        let out = run(&mut t, &dirent(FAN_DELETE | FAN_ONDIR, UNKNOWN, b"x"));
        assert!(out.iter().all(|e| matches!(e, Event::Rescan { .. })));
        assert_eq!(t.resolver.cached(), 2);
        let ev = dir_renamed(b"d", b"d2");
        run(&mut t, &ev);
        let out = run(&mut t, &dirent(FAN_DELETE, DIR, b"f"));
        assert_eq!(out, [change(ChangeKind::Deleted, "/srv/data/d2/f", false)]);
    }

    #[test]
    fn overflow_rescans_everything_and_forgets_paths() {
        let mut t = translator();
        let mut ev = FidEvent::new();
        ev.set_mask(FAN_Q_OVERFLOW);
        assert_eq!(run(&mut t, &ev), [Event::Overflow]);
        assert_eq!(t.resolver.cached(), 0);
    }

    #[test]
    fn event_without_filesystem_id_rescans() {
        let mut t = translator();
        let mut ev = FidEvent::new();
        ev.set_mask(FAN_CREATE);
        assert_eq!(
            run(&mut t, &ev),
            [Event::Rescan {
                path: "/srv/data".into()
            }]
        );
    }

    #[test]
    fn a_new_directory_is_remembered_from_its_own_handle() {
        const NEW: &[u8] = b"handle-new";
        let mut t = translator();
        let mut ev = dirent(FAN_CREATE | FAN_ONDIR, DIR, b"sub");
        ev.set_self_handle(NEW);
        assert_eq!(
            run(&mut t, &ev),
            [change(ChangeKind::Created, "/srv/data/d/sub", true)]
        );
        // Events inside it resolve from the cache, even once it is deleted on disk.
        let out = run(&mut t, &dirent(FAN_DELETE, NEW, b"f"));
        assert_eq!(
            out,
            [change(ChangeKind::Deleted, "/srv/data/d/sub/f", false)]
        );
        // Its removal forgets it.
        run(&mut t, &dirent(FAN_DELETE | FAN_ONDIR, DIR, b"sub"));
        let out = run(&mut t, &dirent(FAN_DELETE, NEW, b"g"));
        assert_eq!(
            out,
            [Event::Rescan {
                path: "/srv/data".into()
            }]
        );
    }
}
