//! Walking a tree to watch every directory in it (or only to count them): each directory
//! is watched before it is listed, so anything created after the listing is reported by
//! the watch. A wide tree is listed by several threads; a bind mount that loops back is
//! walked once.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::inotify::Inotify;

use super::WATCH_MASK;

/// How often a long walk logs its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// Directories waiting to be listed before a walk starts helper threads; a single new
/// directory is cheaper to walk inline.
const PARALLEL_BACKLOG: usize = 64;

/// A directory to watch and list: its path and where it goes in the tree.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) path: PathBuf,
    pub(super) parent: Option<i32>,
    pub(super) name: OsString,
}

/// A watch added by a walk, in the order added: a parent always before its children.
#[derive(Debug)]
pub(super) struct Record {
    pub(super) wd: i32,
    pub(super) parent: Option<i32>,
    pub(super) name: OsString,
}

/// A directory a walk could not watch or list.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) path: PathBuf,
    pub(super) call: &'static str,
    pub(super) errno: Errno,
}

#[derive(Debug, Default)]
struct WalkState {
    records: Vec<Record>,
    seen: HashSet<i32>,
    failures: Vec<Failure>,
}

/// What a walk found.
#[derive(Debug, Default)]
pub(super) struct WalkOutcome {
    pub(super) records: Vec<Record>,
    /// Directories found, watched or only counted.
    pub(super) dirs: u64,
    pub(super) failures: Vec<Failure>,
}

#[derive(Debug)]
struct Queue {
    jobs: Vec<Job>,
    busy: usize,
}

/// Watches (or only counts) every directory below some starting points.
pub(super) struct Walk<'a> {
    /// None: count only.
    inotify: Option<&'a Inotify>,
    /// Watches this walk may add; past it, directories are only counted.
    pub(super) budget: u64,
    /// Keep counting after the watch limit was hit (to say how many are needed).
    pub(super) count_past_limit: bool,
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
    pub(super) fn new(inotify: Option<&'a Inotify>, what: &'static str) -> Self {
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

    pub(super) fn run(self, jobs: Vec<Job>) -> WalkOutcome {
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
