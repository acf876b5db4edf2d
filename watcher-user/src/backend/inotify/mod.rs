//! The recursive-inotify backend: one watch per directory, for kernels and filesystems that
//! fanotify cannot serve (Linux before 5.9, filesystems without file handles, no
//! CAP_SYS_ADMIN).
//!
//! Start-up walks every root and adds a watch per directory; each pins 1-2 KB of kernel
//! memory and counts against `fs.inotify.max_user_watches`, so the start is refused when
//! the tree does not fit. Directories that appear later are walked and watched as they
//! appear. A directory renamed within the tree keeps its watches: the map from watch to
//! path is a tree of (parent, name) links, so a rename relinks one node.
//!
//! inotify records do not say which process made a change, so the daemon's own writes
//! cannot be dropped by pid here; they go to targets, which never lie inside a source.
//!
//! This file holds the running backend (events -> tree updates and [`Event`]s, timers);
//! `watch_tree` maps watches to paths, `moves` pairs the halves of renames, `walk` watches
//! a tree, `records` parses what a read returns, `limits` and `check` say whether a tree
//! fits in the watches left.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::mountinfo::{Fence, MountWatch};
use super::read_loop::{self, EventSource, OwnFilter, POLL_INTERVAL};
use super::{Backend, BackendError, OwnPids, join_name, mask};
use crate::event::{ChangeKind, Event};
use moves::{MovePairing, RenameHalves};
use records::{RawEvent, parse_events};
use walk::{Job, Walk, WalkOutcome};
use watch_tree::WatchTree;

pub use check::check;
pub(crate) use limits::kernel_memory;
pub use limits::{WatchLimits, watches_in_use};

mod check;
mod limits;
mod moves;
mod records;
mod walk;
mod watch_tree;

/// What every directory watch reports. IN_ONLYDIR and IN_DONT_FOLLOW make a directory
/// replaced by a file or symlink between listing and watching fail instead of being
/// followed; IN_EXCL_UNLINK drops events on files already unlinked but still open.
const WATCH_MASK: AddWatchFlags = AddWatchFlags::from_bits_retain(
    libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_MOVED_FROM
        | libc::IN_MOVED_TO
        | libc::IN_CLOSE_WRITE
        | libc::IN_MODIFY
        | libc::IN_ATTRIB
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF
        | libc::IN_DONT_FOLLOW
        | libc::IN_ONLYDIR
        | libc::IN_EXCL_UNLINK,
);

/// Read buffer: many events per syscall on a deep queue.
const READ_BUF_BYTES: usize = 256 * 1024;

/// How long a directory's MOVED_FROM waits for the MOVED_TO with its cookie; both are
/// queued by the same rename, so anything longer means it left the watched tree.
const MOVE_GRACE: Duration = Duration::from_millis(50);

/// How often subtrees that could not be watched are retried and rescanned meanwhile.
const RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// `inotify_rm_watch` by raw number: nix's takes its own descriptor type, which cannot be
/// built from the number an event carries.
fn rm_watch(inotify: &Inotify, wd: i32) -> Result<(), Errno> {
    // SAFETY: plain syscall on a descriptor we own; it takes no pointers.
    let res = unsafe { libc::inotify_rm_watch(inotify.as_fd().as_raw_fd(), wd) };
    Errno::result(res).map(drop)
}

/// A new inotify instance, or why the kernel refuses one.
fn init() -> Result<Inotify, BackendError> {
    Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).map_err(|e| {
        let reason = match e {
            Errno::EMFILE => "inotify_init1: this user holds fs.inotify.max_user_instances \
                              instances already"
                .to_string(),
            Errno::ENOSYS => "inotify_init1 is not implemented by this kernel".to_string(),
            _ => "inotify_init1 failed".to_string(),
        };
        BackendError::InotifyUnavailable {
            reason,
            source: e.into(),
        }
    })
}

