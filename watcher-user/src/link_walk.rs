//! A group's hard-link index ([`crate::hardlinks`]) against the filesystem: filled by a
//! background walk, kept current by events, read when a batch is planned.
//!
//! The rule a planned batch follows: every file it lists whose link count is above one
//! brings every name its inode has inside the root into the same entries run, so with `-H`
//! the replica keeps them linked and without it every name gets the new content. Files of
//! the batch's subtrees are looked at too (a link made inside a new or moved-in directory
//! has a name nobody reported). When the index cannot name all of an inode's names (its
//! walk has not finished, a link was made to a file that had one link when the walk
//! passed, events were lost, the index is full), the planner walks the root itself for
//! those inodes: slower, never stale.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};

use crate::dirty::Batch;
use crate::event::ChangeKind;
use crate::hardlinks::{Answer, DEFAULT_CAP, FileKey, Index};

/// One group's index and the background walk that fills it.
#[derive(Debug)]
pub struct Links {
    root: PathBuf,
    index: Mutex<Index>,
    /// A whole-root walk is wanted (at start, after lost events).
    walk_wanted: Mutex<bool>,
    wake: Condvar,
}

/// The identity and link count of a path that is not a directory.
fn identity(path: &Path) -> Option<(FileKey, u64)> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    (!meta.is_dir()).then(|| {
        (
            FileKey {
                dev: meta.dev(),
                ino: meta.ino(),
            },
            meta.nlink(),
        )
    })
}

/// The identity and link count of a path that is not a directory, if it has several links.
fn multi_link(path: &Path) -> Option<(FileKey, u64)> {
    identity(path).filter(|(_, nlink)| *nlink > 1)
}

/// Walks `root/start` without following symlinks, calling `found` for every non-directory
/// with at least `min_links` links (root-relative name). Stops early, returning false, when
/// `keep_going` says so (checked once per directory). Unreadable directories are skipped:
/// they vanished, or rsync cannot read them either.
fn walk(
    root: &Path,
    start: &Path,
    min_links: u64,
    keep_going: &dyn Fn() -> bool,
    found: &mut dyn FnMut(PathBuf, FileKey, u64),
) -> bool {
    match std::fs::symlink_metadata(root.join(start)) {
        Ok(meta) if meta.is_dir() => {}
        _ => return true,
    }
    let mut stack = vec![start.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if !keep_going() {
            return false;
        }
        let Ok(entries) = std::fs::read_dir(root.join(&dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let rel = dir.join(entry.file_name());
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(rel),
                Ok(_) => {
                    if let Some((key, nlink)) = identity(&root.join(&rel))
                        && nlink >= min_links
                    {
                        found(rel, key, nlink);
                    }
                }
                Err(_) => {}
            }
        }
    }
    true
}

/// Lowers the calling thread's CPU and I/O priority (nice 19, idle I/O class): the walk
/// must never slow down the syncs.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread; failures only leave the priority as is.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            IOPRIO_CLASS_IDLE << 13,
        );
    }
}

