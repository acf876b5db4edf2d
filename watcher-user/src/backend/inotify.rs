//! The recursive-inotify backend: one watch per directory, for kernels and filesystems that
//! fanotify cannot serve (Linux before 5.9, filesystems without file handles, no
//! CAP_SYS_ADMIN).
//!
//! Start-up walks every root and adds a watch per directory; each pins 1-2 KB of kernel
//! memory and counts against `fs.inotify.max_user_watches`, so the start is refused when
//! the tree does not fit. Directories that appear later are walked and watched as they
//! appear. A directory renamed within the tree keeps its watches: the map from watch to
//! path is a tree of (parent, name) links, so a rename relinks one node.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::read_loop::{self, EventSource, OwnFilter, POLL_INTERVAL};
use super::{Backend, BackendError, OwnPids, Support, join_name, mask};
use crate::event::{ChangeKind, Event};

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

const MAX_USER_WATCHES: &str = "/proc/sys/fs/inotify/max_user_watches";

/// Kernel memory one watch pins: the mark plus the inode and dentry it keeps in memory.
const WATCH_COST_LOW: u64 = 1024;
const WATCH_COST_HIGH: u64 = 2048;

/// Read buffer: many events per syscall on a deep queue.
const READ_BUF_BYTES: usize = 256 * 1024;

/// Size of `struct inotify_event` before its name.
const EVENT_HEADER: usize = 16;

/// How long a directory's MOVED_FROM waits for the MOVED_TO with its cookie; both are
/// queued by the same rename, so anything longer means it left the watched tree.
const MOVE_GRACE: Duration = Duration::from_millis(50);

/// How often subtrees that could not be watched are retried and rescanned meanwhile.
const RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// How often a long walk logs its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// Directories waiting to be listed before a walk starts helper threads; a single new
/// directory is cheaper to walk inline.
const PARALLEL_BACKLOG: usize = 64;

/// Kernel memory `watches` would pin, as a range for messages.
pub(crate) fn kernel_memory(watches: &u64) -> String {
    let (low, high) = (
        watches.saturating_mul(WATCH_COST_LOW),
        watches.saturating_mul(WATCH_COST_HIGH),
    );
    let (unit, shift) = if high >= 10 << 20 {
        ("MiB", 20)
    } else {
        ("KiB", 10)
    };
    format!(
        "about {}-{} {unit} of kernel memory",
        low >> shift,
        high.div_ceil(1 << shift)
    )
}

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

// ---------------------------------------------------------------------------------------
// Watch limits

/// `fs.inotify.max_user_watches` and how many watches this user holds already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchLimits {
    pub max: u64,
    pub in_use: u64,
}

impl WatchLimits {
    /// Reads the sysctl and counts the watches in use (see [`watches_in_use`]).
    pub fn read() -> Result<Self, BackendError> {
        let text =
            std::fs::read_to_string(MAX_USER_WATCHES).map_err(|source| BackendError::Syscall {
                call: "read",
                path: MAX_USER_WATCHES.into(),
                source,
            })?;
        let max = text.trim().parse().map_err(|_| BackendError::Syscall {
            call: "parse",
            path: MAX_USER_WATCHES.into(),
            source: io::Error::new(io::ErrorKind::InvalidData, text.trim().to_string()),
        })?;
        Ok(WatchLimits {
            max,
            in_use: watches_in_use(nix::unistd::geteuid().as_raw()),
        })
    }

    /// Watches that can still be added.
    pub fn available(&self) -> u64 {
        self.max.saturating_sub(self.in_use)
    }
}

/// Watches held by the processes of `uid`: the `inotify wd:` lines of every inotify
/// descriptor in /proc/*/fdinfo. The kernel charges watches to the effective uid that
/// created the instance; a process's current uid stands in for it, and an instance shared
/// by several descriptors or processes is counted for each, so this errs on the high side.
pub fn watches_in_use(uid: u32) -> u64 {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for proc in procs.flatten() {
        let name = proc.file_name();
        if !name.as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let dir = proc.path();
        if std::fs::metadata(&dir).map_or(true, |m| m.uid() != uid) {
            continue;
        }
        // Processes come and go: whatever cannot be read is skipped.
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_inotify = std::fs::read_link(fd.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:inotify");
            if !is_inotify {
                continue;
            }
            if let Ok(info) = std::fs::read(dir.join("fdinfo").join(fd.file_name())) {
                total += info
                    .split(|&b| b == b'\n')
                    .filter(|line| line.starts_with(b"inotify wd:"))
                    .count() as u64;
            }
        }
    }
    total
}