/// An inotify instance with a watch on every directory under the roots.
pub struct InotifyBackend {
    inotify: Inotify,
    /// Where reads land.
    buf: Vec<u8>,
    /// Handed to the read loop. inotify records do not say which process made a change,
    /// so nothing is dropped by pid: the daemon's rsync writes go to targets, which never
    /// lie inside a source.
    own_pids: Arc<OwnPids>,
    tree: WatchTree,
    moves: MovePairing,
    renames: RenameHalves,
    /// Roots as given (nested ones dropped: their parent root covers them).
    roots: Vec<PathBuf>,
    /// Watches removed by us: their IN_IGNORED is expected.
    removing: HashSet<i32>,
    /// Watches whose directory reported IN_DELETE_SELF: their IN_IGNORED is expected.
    deleted: HashSet<i32>,
    /// Subtrees not (fully) watched: retried, and rescanned meanwhile, every RETRY_INTERVAL.
    unwatched: BTreeSet<PathBuf>,
    next_retry: Option<Instant>,
    /// When the watch limit was last reported: once per retry interval, not per directory.
    limit_logged: Option<Instant>,
    /// The mount table, followed below every root: a filesystem mounted over a watched
    /// directory reports nothing to that watch, so its tree is walked and rescanned. (One
    /// unmounted drops its watches: IN_IGNORED rewatches the directory below.)
    mounts: Option<MountWatch>,
    /// Mount points below `one_file_system` roots: events below them are dropped.
    fence: Fence,
}

/// Roots without those lying inside another root.
fn outermost(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut sorted: Vec<PathBuf> = roots.to_vec();
    sorted.sort();
    let mut kept: Vec<PathBuf> = Vec::new();
    for root in sorted {
        if !kept.iter().any(|k| root.starts_with(k)) {
            kept.push(root);
        }
    }
    kept
}