impl Links {
    /// An empty index of `root`, wanting its first walk.
    pub fn new(root: &Path) -> Arc<Links> {
        Arc::new(Links {
            root: root.to_path_buf(),
            index: Mutex::new(Index::new(DEFAULT_CAP)),
            walk_wanted: Mutex::new(true),
            wake: Condvar::new(),
        })
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the background walk thread. It ends once nothing else holds the index (the
    /// engine that made it is gone).
    pub fn start_walker(self: &Arc<Self>, group: &str) {
        let weak = Arc::downgrade(self);
        let group = group.to_string();
        let spawned = std::thread::Builder::new()
            .name("link index".into())
            .spawn(move || walker(weak, &group));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the hard-link walk; batches with multi-link files walk the root themselves");
        }
    }

    /// Keeps the index current with one event of the group (`rel` relative to its root).
    /// Returns names to sync although no event named them: the other names of a file
    /// whose name went away (a write through that name reached them too, and with the name
    /// gone the batch could no longer find them from it). When the index does not know
    /// them all, the root is walked for them here, before the name is forgotten.
    pub fn on_change(&self, kind: ChangeKind, rel: &Path, is_dir: bool) -> Vec<PathBuf> {
        let gone = match (kind, is_dir) {
            (ChangeKind::Created | ChangeKind::MovedTo, true) => {
                self.index().remove_under(rel);
                return Vec::new();
            }
            (ChangeKind::Deleted | ChangeKind::MovedFrom, true) => self.index().remove_under(rel),
            (ChangeKind::Deleted | ChangeKind::MovedFrom, false) => self.index().remove(rel),
            // A link changes the link count (and ctime) of its inode: where the backend
            // reports that under a name, it is the partner of the new link.
            (ChangeKind::Created | ChangeKind::MovedTo, false) => {
                match multi_link(&self.root.join(rel)) {
                    Some((key, nlink)) => self.index().add(rel, key, nlink),
                    None => {
                        self.index().remove(rel);
                    }
                }
                return Vec::new();
            }
            // A write or attribute change reaches every name of the inode: remembered, so
            // that the name going away before the batch still brings the others.
            (ChangeKind::Modified | ChangeKind::CloseWrite | ChangeKind::Attrib, false) => {
                let found = multi_link(&self.root.join(rel));
                let mut index = self.index();
                if let Some((key, nlink)) = found {
                    index.add(rel, key, nlink);
                }
                index.changed(rel);
                return Vec::new();
            }
            (ChangeKind::Modified | ChangeKind::CloseWrite | ChangeKind::Attrib, true) => {
                return Vec::new();
            }
        };
        let mut names = gone.others;
        if !gone.unknown.is_empty() {
            let unknown: HashSet<FileKey> = gone.unknown.into_iter().collect();
            names.extend(self.find_names(&unknown, 1));
            names.sort_unstable();
            names.dedup();
        }
        names
    }

    /// Every name `key` has inside the root now: a change went through a name of it that is
    /// gone, and the index may not have known that name at all.
    pub fn names_of(&self, key: FileKey) -> Vec<PathBuf> {
        // Exact only when complete: the link count now is not known here.
        let answer = self.index().names(key, u64::MAX);
        if let Answer::Exact(names) = answer {
            let valid: Vec<PathBuf> = names
                .into_iter()
                .filter(|name| identity(&self.root.join(name)).is_some_and(|(k, _)| k == key))
                .collect();
            if !valid.is_empty() {
                return valid;
            }
        }
        self.find_names(&HashSet::from_iter([key]), 1)
    }

    /// Events were lost (an overflow, a rescan): nothing is known complete until a new walk.
    pub fn lost_events(&self) {
        self.index().invalidate();
        *self.walk_wanted.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }

    /// Waits up to `timeout` for a walk request; true (and the request taken) when there is one.
    fn take_walk_request(&self, timeout: Duration) -> bool {
        let wanted = self.walk_wanted.lock().unwrap_or_else(|e| e.into_inner());
        let (mut wanted, _) = self
            .wake
            .wait_timeout_while(wanted, timeout, |w| !*w)
            .unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *wanted)
    }

    /// Whether the index holds a finished whole-root walk (for tests and status).
    pub fn walked(&self) -> bool {
        self.index().walked()
    }

    /// The batch to plan: `batch` with every name of each multi-link file it lists (or holds
    /// in its subtrees) added to its entries. Folded files (see [`Batch::folded`]) with
    /// several links move to the entries with their other names.
    pub fn expand(&self, batch: &Batch) -> Batch {
        let root = &self.root;
        let mut out = batch.clone();
        let mut wanted: HashMap<FileKey, u64> = HashMap::new();
        if !batch.covers_root() {
            for subtree in &batch.subtrees {
                let mut seen = Vec::new();
                walk(root, subtree, 2, &|| true, &mut |rel, key, nlink| {
                    seen.push((rel, key, nlink))
                });
                let mut index = self.index();
                for (rel, key, nlink) in seen {
                    index.add(&rel, key, nlink);
                    wanted.insert(key, nlink);
                }
            }
        }
        for rel in &batch.entries {
            if let Some((key, nlink)) = multi_link(&root.join(rel)) {
                wanted.insert(key, nlink);
            }
        }
        // The root listed for its own attributes makes rsync (3.x, `--dirs`) take every
        // top-level entry too: their other names must come along.
        if batch.entries.iter().any(|e| e.as_os_str().is_empty())
            && let Ok(top) = std::fs::read_dir(root)
        {
            for entry in top.flatten() {
                if let Some((key, nlink)) = multi_link(&entry.path()) {
                    wanted.insert(key, nlink);
                }
            }
        }
        out.folded.retain(|rel| match multi_link(&root.join(rel)) {
            Some((key, nlink)) => {
                wanted.insert(key, nlink);
                out.entries.push(rel.clone());
                false
            }
            None => true,
        });
        if wanted.is_empty() {
            return out;
        }
        let mut unknown: HashSet<FileKey> = HashSet::new();
        for (key, nlink) in &wanted {
            let answer = self.index().names(*key, *nlink);
            let (names, exact) = match answer {
                Answer::Exact(names) => (names, true),
                Answer::Partial(names) => (names, false),
                Answer::Unknown => (Vec::new(), false),
            };
            let mut valid = 0u64;
            for name in names {
                if multi_link(&root.join(&name)).is_some_and(|(k, _)| k == *key) {
                    out.entries.push(name);
                    valid += 1;
                } else {
                    self.index().forget(&name, *key);
                }
            }
            if !exact && valid < *nlink {
                unknown.insert(*key);
            }
        }
        if !unknown.is_empty() {
            out.entries.extend(self.find_names(&unknown, 2));
        }
        out.entries.sort_unstable();
        out.entries.dedup();
        out
    }