// ---------------------------------------------------------------------------------------
// Reading

/// One record as read from an inotify descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawEvent<'a> {
    wd: i32,
    mask: u32,
    cookie: u32,
    /// Empty for events about the watched directory itself.
    name: &'a OsStr,
}

/// Splits what one read returned into records; the kernel only returns whole ones.
fn parse_events(buf: &[u8]) -> Vec<RawEvent<'_>> {
    let field = |at: usize| -> [u8; 4] {
        let mut b = [0u8; 4];
        b.copy_from_slice(&buf[at..at + 4]);
        b
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at + EVENT_HEADER <= buf.len() {
        let wd = i32::from_ne_bytes(field(at));
        let mask = u32::from_ne_bytes(field(at + 4));
        let cookie = u32::from_ne_bytes(field(at + 8));
        let len = u32::from_ne_bytes(field(at + 12)) as usize;
        let end = (at + EVENT_HEADER + len).min(buf.len());
        // The name is NUL-padded to an aligned length.
        let raw = &buf[at + EVENT_HEADER..end];
        let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        out.push(RawEvent {
            wd,
            mask,
            cookie,
            name: OsStr::from_bytes(name),
        });
        at = end;
    }
    out
}

// ---------------------------------------------------------------------------------------
// The watch map

#[derive(Debug)]
struct Node {
    parent: Option<i32>,
    /// The entry name in the parent; a root's full path.
    name: OsString,
    children: HashMap<OsString, i32>,
}

/// Where every watched directory is: watch descriptor -> (parent watch, name). A path is
/// the names up to a root, so renaming a directory relinks one node and every watch below
/// it follows.
#[derive(Debug, Default)]
pub(crate) struct WatchTree {
    nodes: HashMap<i32, Node>,
    roots: HashMap<OsString, i32>,
}

impl WatchTree {
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn contains(&self, wd: i32) -> bool {
        self.nodes.contains_key(&wd)
    }

    pub(crate) fn is_root(&self, wd: i32) -> bool {
        self.nodes.get(&wd).is_some_and(|n| n.parent.is_none())
    }