impl InotifyBackend {
    /// Watches every directory under `roots` (absolute, canonical directories), or refuses
    /// when they need more watches than `fs.inotify.max_user_watches` leaves.
    /// Mounts below the roots in `stop_at_mounts` are left out.
    pub fn start(
        roots: &[PathBuf],
        stop_at_mounts: &[PathBuf],
        own_pids: Arc<OwnPids>,
    ) -> Result<Self, BackendError> {
        let mut backend = Self::start_with(roots, WatchLimits::read()?, own_pids)?;
        backend.fence = Fence::new(stop_at_mounts);
        backend.mounts = match MountWatch::new(roots.to_vec()) {
            Ok(watch) => Some(watch),
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow /proc/self/mountinfo: filesystems mounted below a root later are not seen");
                None
            }
        };
        Ok(backend)
    }

    fn start_with(
        roots: &[PathBuf],
        limits: WatchLimits,
        own_pids: Arc<OwnPids>,
    ) -> Result<Self, BackendError> {
        let inotify = init()?;
        let roots = outermost(roots);
        let started = Instant::now();
        let available = limits.available();
        let mut walk = Walk::new(Some(&inotify), "start");
        walk.budget = available;
        walk.count_past_limit = true;
        let jobs = roots
            .iter()
            .map(|r| Job {
                path: r.clone(),
                parent: None,
                name: r.clone().into_os_string(),
            })
            .collect();
        let outcome = walk.run(jobs);
        let hit_limit = outcome.failures.iter().any(|f| f.errno == Errno::ENOSPC);
        if outcome.dirs > available || hit_limit {
            // Dropping `inotify` releases the watches added so far.
            return Err(BackendError::InotifyWatchLimit {
                roots: roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                needed: outcome.dirs,
                available,
                max: limits.max,
                in_use: limits.in_use,
            });
        }
        let mut backend = InotifyBackend {
            inotify,
            buf: vec![0u8; READ_BUF_BYTES],
            own_pids,
            tree: WatchTree::default(),
            moves: MovePairing::default(),
            renames: RenameHalves::default(),
            roots,
            removing: HashSet::new(),
            deleted: HashSet::new(),
            unwatched: BTreeSet::new(),
            next_retry: None,
            limit_logged: None,
            mounts: None,
            fence: Fence::default(),
        };
        if let Some(f) = outcome
            .failures
            .iter()
            .find(|f| backend.roots.contains(&f.path))
        {
            return Err(BackendError::Syscall {
                call: f.call,
                path: f.path.clone(),
                source: f.errno.into(),
            });
        }
        // A root that vanished or is no directory is skipped quietly by the walk.
        if let Some(root) = backend.roots.iter().find(|root| {
            !outcome
                .records
                .iter()
                .any(|r| r.parent.is_none() && r.name == root.as_os_str())
        }) {
            return Err(BackendError::Syscall {
                call: "inotify_add_watch",
                path: root.clone(),
                source: Errno::ENOENT.into(),
            });
        }
        let dirs = outcome.dirs;
        // Problems below the roots were logged and queued for retries; the initial full
        // sync covers them.
        backend.apply(outcome, &mut Vec::new());
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            roots = backend.roots.len(),
            watches = backend.tree.len(),
            dirs,
            elapsed_ms = (secs * 1000.0) as u64,
            watches_free = available.saturating_sub(backend.tree.len() as u64),
            "inotify watches set"
        );
        Ok(backend)
    }

    /// Number of directories watched.
    pub fn watches(&self) -> usize {
        self.tree.len()
    }

    /// Removes watches we no longer want; their IN_IGNORED then needs no action.
    fn forget(&mut self, wds: impl IntoIterator<Item = i32>) {
        for wd in wds {
            // EINVAL: the kernel dropped it already (its directory was deleted).
            if rm_watch(&self.inotify, wd).is_ok() {
                self.removing.insert(wd);
            }
        }
    }

    fn schedule_retry(&mut self, path: PathBuf) {
        // A retry of an ancestor walks this one too.
        if !path.ancestors().any(|a| self.unwatched.contains(a)) {
            self.unwatched.insert(path);
        }
        if self.next_retry.is_none() {
            self.next_retry = Some(Instant::now() + RETRY_INTERVAL);
        }
    }

    /// Puts a walk's watches into the tree and deals with what it could not watch.
    fn apply(&mut self, outcome: WalkOutcome, out: &mut Vec<Event>) {
        let mut placed = HashSet::with_capacity(outcome.records.len());
        let mut displaced = Vec::new();
        for r in outcome.records {
            match self.tree.place(r.wd, r.parent, r.name) {
                Some(stale) => {
                    displaced.extend(stale);
                    placed.insert(r.wd);
                    if !self.moves.is_empty() {
                        self.moves.cancel(r.wd);
                    }
                }
                None => {
                    // Its parent went away meanwhile (or it loops back): not ours to keep.
                    if !self.tree.contains(r.wd) {
                        self.forget([r.wd]);
                    }
                }
            }
        }
        // A stale watch may have been found again further on in the same walk.
        let stale: Vec<i32> = displaced
            .into_iter()
            .filter(|wd| !placed.contains(wd) && !self.tree.contains(*wd))
            .collect();
        self.forget(stale);
        for f in outcome.failures {
            let retry = matches!(
                f.errno,
                Errno::ENOSPC | Errno::EMFILE | Errno::ENFILE | Errno::ENOMEM
            );
            if f.errno == Errno::ENOSPC {
                let now = Instant::now();
                if self
                    .limit_logged
                    .is_none_or(|at| now.duration_since(at) >= RETRY_INTERVAL)
                {
                    self.limit_logged = Some(now);
                    tracing::error!(
                        path = %f.path.display(),
                        sysctl = "fs.inotify.max_user_watches",
                        watches = self.tree.len(),
                        unwatched = self.unwatched.len() + 1,
                        retry_s = RETRY_INTERVAL.as_secs(),
                        "inotify watch limit reached: changes in new directories are not seen; \
                         raise fs.inotify.max_user_watches. Rescanning them periodically until then"
                    );
                } else {
                    tracing::debug!(path = %f.path.display(), "inotify watch limit reached");
                }
            } else {
                tracing::warn!(
                    path = %f.path.display(),
                    call = f.call,
                    error = %io::Error::from(f.errno),
                    retry,
                    "cannot watch a directory; rescanning it"
                );
            }
            out.push(Event::Rescan {
                path: f.path.clone(),
            });
            if retry {
                self.schedule_retry(f.path);
            }
        }
    }

    /// Walks `path` and watches what is not watched yet below it; `path` goes in the tree
    /// below its deepest watched ancestor.
    fn rewatch(&mut self, path: &Path, out: &mut Vec<Event>) {
        let job = if let Some(root) = self.roots.iter().find(|r| path.starts_with(r)) {
            match self.tree.deepest(path) {
                None => Job {
                    path: root.clone(),
                    parent: None,
                    name: root.clone().into_os_string(),
                },
                Some((wd, missing)) => match missing.first() {
                    Some(name) => match self.tree.path(wd) {
                        Some(dir) => Job {
                            path: dir.join(name),
                            parent: Some(wd),
                            name: name.to_os_string(),
                        },
                        None => return,
                    },
                    None => match self.tree.link(wd) {
                        Some((parent, name)) => Job {
                            path: path.to_path_buf(),
                            parent,
                            name: name.to_os_string(),
                        },
                        None => return,
                    },
                },
            }
        } else {
            return;
        };
        let outcome = Walk::new(Some(&self.inotify), "rewatch").run(vec![job]);
        self.apply(outcome, out);
    }

    /// Rewatches every root after lost events: the tree is rebuilt from what is on disk,
    /// and watches of directories no longer there are removed.
    fn rebuild(&mut self, out: &mut Vec<Event>) {
        let started = Instant::now();
        let jobs = self
            .roots
            .iter()
            .map(|r| Job {
                path: r.clone(),
                parent: None,
                name: r.clone().into_os_string(),
            })
            .collect();
        let outcome = Walk::new(Some(&self.inotify), "rebuild").run(jobs);
        let old = std::mem::take(&mut self.tree);
        self.moves.clear();
        self.renames.clear();
        self.apply(outcome, out);
        let stale: Vec<i32> = old.wds().filter(|wd| !self.tree.contains(*wd)).collect();
        let dropped = stale.len();
        self.forget(stale);
        tracing::info!(
            watches = self.tree.len(),
            dropped,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "inotify watches rebuilt"
        );
    }

    /// Watches a directory that appeared at `name` in `parent` (created, or moved in
    /// from outside) with everything below it.
    fn watch_new(&mut self, parent: i32, name: &OsStr, path: PathBuf, out: &mut Vec<Event>) {
        let job = Job {
            path,
            parent: Some(parent),
            name: name.to_os_string(),
        };
        let outcome = Walk::new(Some(&self.inotify), "new directory").run(vec![job]);
        self.apply(outcome, out);
    }

    /// Appends what one read's worth of records means to `out`.
    fn handle_batch(&mut self, bytes: &[u8], out: &mut Vec<Event>) {
        let now = Instant::now();
        let mut overflow = false;
        for ev in parse_events(bytes) {
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                overflow = true;
                continue;
            }
            self.handle(ev, now, out);
        }
        if overflow {
            tracing::warn!("inotify queue overflow: rewatching and rescanning every root");
            self.rebuild(out);
            // After the rebuild: every change from here on is seen, every earlier one is
            // covered by the full rescan this asks for.
            out.push(Event::Overflow);
        }
    }

    fn handle(&mut self, ev: RawEvent<'_>, now: Instant, out: &mut Vec<Event>) {
        if ev.mask & libc::IN_IGNORED != 0 {
            self.on_ignored(ev.wd, out);
            return;
        }
        // An unknown watch was dropped from the map already (moved out, deleted): what
        // happened inside is covered by its parent's event.
        let Some(dir) = self.tree.path(ev.wd) else {
            return;
        };
        if ev.name.is_empty() {
            self.on_self_event(ev.wd, ev.mask, dir, out);
            return;
        }
        let is_dir = ev.mask & libc::IN_ISDIR != 0;
        let Some(kind) = mask::change_kind(ev.mask.into()) else {
            return;
        };
        let path = join_name(&dir, ev.name);
        out.push(Event::Change {
            kind,
            path: path.clone(),
            is_dir,
            pid: 0,
        });
        match kind {
            ChangeKind::MovedFrom => self.renames.moved_from(ev.cookie, path.clone(), is_dir),
            ChangeKind::MovedTo => {
                if let Some(from) = self.renames.moved_to(ev.cookie, is_dir) {
                    // After both halves, as fanotify reports it.
                    out.push(Event::Renamed {
                        from,
                        to: path.clone(),
                        is_dir,
                    });
                }
            }
            _ => {}
        }
        if !is_dir {
            return;
        }
        match kind {
            ChangeKind::Created => self.watch_new(ev.wd, ev.name, path, out),
            ChangeKind::MovedFrom => {
                if let Some(child) = self.tree.child(ev.wd, ev.name) {
                    self.moves.moved_from(ev.cookie, child, now);
                }
            }
            ChangeKind::MovedTo => {
                let moved = self
                    .moves
                    .moved_to(ev.cookie)
                    .filter(|wd| self.tree.contains(*wd))
                    .and_then(|wd| self.tree.place(wd, Some(ev.wd), ev.name.to_os_string()));
                match moved {
                    // Moved within the tree: its watches came along.
                    Some(stale) => self.forget(stale),
                    None => self.watch_new(ev.wd, ev.name, path, out),
                }
            }
            ChangeKind::Deleted => {
                // The kernel drops the watches of deleted directories itself.
                if let Some(child) = self.tree.child(ev.wd, ev.name) {
                    self.tree.remove_subtree(child);
                }
            }
            ChangeKind::Modified | ChangeKind::CloseWrite | ChangeKind::Attrib => {}
        }
    }

    /// An event about a watched directory itself. Only roots matter: every other
    /// directory's change is reported by its parent too.
    fn on_self_event(&mut self, wd: i32, mask: u32, dir: PathBuf, out: &mut Vec<Event>) {
        if mask & libc::IN_DELETE_SELF != 0 {
            self.deleted.insert(wd);
        }
        if !self.tree.is_root(wd) {
            return;
        }
        if mask & libc::IN_DELETE_SELF != 0 {
            tracing::error!(root = %dir.display(), "a source root was deleted");
            out.push(Event::Rescan { path: dir.clone() });
            self.schedule_retry(dir);
        } else if mask & libc::IN_MOVE_SELF != 0 {
            // The watches follow the moved directory, so every path they give is wrong now.
            tracing::warn!(root = %dir.display(), "a source root was moved away; watching its path again when it is back");
            let wds = self.tree.remove_subtree(wd);
            self.forget(wds);
            out.push(Event::Rescan { path: dir.clone() });
            self.schedule_retry(dir);
        } else if mask & libc::IN_ATTRIB != 0 {
            out.push(Event::Change {
                kind: ChangeKind::Attrib,
                path: dir,
                is_dir: true,
                pid: 0,
            });
        }
    }

    /// The kernel dropped a watch: expected after we removed it or its directory was
    /// deleted; otherwise (an unmount, say) the subtree is watched again and rescanned.
    fn on_ignored(&mut self, wd: i32, out: &mut Vec<Event>) {
        if self.removing.remove(&wd) {
            return;
        }
        let deleted = self.deleted.remove(&wd);
        let Some(path) = self.tree.path(wd) else {
            return;
        };
        let mut wds = self.tree.remove_subtree(wd);
        wds.retain(|w| *w != wd);
        self.forget(wds);
        if deleted {
            return;
        }
        tracing::warn!(path = %path.display(), "the kernel dropped a watch (unmounted?); watching again and rescanning");
        if path.is_dir() {
            self.rewatch(&path, out);
        }
        out.push(Event::Rescan { path });
    }

    /// Timer work: moves whose directory left the tree, and retries of unwatched subtrees.
    fn on_timers(&mut self, now: Instant, out: &mut Vec<Event>) {
        let gone = self.moves.expire(now, MOVE_GRACE);
        for wd in gone {
            let wds = self.tree.remove_subtree(wd);
            self.forget(wds);
        }
        if self.next_retry.is_some_and(|at| at <= now) {
            self.next_retry = None;
            let before = self.tree.len();
            let mut recovered = 0;
            for path in std::mem::take(&mut self.unwatched) {
                if !path.is_dir() {
                    // A root may come back; anything else that is gone was deleted.
                    if self.roots.contains(&path) {
                        self.schedule_retry(path);
                    }
                    continue;
                }
                let pending = self.unwatched.len();
                // Watch first, then rescan: changes after the watch are seen, earlier
                // ones are covered by the rescan.
                self.rewatch(&path, out);
                if self.unwatched.len() == pending {
                    recovered += 1;
                }
                out.push(Event::Rescan { path });
            }
            if recovered > 0 {
                tracing::info!(
                    subtrees = recovered,
                    still_unwatched = self.unwatched.len(),
                    added = self.tree.len().saturating_sub(before),
                    watches = self.tree.len(),
                    "watching again"
                );
            }
        }
    }

    /// How long the read loop may wait for events before a timer is due.
    fn wait_time(&self, now: Instant) -> Duration {
        [self.moves.next_deadline(MOVE_GRACE), self.next_retry]
            .into_iter()
            .flatten()
            .map(|at| at.saturating_duration_since(now))
            .fold(POLL_INTERVAL, Duration::min)
    }
}

