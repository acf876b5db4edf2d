//! Memory per dirty path: what one target holds for 10^6 distinct dirty paths, its dirty
//! set and its journal together (a target down for a day on a busy tree holds millions).
//!
//! `cargo bench -p watcher-bench --bench memory`. Bytes are counted by a global allocator
//! that tracks what is live (requested sizes; the C allocator adds its own small headers),
//! and the process's RSS growth is printed beside them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use watcher::backlog::Backlog;
use watcher::dirty::{DirtySet, Scope};
use watcher::journal::Journal;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on unchanged to the system allocator, which upholds the
// contract; only a counter is updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator (System) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator (System) with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Dirty paths measured.
const PATHS: usize = 1_000_000;

/// Relative paths of a storage tree: 1,000 project directories of 10 subdirectories of
/// 100 files, with names of the lengths seen there (`project-0042/raw-07/frame-000123.dat`).
fn paths() -> Vec<PathBuf> {
    (0..PATHS)
        .map(|i| {
            PathBuf::from(format!(
                "project-{:04}/raw-{:02}/frame-{:06}.dat",
                i / 1000,
                (i / 100) % 10,
                i
            ))
        })
        .collect()
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Bytes per path that `fill` keeps live, and its RSS growth per path.
fn measure<T>(what: &str, paths: &[PathBuf], fill: impl FnOnce(&[PathBuf]) -> T) -> T {
    let (live, rss) = (LIVE.load(Ordering::Relaxed), rss_bytes());
    let started = Instant::now();
    let kept = fill(paths);
    let per = |now: usize, before: usize| now.saturating_sub(before) as f64 / paths.len() as f64;
    println!(
        "{what:<28} {:>7.1} B/path allocated, {:>7.1} B/path RSS, {:>6.2} s",
        per(LIVE.load(Ordering::Relaxed), live),
        per(rss_bytes(), rss),
        started.elapsed().as_secs_f64()
    );
    kept
}

fn main() {
    let paths = paths();
    println!("{PATHS} distinct dirty paths of one target");
    // The whole backlog first, on a fresh heap, so its RSS growth is its own.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let backlog = measure("backlog (set + journal)", &paths, |paths| {
        let (journal, _) = Journal::open(dir.path(), "memory").expect("opening a journal");
        let mut backlog = Backlog::new(PATHS * 2, Some(journal));
        let now = Instant::now();
        for p in paths {
            backlog.mark(p, Scope::Entry, now, &"memory");
        }
        backlog.sync_journal(&"memory");
        backlog
    });
    assert_eq!(backlog.len(), PATHS);
    drop(backlog);
    let set = measure("  its dirty set", &paths, |paths| {
        let mut set = DirtySet::new();
        for p in paths {
            set.mark(p, Scope::Entry);
        }
        set
    });
    drop(set);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let journal = measure("  its journal", &paths, |paths| {
        let (mut journal, _) = Journal::open(dir.path(), "memory").expect("opening a journal");
        for p in paths {
            journal.record(p, Scope::Entry).expect("journaling");
        }
        journal.sync().expect("syncing the journal");
        journal
    });
    drop(journal);
}