    pub(crate) fn wds(&self) -> impl Iterator<Item = i32> + '_ {
        self.nodes.keys().copied()
    }

    pub(crate) fn child(&self, parent: i32, name: &OsStr) -> Option<i32> {
        self.nodes.get(&parent)?.children.get(name).copied()
    }

    /// The absolute path of `wd`'s directory.
    pub(crate) fn path(&self, wd: i32) -> Option<PathBuf> {
        let mut names = Vec::new();
        let mut cur = self.nodes.get(&wd)?;
        loop {
            names.push(&cur.name);
            match cur.parent {
                Some(p) => cur = self.nodes.get(&p)?,
                None => break,
            }
        }
        let mut path = PathBuf::with_capacity(names.iter().map(|n| n.len() + 1).sum());
        for name in names.iter().rev() {
            path.push(name);
        }
        Some(path)
    }

    /// Whether `wd` is `ancestor` or lies below it.
    fn is_within(&self, mut wd: i32, ancestor: i32) -> bool {
        loop {
            if wd == ancestor {
                return true;
            }
            match self.nodes.get(&wd).and_then(|n| n.parent) {
                Some(p) => wd = p,
                None => return false,
            }
        }
    }

    /// Puts `wd` at `name` in `parent` (a root when `parent` is None, `name` its path),
    /// moving it and its subtree if it is elsewhere. A different watch found at that spot
    /// is stale (its directory was replaced) and is dropped with its subtree; those
    /// watches are returned for removal. Returns None, changing nothing, when `parent` is
    /// unknown or lies within `wd` (a bind mount looping back).
    pub(crate) fn place(
        &mut self,
        wd: i32,
        parent: Option<i32>,
        name: OsString,
    ) -> Option<Vec<i32>> {
        if let Some(p) = parent
            && (!self.nodes.contains_key(&p) || self.is_within(p, wd))
        {
            return None;
        }
        if let Some(node) = self.nodes.get(&wd)
            && node.parent == parent
            && node.name == name
        {
            return Some(Vec::new());
        }
        let occupant = match parent {
            Some(p) => self.child(p, &name),
            None => self.roots.get(&name).copied(),
        };
        let displaced = match occupant {
            Some(other) if other != wd => self.remove_subtree(other),
            _ => Vec::new(),
        };
        match self.nodes.get_mut(&wd) {
            Some(node) => {
                let (old_parent, old_name) = (node.parent, std::mem::take(&mut node.name));
                node.parent = parent;
                node.name = name.clone();
                self.unlink(wd, old_parent, &old_name);
            }
            None => {
                self.nodes.insert(
                    wd,
                    Node {
                        parent,
                        name: name.clone(),
                        children: HashMap::new(),
                    },
                );
            }
        }
        match parent.and_then(|p| self.nodes.get_mut(&p)) {
            Some(p) => {
                p.children.insert(name, wd);
            }
            None => {
                self.roots.insert(name, wd);
            }
        }
        Some(displaced)
    }

    /// Removes the link from `parent`/`name` to `wd`, if it is still there.
    fn unlink(&mut self, wd: i32, parent: Option<i32>, name: &OsStr) {
        let links = match parent {
            Some(p) => match self.nodes.get_mut(&p) {
                Some(node) => &mut node.children,
                None => return,
            },
            None => &mut self.roots,
        };
        if links.get(name) == Some(&wd) {
            links.remove(name);
        }
    }

    /// Drops `wd` and everything below it; returns the dropped watches.
    pub(crate) fn remove_subtree(&mut self, wd: i32) -> Vec<i32> {
        let Some(node) = self.nodes.remove(&wd) else {
            return Vec::new();
        };
        self.unlink(wd, node.parent, &node.name);
        let mut removed = vec![wd];
        let mut stack: Vec<i32> = node.children.into_values().collect();
        while let Some(w) = stack.pop() {
            if let Some(n) = self.nodes.remove(&w) {
                removed.push(w);
                stack.extend(n.children.into_values());
            }
        }
        removed
    }

    /// The watch of the root `path` lies in, and the watch of the deepest watched
    /// directory on the way to `path` with the components still missing below it.
    fn deepest<'p>(&self, path: &'p Path) -> Option<(i32, Vec<&'p OsStr>)> {
        let (root, rest) = self.roots.iter().find_map(|(name, wd)| {
            let rest = path.strip_prefix(Path::new(name)).ok()?;
            Some((*wd, rest))
        })?;
        let mut cur = root;
        let mut names = rest.components().filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        });
        for name in names.by_ref() {
            match self.child(cur, name) {
                Some(w) => cur = w,
                None => {
                    let mut missing = vec![name];
                    missing.extend(names);
                    return Some((cur, missing));
                }
            }
        }
        Some((cur, Vec::new()))
    }

    /// The watch of `path`, if it has one.
    #[cfg(test)]
    pub(crate) fn lookup(&self, path: &Path) -> Option<i32> {
        match self.deepest(path)? {
            (wd, missing) if missing.is_empty() => Some(wd),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Rename pairing

/// Directories that left a watched directory, waiting for the MOVED_TO with the same
/// cookie that says where they went.
#[derive(Debug, Default)]
pub(crate) struct MovePairing {
    pending: HashMap<u32, (i32, Instant)>,
}

impl MovePairing {
    /// The directory watched by `wd` was moved away at `now` with `cookie`.
    pub(crate) fn moved_from(&mut self, cookie: u32, wd: i32, now: Instant) {
        self.pending.insert(cookie, (wd, now));
    }

    /// The watch of the directory that arrived with `cookie`, if it came from the tree.
    pub(crate) fn moved_to(&mut self, cookie: u32) -> Option<i32> {
        self.pending.remove(&cookie).map(|(wd, _)| wd)
    }

    /// `wd` was found in the tree again (moved back in under another cookie): it did not
    /// leave for good.
    pub(crate) fn cancel(&mut self, wd: i32) {
        self.pending.retain(|_, (w, _)| *w != wd);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Watches of directories that left the tree: no MOVED_TO within `grace`.
    pub(crate) fn expire(&mut self, now: Instant, grace: Duration) -> Vec<i32> {
        let mut gone = Vec::new();
        self.pending.retain(|_, (wd, at)| {
            let keep = now.saturating_duration_since(*at) < grace;
            if !keep {
                gone.push(*wd);
            }
            keep
        });
        gone
    }

    /// When the oldest pending move expires.
    pub(crate) fn next_deadline(&self, grace: Duration) -> Option<Instant> {
        self.pending.values().map(|(_, at)| *at + grace).min()
    }

    pub(crate) fn clear(&mut self) {
        self.pending.clear();
    }
}

// ---------------------------------------------------------------------------------------
// Walking

/// A directory to watch and list: its path and where it goes in the tree.
#[derive(Debug)]
struct Job {
    path: PathBuf,
    parent: Option<i32>,
    name: OsString,
}

/// A watch added by a walk, in the order added: a parent always before its children.
#[derive(Debug)]
struct Record {
    wd: i32,
    parent: Option<i32>,
    name: OsString,
}

/// A directory a walk could not watch or list.
#[derive(Debug)]
struct Failure {
    path: PathBuf,
    call: &'static str,
    errno: Errno,
}

#[derive(Debug, Default)]
struct WalkState {
    records: Vec<Record>,
    seen: HashSet<i32>,
    failures: Vec<Failure>,
}

/// What a walk found.
#[derive(Debug, Default)]
struct WalkOutcome {
    records: Vec<Record>,
    /// Directories found, watched or only counted.
    dirs: u64,
    failures: Vec<Failure>,
}

#[derive(Debug)]
struct Queue {
    jobs: Vec<Job>,
    busy: usize,
}

/// Watches (or only counts) every directory below some starting points.
struct Walk<'a> {
    /// None: count only.
    inotify: Option<&'a Inotify>,
    /// Watches this walk may add; past it, directories are only counted.
    budget: u64,
    /// Keep counting after the watch limit was hit (to say how many are needed).
    count_past_limit: bool,
    what: &'static str,
    dirs: AtomicU64,
    /// The kernel refused a watch with ENOSPC.
    full: AtomicBool,
    state: Mutex<WalkState>,
    started: Instant,
    last_log: Mutex<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Threads listing directories: twice the cores, so a cold cache keeps the disk busy.
fn walk_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .saturating_mul(2)
        .clamp(2, 16)
}

impl<'a> Walk<'a> {
    fn new(inotify: Option<&'a Inotify>, what: &'static str) -> Self {
        let now = Instant::now();
        Walk {
            inotify,
            budget: u64::MAX,
            count_past_limit: false,
            what,
            dirs: AtomicU64::new(0),
            full: AtomicBool::new(false),
            state: Mutex::new(WalkState::default()),
            started: now,
            last_log: Mutex::new(now),
        }
    }

    fn run(self, jobs: Vec<Job>) -> WalkOutcome {
        let mut stack = jobs;
        while let Some(job) = stack.pop() {
            stack.extend(self.visit(job));
            if stack.len() >= PARALLEL_BACKLOG {
                self.parallel(std::mem::take(&mut stack));
            }
        }
        let state = self
            .state
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        WalkOutcome {
            records: state.records,
            dirs: self.dirs.into_inner(),
            failures: state.failures,
        }
    }

    fn parallel(&self, jobs: Vec<Job>) {
        let queue = Mutex::new(Queue { jobs, busy: 0 });
        let wake = Condvar::new();
        std::thread::scope(|s| {
            for i in 1..walk_threads() {
                let spawned = std::thread::Builder::new()
                    .name(format!("walk-{i}"))
                    .spawn_scoped(s, || self.worker(&queue, &wake));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a walker thread; walking with fewer");
                    break;
                }
            }
            self.worker(&queue, &wake);
        });
    }

    fn worker(&self, queue: &Mutex<Queue>, wake: &Condvar) {
        loop {
            let job = {
                let mut q = lock(queue);
                loop {
                    if let Some(job) = q.jobs.pop() {
                        q.busy += 1;
                        break job;
                    }
                    if q.busy == 0 {
                        return;
                    }
                    q = wake.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
            };
            let children = self.visit(job);
            let mut q = lock(queue);
            q.busy -= 1;
            let notify = !children.is_empty() || q.busy == 0;
            q.jobs.extend(children);
            drop(q);
            if notify {
                wake.notify_all();
            }
        }
    }

    fn fail(&self, path: PathBuf, call: &'static str, errno: Errno) {
        lock(&self.state)
            .failures
            .push(Failure { path, call, errno });
    }

    /// Watches `job`'s directory, then lists it: anything created after the listing is
    /// reported by the watch. Returns the subdirectories to visit.
    fn visit(&self, job: Job) -> Vec<Job> {
        let n = self.dirs.fetch_add(1, Ordering::Relaxed) + 1;
        self.progress(n);
        let full = self.full.load(Ordering::Relaxed);
        if full && !self.count_past_limit {
            return Vec::new();
        }
        let mut wd = None;
        if let Some(inotify) = self.inotify
            && n <= self.budget
            && !full
        {
            match inotify.add_watch(job.path.as_path(), WATCH_MASK) {
                Ok(w) => {
                    let w = w.as_raw();
                    let mut state = lock(&self.state);
                    // Seen already: a bind mount brought the walk back to this directory.
                    if !state.seen.insert(w) {
                        return Vec::new();
                    }
                    state.records.push(Record {
                        wd: w,
                        parent: job.parent,
                        name: job.name,
                    });
                    wd = Some(w);
                }
                // Removed or replaced since it was listed: its parent reports that.
                Err(Errno::ENOENT | Errno::ENOTDIR) => return Vec::new(),
                Err(Errno::ENOSPC) => {
                    self.full.store(true, Ordering::Relaxed);
                    self.fail(job.path.clone(), "inotify_add_watch", Errno::ENOSPC);
                    if !self.count_past_limit {
                        return Vec::new();
                    }
                }
                Err(e) => {
                    self.fail(job.path, "inotify_add_watch", e);
                    return Vec::new();
                }
            }
        }
        let entries = match std::fs::read_dir(&job.path) {
            Ok(entries) => entries,
            Err(e) => {
                let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
                if !matches!(errno, Errno::ENOENT | Errno::ENOTDIR) {
                    self.fail(job.path, "opendir", errno);
                }
                return Vec::new();
            }
        };
        let mut children = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
                    self.fail(job.path.clone(), "readdir", errno);
                    break;
                }
            };
            // d_type, or lstat where the filesystem does not fill it: symlinks are not followed.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                children.push(Job {
                    path: entry.path(),
                    parent: wd,
                    name: entry.file_name(),
                });
            }
        }
        children
    }

    fn progress(&self, n: u64) {
        if !n.is_multiple_of(1024) {
            return;
        }
        let Ok(mut last) = self.last_log.try_lock() else {
            return;
        };
        if last.elapsed() < PROGRESS_INTERVAL {
            return;
        }
        *last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64();
        tracing::info!(
            walk = self.what,
            dirs = n,
            dirs_per_sec = (n as f64 / secs.max(1e-3)) as u64,
            elapsed_s = secs as u64,
            "walking the tree"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The backend

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
    pub fn start(roots: &[PathBuf], own_pids: Arc<OwnPids>) -> Result<Self, BackendError> {
        Self::start_with(roots, WatchLimits::read()?, own_pids)
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
            roots,
            removing: HashSet::new(),
            deleted: HashSet::new(),
            unwatched: BTreeSet::new(),
            next_retry: None,
            limit_logged: None,
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
                    None => match self.tree.nodes.get(&wd) {
                        Some(node) => Job {
                            path: path.to_path_buf(),
                            parent: node.parent,
                            name: node.name.clone(),
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
            ChangeKind::Modified | ChangeKind::Attrib => {}
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
            self.handle_batch(&buf[..n], out);
        }
        self.buf = buf;
        Ok(read?)
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Event>) -> Duration {
        self.on_timers(now, out);
        self.wait_time(now)
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

/// Rows for `watcher check`: whether inotify works, and per path whether its directories
/// fit in the watches left.
pub fn check(paths: &[PathBuf]) -> Vec<Support> {
    let mut rows = Vec::new();
    let inotify = init();
    let limits = WatchLimits::read();
    let kernel = match (&inotify, &limits) {
        (Ok(_), Ok(l)) => Ok(format!(
            "inotify_init1 works; fs.inotify.max_user_watches={}, {} in use by this user, {} free",
            l.max,
            l.in_use,
            l.available()
        )),
        (Err(e), _) | (_, Err(e)) => Err(super::error_chain(e)),
    };
    rows.push(Support {
        backend: "inotify",
        path: None,
        ok: kernel.is_ok(),
        detail: kernel.unwrap_or_else(|e| e),
    });
    let (Ok(_), Ok(limits)) = (inotify, limits) else {
        return rows;
    };
    for path in paths {
        if !path.is_dir() {
            rows.push(Support {
                backend: "inotify",
                path: Some(path.clone()),
                ok: false,
                detail: "not a directory".into(),
            });
            continue;
        }
        let outcome = Walk::new(None, "check").run(vec![Job {
            path: path.clone(),
            parent: None,
            name: path.clone().into_os_string(),
        }]);
        // Network and FUSE filesystems only notify of changes made through this machine.
        let fstype = super::filesystem_type(path);
        let remote = matches!(
            fstype.as_str(),
            "nfs" | "nfs4" | "cifs" | "smb3" | "9p" | "ceph" | "glusterfs" | "afs"
        ) || fstype.starts_with("fuse");
        let caveat = if remote {
            format!("; {fstype}: only changes made on this machine are seen")
        } else {
            String::new()
        };
        let row = if let Some(f) = outcome.failures.first() {
            Support {
                backend: "inotify",
                path: Some(path.clone()),
                ok: false,
                detail: format!(
                    "{} on {}: {}",
                    f.call,
                    f.path.display(),
                    io::Error::from(f.errno)
                ),
            }
        } else {
            let fits = outcome.dirs <= limits.available();
            Support {
                backend: "inotify",
                path: Some(path.clone()),
                ok: fits,
                detail: format!(
                    "{} directories need as many watches, pinning {}; {} free \
                     (fs.inotify.max_user_watches {} - {} in use){}",
                    outcome.dirs,
                    kernel_memory(&outcome.dirs),
                    limits.available(),
                    limits.max,
                    limits.in_use,
                    if fits {
                        ""
                    } else {
                        "; does not fit: raise fs.inotify.max_user_watches"
                    },
                ) + &caveat,
            }
        };
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn os(s: &str) -> OsString {
        OsString::from(s)
    }

    /// /srv (1) with a (2) holding b (3) holding c (4), and x (5).
    fn sample() -> WatchTree {
        let mut t = WatchTree::default();
        assert_eq!(t.place(1, None, os("/srv")), Some(vec![]));
        assert_eq!(t.place(2, Some(1), os("a")), Some(vec![]));
        assert_eq!(t.place(3, Some(2), os("b")), Some(vec![]));
        assert_eq!(t.place(4, Some(3), os("c")), Some(vec![]));
        assert_eq!(t.place(5, Some(1), os("x")), Some(vec![]));
        t
    }

    fn path(t: &WatchTree, wd: i32) -> Option<String> {
        t.path(wd).map(|p| p.display().to_string())
    }

    #[test]
    fn tree_gives_paths_and_looks_them_up() {
        let t = sample();
        assert_eq!(path(&t, 4).as_deref(), Some("/srv/a/b/c"));
        assert_eq!(path(&t, 1).as_deref(), Some("/srv"));
        assert_eq!(t.lookup(Path::new("/srv/a/b")), Some(3));
        assert_eq!(t.lookup(Path::new("/srv")), Some(1));
        assert_eq!(t.lookup(Path::new("/srv/a/nope")), None);
        assert_eq!(t.lookup(Path::new("/elsewhere")), None);
        let (wd, missing) = t.deepest(Path::new("/srv/a/b/q/r")).unwrap();
        assert_eq!((wd, missing), (3, vec![OsStr::new("q"), OsStr::new("r")]));
        assert!(t.is_root(1) && !t.is_root(2));
    }

    #[test]
    fn renaming_a_subtree_relinks_one_node() {
        let mut t = sample();
        // mv /srv/a /srv/x/z
        assert_eq!(t.place(2, Some(5), os("z")), Some(vec![]));
        assert_eq!(path(&t, 4).as_deref(), Some("/srv/x/z/b/c"));
        assert_eq!(t.child(1, OsStr::new("a")), None);
        assert_eq!(t.lookup(Path::new("/srv/x/z/b")), Some(3));
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn renaming_over_a_directory_displaces_it() {
        let mut t = sample();
        // mv /srv/x /srv/a/b: the old b (with c) is replaced.
        let mut displaced = t.place(5, Some(2), os("b")).unwrap();
        displaced.sort();
        assert_eq!(displaced, [3, 4]);
        assert_eq!(path(&t, 5).as_deref(), Some("/srv/a/b"));
        assert!(!t.contains(3) && !t.contains(4));
    }

    #[test]
    fn a_directory_cannot_go_inside_itself() {
        let mut t = sample();
        assert_eq!(t.place(2, Some(4), os("loop")), None);
        assert_eq!(t.place(9, Some(99), os("orphan")), None);
        assert_eq!(path(&t, 2).as_deref(), Some("/srv/a"));
    }

    #[test]
    fn removing_a_subtree_returns_every_watch_in_it() {
        let mut t = sample();
        let mut removed = t.remove_subtree(2);
        removed.sort();
        assert_eq!(removed, [2, 3, 4]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.child(1, OsStr::new("a")), None);
        assert_eq!(t.remove_subtree(2), Vec::<i32>::new());
        // A removed root leaves nothing behind.
        let mut removed = t.remove_subtree(1);
        removed.sort();
        assert_eq!(removed, [1, 5]);
        assert_eq!(t.lookup(Path::new("/srv")), None);
    }

    #[test]
    fn non_utf8_names_survive() {
        let mut t = sample();
        let name = OsStr::from_bytes(b"caf\xe9\n");
        t.place(7, Some(3), name.to_os_string()).unwrap();
        assert_eq!(
            t.path(7).unwrap().as_os_str().as_bytes(),
            b"/srv/a/b/caf\xe9\n"
        );
    }

    #[test]
    fn moves_pair_by_cookie_and_expire_after_grace() {
        let t0 = Instant::now();
        let grace = Duration::from_millis(50);
        let mut m = MovePairing::default();
        m.moved_from(7, 3, t0);
        m.moved_from(8, 4, t0);
        assert_eq!(m.next_deadline(grace), Some(t0 + grace));
        assert_eq!(m.moved_to(7), Some(3));
        assert_eq!(m.moved_to(7), None);
        assert_eq!(m.moved_to(1), None);
        assert_eq!(
            m.expire(t0 + Duration::from_millis(10), grace),
            Vec::<i32>::new()
        );
        assert_eq!(m.expire(t0 + grace, grace), vec![4]);
        assert_eq!(m.next_deadline(grace), None);
        // A directory seen in the tree again is no longer waiting to expire.
        m.moved_from(9, 5, t0);
        assert!(!m.is_empty());
        m.cancel(5);
        assert!(m.is_empty());
        assert_eq!(m.expire(t0 + grace, grace), Vec::<i32>::new());
    }

    fn record(wd: i32, mask: u32, cookie: u32, name: &[u8]) -> Vec<u8> {
        let padded = name.len().div_ceil(16) * 16;
        let mut b = Vec::new();
        b.extend_from_slice(&wd.to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&cookie.to_ne_bytes());
        b.extend_from_slice(&(padded as u32).to_ne_bytes());
        b.extend_from_slice(name);
        b.resize(b.len() + padded - name.len(), 0);
        b
    }

    #[test]
    fn records_are_parsed_with_byte_names() {
        let mut buf = record(3, libc::IN_CREATE, 0, b"f\xff");
        buf.extend(record(4, libc::IN_IGNORED, 0, b""));
        buf.extend(record(
            5,
            libc::IN_MOVED_TO | libc::IN_ISDIR,
            9,
            b"0123456789abcdef",
        ));
        let evs = parse_events(&buf);
        assert_eq!(
            evs,
            [
                RawEvent {
                    wd: 3,
                    mask: libc::IN_CREATE,
                    cookie: 0,
                    name: OsStr::from_bytes(b"f\xff")
                },
                RawEvent {
                    wd: 4,
                    mask: libc::IN_IGNORED,
                    cookie: 0,
                    name: OsStr::new("")
                },
                RawEvent {
                    wd: 5,
                    mask: libc::IN_MOVED_TO | libc::IN_ISDIR,
                    cookie: 9,
                    name: OsStr::new("0123456789abcdef")
                },
            ]
        );
    }

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
                InotifyBackend::start(&[root.to_path_buf()], Arc::new(OwnPids::new())).unwrap(),
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