impl EventSource for InotifyBackend {
    fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// inotify records carry no process id: `_own` is never consulted.
    fn read(&mut self, _own: &mut OwnFilter<'_>, out: &mut Vec<Event>) -> io::Result<usize> {
        let mut buf = std::mem::take(&mut self.buf);
        let read = nix::unistd::read(&self.inotify, &mut buf);
        if let Ok(n) = read {
            let from = out.len();
            self.handle_batch(&buf[..n], out);
            self.fence.drop_fenced(out, from);
        }
        self.buf = buf;
        Ok(read?)
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Event>) -> Duration {
        let from = out.len();
        self.on_timers(now, out);
        self.fence.drop_fenced(out, from);
        self.wait_time(now)
    }

    fn mounts_fd(&self) -> Option<BorrowedFd<'_>> {
        self.mounts.as_ref().map(MountWatch::fd)
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
        for m in &self.fence.update(&changes).appeared {
            let mp = &m.mount_point;
            tracing::info!(mount_point = %mp.display(), fstype = %m.fstype, "filesystem mounted below a root: watching and rescanning it");
            self.rewatch(mp, out);
            out.push(Event::Rescan { path: mp.clone() });
        }
    }
}

impl Backend for InotifyBackend {
    fn name(&self) -> &'static str {
        "inotify"
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn nested_roots_are_covered_by_the_outer_one() {
        let roots = [
            PathBuf::from("/a/b"),
            PathBuf::from("/a"),
            PathBuf::from("/ab"),
        ];
        assert_eq!(
            outermost(&roots),
            [PathBuf::from("/a"), PathBuf::from("/ab")]
        );
    }