    /// Walks the whole root for every name of `keys` (the index could not say them all),
    /// filling the index on the way. `min_links` is 1 for files that may have lost every
    /// other name since they were changed.
    fn find_names(&self, keys: &HashSet<FileKey>, min_links: u64) -> Vec<PathBuf> {
        let started = Instant::now();
        let stamp = self.index().walk_started();
        let mut names = Vec::new();
        let mut all: HashMap<FileKey, Vec<PathBuf>> = HashMap::new();
        let mut held = 0usize;
        walk(
            &self.root,
            Path::new(""),
            min_links,
            &|| true,
            &mut |rel, key, nlink| {
                if keys.contains(&key) {
                    names.push(rel.clone());
                }
                if nlink > 1 && held < DEFAULT_CAP {
                    all.entry(key).or_default().push(rel);
                    held += 1;
                }
            },
        );
        self.index().walk_finished(stamp, all, true);
        tracing::info!(root = %self.root.display(), inodes = keys.len(), names = names.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "hard links: the index did not know every name of a changed file; walked the root for them");
        names
    }
}

/// The background walk: a whole-root walk at start and after lost events, at low priority.
fn walker(weak: Weak<Links>, group: &str) {
    lower_priority();
    loop {
        let Some(links) = weak.upgrade() else {
            return;
        };
        if !links.take_walk_request(Duration::from_secs(1)) {
            continue;
        }
        let started = Instant::now();
        let stamp = links.index().walk_started();
        let mut found: HashMap<FileKey, Vec<PathBuf>> = HashMap::new();
        let mut held = 0usize;
        let alive = || Arc::strong_count(&links) > 1;
        let finished = walk(&links.root, Path::new(""), 2, &alive, &mut |rel, key, _| {
            if held < DEFAULT_CAP {
                found.entry(key).or_default().push(rel);
                held += 1;
            }
        });
        if !finished {
            return;
        }
        let mut index = links.index();
        index.walk_finished(stamp, found, true);
        if index.is_full() {
            tracing::warn!(
                group,
                cap = DEFAULT_CAP,
                "hard-link index full: batches with multi-link files it does not hold walk the root for their names"
            );
        }
        tracing::info!(
            group,
            names = index.len(),
            files = index.inodes(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "hard-link index filled"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(entries: &[&str], subtrees: &[&str], folded: &[&str]) -> Batch {
        Batch {
            entries: entries.iter().map(PathBuf::from).collect(),
            subtrees: subtrees.iter().map(PathBuf::from).collect(),
            folded: folded.iter().map(PathBuf::from).collect(),
            ..Batch::default()
        }
    }

    fn names(list: &[PathBuf]) -> Vec<&str> {
        list.iter().map(|p| p.to_str().unwrap()).collect()
    }

    /// `ln a b; echo x > b; rm b` (or the directory of `b` moved away) before the batch: the
    /// write reached `a`, which no event named and the index did not know.
    #[test]
    fn a_name_written_through_then_gone_brings_the_other_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("a"), b"x").unwrap();
        std::fs::write(root.join("plain"), b"x").unwrap();
        let links = Links::new(root);
        let rel = Path::new;

        // Unlinked.
        std::fs::hard_link(root.join("a"), root.join("b")).unwrap();
        assert!(
            links
                .on_change(ChangeKind::Created, rel("b"), false)
                .is_empty()
        );
        std::fs::write(root.join("b"), b"new").unwrap();
        assert!(
            links
                .on_change(ChangeKind::CloseWrite, rel("b"), false)
                .is_empty()
        );
        std::fs::remove_file(root.join("b")).unwrap();
        assert_eq!(
            names(&links.on_change(ChangeKind::Deleted, rel("b"), false)),
            ["a"]
        );

        // Its directory moved away, then the name unlinked there.
        std::fs::hard_link(root.join("a"), root.join("d/b")).unwrap();
        links.on_change(ChangeKind::Created, rel("d/b"), false);
        links.on_change(ChangeKind::Attrib, rel("d/b"), false);
        std::fs::rename(root.join("d"), root.join("e")).unwrap();
        assert_eq!(
            names(&links.on_change(ChangeKind::MovedFrom, rel("d"), true)),
            ["a", "e/b"]
        );
        links.on_change(ChangeKind::MovedTo, rel("e"), true);
        std::fs::remove_file(root.join("e/b")).unwrap();
        links.on_change(ChangeKind::Deleted, rel("e/b"), false);

        // A single-link file written then removed brings nothing, and walks nothing.
        links.on_change(ChangeKind::CloseWrite, rel("plain"), false);
        std::fs::remove_file(root.join("plain")).unwrap();
        assert!(
            links
                .on_change(ChangeKind::Deleted, rel("plain"), false)
                .is_empty()
        );
        // A link made and removed: the names the index knows.
        std::fs::hard_link(root.join("a"), root.join("c")).unwrap();
        links.on_change(ChangeKind::Created, rel("c"), false);
        std::fs::remove_file(root.join("c")).unwrap();
        assert_eq!(
            names(&links.on_change(ChangeKind::Deleted, rel("c"), false)),
            ["a"]
        );
    }

    /// Real files: the index is read and checked against the filesystem.
    #[test]
    fn every_name_of_a_listed_multi_link_file_joins_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::fs::create_dir_all(root.join("new")).unwrap();
        std::fs::write(root.join("a"), b"x").unwrap();
        std::fs::hard_link(root.join("a"), root.join("d/e/b")).unwrap();
        std::fs::write(root.join("single"), b"x").unwrap();
        std::fs::write(root.join("late"), b"x").unwrap();
        let links = Links::new(root);

        // Nothing walked yet: the planner finds the names itself.
        let out = links.expand(&batch(&["a", "single"], &[], &[]));
        assert_eq!(names(&out.entries), ["a", "d/e/b", "single"]);
        assert!(links.walked());

        // A link made inside a new directory (a subtree) to a file that had one link.
        std::fs::hard_link(root.join("late"), root.join("new/late2")).unwrap();
        let out = links.expand(&batch(&[], &["new"], &[]));
        assert_eq!(names(&out.entries), ["late", "new/late2"]);
        assert_eq!(names(&out.subtrees), ["new"]);

        // Known now: a write through one name lists both without walking.
        let out = links.expand(&batch(&["new/late2"], &[], &[]));
        assert_eq!(names(&out.entries), ["late", "new/late2"]);

        // A folded multi-link file moves to the entries; a plain one stays folded.
        let out = links.expand(&batch(&[], &["d"], &["d/e/b", "d/f"]));
        assert_eq!(names(&out.entries), ["a", "d/e/b"]);
        assert_eq!(names(&out.folded), ["d/f"]);

        // Unlinked through events: the name is gone from the index and the file is single.
        std::fs::remove_file(root.join("d/e/b")).unwrap();
        links.on_change(ChangeKind::Deleted, Path::new("d/e/b"), false);
        let out = links.expand(&batch(&["a"], &[], &[]));
        assert_eq!(names(&out.entries), ["a"]);

        // A name the index holds that is another file now is not listed.
        std::fs::hard_link(root.join("late"), root.join("third")).unwrap();
        links.on_change(ChangeKind::Created, Path::new("third"), false);
        std::fs::remove_file(root.join("new/late2")).unwrap();
        std::fs::write(root.join("new/late2"), b"other").unwrap();
        let out = links.expand(&batch(&["late"], &[], &[]));
        assert_eq!(names(&out.entries), ["late", "third"]);
    }
}