    #[test]
    fn watches_in_use_counts_our_own() {
        let ino = init().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        ino.add_watch(dir.path(), WATCH_MASK).unwrap();
        ino.add_watch(&dir.path().join("d"), WATCH_MASK).unwrap();
        assert!(watches_in_use(nix::unistd::geteuid().as_raw()) >= 2);
    }

    #[test]
    fn start_refuses_a_tree_that_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for d in ["a/b/c", "d/e"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let limits = WatchLimits { max: 10, in_use: 7 };
        let err = InotifyBackend::start_with(std::slice::from_ref(&root), limits, Arc::default())
            .err()
            .unwrap();
        match &err {
            BackendError::InotifyWatchLimit {
                needed, available, ..
            } => assert_eq!((*needed, *available), (6, 3)),
            other => panic!("{other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("fs.inotify.max_user_watches"), "{text}");
        assert!(text.contains("6-12 KiB of kernel memory"), "{text}");
        // With room for it, the same tree is watched.
        let ok = InotifyBackend::start_with(
            std::slice::from_ref(&root),
            WatchLimits {
                max: 100,
                in_use: 0,
            },
            Arc::default(),
        )
        .unwrap();
        assert_eq!(ok.watches(), 6);
    }

    #[test]
    fn a_wide_tree_is_walked_in_parallel() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for i in 0..300 {
            std::fs::create_dir_all(root.join(format!("d{i}/sub"))).unwrap();
        }
        let b = InotifyBackend::start_with(
            std::slice::from_ref(&root),
            WatchLimits {
                max: 10_000,
                in_use: 0,
            },
            Arc::default(),
        )
        .unwrap();
        assert_eq!(b.watches(), 601);
        assert!(b.tree.lookup(&root.join("d299/sub")).is_some());
    }

    /// A started backend on a thread, its events on a channel.
    struct Running {
        events: mpsc::Receiver<Vec<Event>>,
        seen: Vec<Event>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<Result<(), BackendError>>>,
    }

    impl Running {
        fn start(root: &Path) -> Running {
            let backend = Box::new(
                InotifyBackend::start(&[root.to_path_buf()], &[], Arc::new(OwnPids::new()))
                    .unwrap(),
            );
            let (tx, events) = mpsc::channel();
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let thread =
                std::thread::spawn(move || backend.run(&mut |batch| tx.send(batch).is_ok(), &flag));
            Running {
                events,
                seen: Vec::new(),
                stop,
                thread: Some(thread),
            }
        }

        /// Waits (up to a deadline) for an event at index `from` or later matching `want`;
        /// returns its index.
        fn wait_from(&mut self, from: usize, what: &str, want: impl Fn(&Event) -> bool) -> usize {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(i) = self.seen.iter().skip(from).position(&want) {
                    return from + i;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match self.events.recv_timeout(left) {
                    Ok(batch) => self.seen.extend(batch),
                    Err(_) => panic!("no {what} event; saw {:#?}", self.seen),
                }
            }
        }

        /// Waits for an event not seen before matching `want`.
        fn wait_new(&mut self, what: &str, want: impl Fn(&Event) -> bool) -> usize {
            self.wait_from(self.seen.len(), what, want)
        }

        fn stop(mut self) {
            self.stop.store(true, Ordering::Relaxed);
            let result = self.thread.take().unwrap().join().unwrap();
            result.unwrap();
        }
    }

    fn is(kind: ChangeKind, p: &Path, dir: bool) -> impl Fn(&Event) -> bool {
        let p = p.to_path_buf();
        move |e| {
            matches!(e, Event::Change { kind: k, path, is_dir, pid: 0 }
                if *k == kind && *path == p && *is_dir == dir)
        }
    }

    #[test]
    fn live_tree_follows_new_and_renamed_directories() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let p = |rel: &str| root.join(rel);
        let mut r = Running::start(&root);

        // mkdir -p a/b/c && echo x > a/b/c/f: the new directory is reported as a whole...
        std::fs::create_dir_all(p("a/b/c")).unwrap();
        std::fs::write(p("a/b/c/f"), "x").unwrap();
        r.wait_new("created a", is(ChangeKind::Created, &p("a"), true));
        // ...and every directory below it is watched once a later event in the root is
        // seen: the walks started by earlier events are done by then.
        std::fs::write(p("barrier"), "").unwrap();
        r.wait_from(0, "barrier", is(ChangeKind::Created, &p("barrier"), false));
        std::fs::write(p("a/b/c/g"), "y").unwrap();
        r.wait_new(
            "write in a/b/c",
            is(ChangeKind::Modified, &p("a/b/c/g"), false),
        );

        // A renamed directory keeps its watches, under the new path.
        let before = r.seen.len();
        std::fs::rename(p("a"), p("z")).unwrap();
        std::fs::write(p("z/b/c/h"), "z").unwrap();
        let from = r.wait_from(
            before,
            "moved_from a",
            is(ChangeKind::MovedFrom, &p("a"), true),
        );
        let to = r.wait_from(before, "moved_to z", is(ChangeKind::MovedTo, &p("z"), true));
        let h = r.wait_from(
            before,
            "created z/b/c/h",
            is(ChangeKind::Created, &p("z/b/c/h"), false),
        );
        assert!(from < to && to < h, "{:#?}", r.seen);
        let stale =
            |e: &Event| matches!(e, Event::Change { path, .. } if path.ends_with("a/b/c/h"));
        assert!(!r.seen.iter().any(stale), "{:#?}", r.seen);

        // Out of the tree and back in under another name, quickly (the watches are still
        // waiting for a MOVED_TO) and after the move away expired (they were removed):
        // the pause only picks the path through the code, both must give the same events.
        let mut name = "z";
        for (next, pause) in [("y", Duration::ZERO), ("x", MOVE_GRACE + POLL_INTERVAL)] {
            std::fs::rename(p(name), outside.path().join(name)).unwrap();
            r.wait_new("moved_from", is(ChangeKind::MovedFrom, &p(name), true));
            std::thread::sleep(pause);
            std::fs::rename(outside.path().join(name), p(next)).unwrap();
            r.wait_new("moved_to", is(ChangeKind::MovedTo, &p(next), true));
            // Past any expiry, which must not take the watches of a directory back in.
            std::thread::sleep(MOVE_GRACE + POLL_INTERVAL);
            let new = format!("{next}/b/c/new");
            std::fs::create_dir(p(&new)).unwrap();
            r.wait_new("created new", is(ChangeKind::Created, &p(&new), true));
            std::fs::remove_dir(p(&new)).unwrap();
            r.wait_new("deleted new", is(ChangeKind::Deleted, &p(&new), true));
            name = next;
        }

        // A deleted subtree reports its deletion and leaves no stale watch behind.
        std::fs::remove_dir_all(p("x")).unwrap();
        r.wait_new("deleted x", is(ChangeKind::Deleted, &p("x"), true));
        std::fs::create_dir(p("x")).unwrap();
        std::fs::write(p("x/again"), "").unwrap();
        r.wait_new("created x again", is(ChangeKind::Created, &p("x"), true));
        let lost = |e: &Event| matches!(e, Event::Rescan { .. } | Event::Overflow);
        assert!(!r.seen.iter().any(lost), "{:#?}", r.seen);
        r.stop();
    }
}
