//! Which names a multi-link file has under one root: (device, inode) -> root-relative names.
//!
//! The kernel reports a write under the name that was used; nothing says which other names
//! the inode has, and rsync keeps two names linked on the replica only when both are in the
//! same run. This index answers "every name of this inode inside the root" so a batch can
//! list them all (see [`crate::link_walk`], which fills it and reads the filesystem).
//!
//! Pure: the caller stats and walks, this only keeps what it was told.
//!
//! - Only files with more than one link are kept; memory is bounded by `cap` names. Past
//!   the cap nothing new is added and [`Index::names`] answers [`Answer::Unknown`] for
//!   inodes it does not hold, which makes the caller look the names up itself (a walk): slower,
//!   never stale.
//! - An inode is *complete* when every name it has inside the root is known: a walk saw it
//!   and no event added a name to it while that walk ran (a walk can miss a name moved
//!   behind it), or its known names are as many as its link count. Names added by events
//!   keep a complete inode complete (the new name is known); an inode first met through an
//!   event is not complete until a walk or the link count says so, because its other names
//!   may be anywhere in the tree (a link to a file that had one link when the walk passed).
//! - A complete inode with fewer names than links has its other names outside the root (or
//!   in another filesystem's view of it): there is nothing more to list.
//! - A name that goes away hands over the inode's other known names: a write through it
//!   just before reached them too. When a write or attribute change went through a name of
//!   an inode that is not complete, and that name goes away before the change was synced,
//!   the known names are not enough: the removal hands over the inode's identity too
//!   ([`Gone::unknown`]), and the caller walks the root for its names.
//! - Stale names (a name the caller found to be another file now) are dropped with
//!   [`Index::forget`]; listing a stale name is harmless (rsync deletes a missing listed path
//!   on the replica, where it is gone as well), missing one is not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hashbrown::HashMap;

/// Most names the index keeps by default (a few hundred bytes each at most).
pub const DEFAULT_CAP: usize = 500_000;

/// A file's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
}

#[derive(Debug, Default)]
struct Inode {
    names: Vec<PathBuf>,
    complete: bool,
    /// The add counter when an event last added a name.
    added_at: u64,
    /// Written to, or its attributes changed, through one of its names while not complete.
    changed: bool,
}

/// What a name going away leaves to sync (see [`Index::remove`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Gone {
    /// Other known names of the files that lost a name.
    pub others: Vec<PathBuf>,
    /// Files that were changed through the lost name while their names were not all known:
    /// their other names must be looked up (they may have no name left in the index).
    pub unknown: Vec<FileKey>,
}

/// What the index knows of one inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Every name inside the root (as far as events and walks told), to be checked against
    /// the filesystem by the caller.
    Exact(Vec<PathBuf>),
    /// Known names, but others may exist inside the root: a walk must find them.
    Partial(Vec<PathBuf>),
    /// Not held at all.
    Unknown,
}

/// Taken when a walk starts; hands its results back in [`Index::walk_finished`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkStamp {
    adds: u64,
    epoch: u64,
}

/// The index of one root.
#[derive(Debug)]
pub struct Index {
    by_inode: HashMap<FileKey, Inode>,
    by_name: BTreeMap<PathBuf, FileKey>,
    /// Counts names added by events, to tell which inodes changed while a walk ran.
    adds: u64,
    cap: usize,
    /// The cap was reached at least once (said once in the log by the caller).
    full: bool,
    /// A walk of the whole root finished since the index was created or invalidated.
    walked: bool,
    /// Counts invalidations: a walk that started before one completes nothing.
    epoch: u64,
}

impl Default for Index {
    fn default() -> Self {
        Index::new(DEFAULT_CAP)
    }
}

impl Index {
    /// An empty index that holds at most `cap` names.
    pub fn new(cap: usize) -> Self {
        Index {
            by_inode: HashMap::new(),
            by_name: BTreeMap::new(),
            adds: 0,
            cap,
            full: false,
            walked: false,
            epoch: 0,
        }
    }

    /// Names held.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Inodes held.
    pub fn inodes(&self) -> usize {
        self.by_inode.len()
    }

    /// The cap was reached: some multi-link files are not held.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// A walk of the whole root finished (since start or the last invalidation).
    pub fn walked(&self) -> bool {
        self.walked
    }

    /// `name` now is a file `key` with `nlink` links (more than one), as an event or a
    /// partial walk found it. Whatever `name` was before is forgotten.
    pub fn add(&mut self, name: &Path, key: FileKey, nlink: u64) {
        if self.by_name.get(name) == Some(&key) {
            if let Some(inode) = self.by_inode.get_mut(&key)
                && inode.names.len() as u64 >= nlink
            {
                inode.complete = true;
            }
            return;
        }
        self.remove(name);
        if nlink < 2 {
            return;
        }
        self.adds += 1;
        let adds = self.adds;
        if !self.insert(name, key) {
            return;
        }
        let inode = self.by_inode.get_mut(&key).expect("inserted above");
        inode.added_at = adds;
        if inode.names.len() as u64 >= nlink {
            inode.complete = true;
        }
    }

    /// Inserts a name (not held before); false when the cap refused it.
    fn insert(&mut self, name: &Path, key: FileKey) -> bool {
        if self.by_name.len() >= self.cap {
            self.full = true;
            return false;
        }
        self.by_name.insert(name.to_path_buf(), key);
        self.by_inode
            .entry(key)
            .or_default()
            .names
            .push(name.to_path_buf());
        true
    }

    /// A write or attribute change went through `name` (held or not).
    pub fn changed(&mut self, name: &Path) {
        if let Some(key) = self.by_name.get(name)
            && let Some(inode) = self.by_inode.get_mut(key)
            && !inode.complete
        {
            inode.changed = true;
        }
    }

    /// `name` no longer exists (unlinked, moved away, replaced by a directory). Returns
    /// the file's other known names: a write through `name` just before reached them too,
    /// and once `name` is gone nothing else says so.
    pub fn remove(&mut self, name: &Path) -> Gone {
        let mut gone = Gone::default();
        if let Some(key) = self.by_name.remove(name) {
            self.drop_name(key, name, &mut gone);
        }
        gone
    }

    /// Drops `name` from `key`'s names; adds what is left to sync to `gone`.
    fn drop_name(&mut self, key: FileKey, name: &Path, gone: &mut Gone) {
        let Some(inode) = self.by_inode.get_mut(&key) else {
            return;
        };
        inode.names.retain(|n| n != name);
        if inode.changed && !inode.complete {
            gone.unknown.push(key);
        }
        if inode.names.is_empty() {
            self.by_inode.remove(&key);
            return;
        }
        gone.others.extend(inode.names.iter().cloned());
    }

    /// Directory `dir` is gone (removed, moved away): every name at or below it. Returns
    /// the other names, elsewhere, of the files that had names there (see [`Index::remove`]).
    pub fn remove_under(&mut self, dir: &Path) -> Gone {
        let mut gone = Gone::default();
        if dir.as_os_str().is_empty() {
            self.by_name.clear();
            self.by_inode.clear();
            return gone;
        }
        // Component order puts a directory's descendants right after it.
        let names: Vec<(PathBuf, FileKey)> = self
            .by_name
            .range(dir.to_path_buf()..)
            .take_while(|(n, _)| n.starts_with(dir))
            .map(|(n, k)| (n.clone(), *k))
            .collect();
        for (name, key) in names {
            self.by_name.remove(&name);
            self.drop_name(key, &name, &mut gone);
        }
        gone.others.retain(|n| !n.starts_with(dir));
        gone.others.sort();
        gone.others.dedup();
        gone.unknown.sort();
        gone.unknown.dedup();
        gone
    }

    /// `name` is not (or no longer) a name of `key`: the caller checked.
    pub fn forget(&mut self, name: &Path, key: FileKey) {
        if self.by_name.get(name) == Some(&key) {
            self.remove(name);
        }
    }

    /// What is known of `key`, a file that has `nlink` links now.
    pub fn names(&self, key: FileKey, nlink: u64) -> Answer {
        match self.by_inode.get(&key) {
            None => Answer::Unknown,
            Some(inode) if inode.complete || inode.names.len() as u64 >= nlink => {
                Answer::Exact(inode.names.clone())
            }
            Some(inode) => Answer::Partial(inode.names.clone()),
        }
    }

    /// Events lost (an overflow, a rescan): no inode is known to be complete any more.
    pub fn invalidate(&mut self) {
        for inode in self.by_inode.values_mut() {
            inode.complete = false;
        }
        self.walked = false;
        self.epoch += 1;
    }

    /// A walk starts now.
    pub fn walk_started(&self) -> WalkStamp {
        WalkStamp {
            adds: self.adds,
            epoch: self.epoch,
        }
    }

    /// A walk that started at `stamp` found these names (every name of each inode inside
    /// what it walked); `whole_root` when it walked the whole root. Names are merged (an
    /// event may have removed one since: the caller checks names before use), and each
    /// inode found becomes complete unless an event added a name to it meanwhile (or events
    /// were lost meanwhile).
    pub fn walk_finished(
        &mut self,
        stamp: WalkStamp,
        found: HashMap<FileKey, Vec<PathBuf>>,
        whole_root: bool,
    ) {
        let whole_root = whole_root && stamp.epoch == self.epoch;
        for (key, names) in found {
            for name in names {
                match self.by_name.get(&name) {
                    Some(k) if *k == key => {}
                    // An event told of this name since the walk saw it: the event is newer.
                    Some(_) => {}
                    None => {
                        self.insert(&name, key);
                    }
                }
            }
            if whole_root
                && let Some(inode) = self.by_inode.get_mut(&key)
                && inode.added_at <= stamp.adds
            {
                inode.complete = true;
                inode.changed = false;
            }
        }
        if whole_root {
            self.walked = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: FileKey = FileKey { dev: 1, ino: 10 };
    const B: FileKey = FileKey { dev: 1, ino: 20 };
    /// Same inode number, other filesystem.
    const C: FileKey = FileKey { dev: 2, ino: 10 };

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn exact(names: &[&str]) -> Answer {
        Answer::Exact(names.iter().map(|s| p(s)).collect())
    }

    fn partial(names: &[&str]) -> Answer {
        Answer::Partial(names.iter().map(|s| p(s)).collect())
    }

    fn found(items: &[(FileKey, &[&str])]) -> HashMap<FileKey, Vec<PathBuf>> {
        items
            .iter()
            .map(|(k, names)| (*k, names.iter().map(|s| p(s)).collect()))
            .collect()
    }

    /// One step of a scenario.
    enum Step<'a> {
        Add(&'a str, FileKey, u64),
        Remove(&'a str),
        RemoveUnder(&'a str),
        /// A removal, and the other names it says must be synced.
        RemoveGives(&'a str, &'a [&'a str]),
        RemoveUnderGives(&'a str, &'a [&'a str]),
        Forget(&'a str, FileKey),
        /// A write or attribute change through a name.
        Changed(&'a str),
        /// A removal that hands over inodes whose other names must be looked up.
        RemoveUnknown(&'a str, &'a [FileKey]),
        RemoveUnderUnknown(&'a str, &'a [FileKey]),
        /// A whole-root walk that starts and finishes with nothing happening meanwhile.
        Walk(&'a [(FileKey, &'a [&'a str])]),
        Invalidate,
        /// What `names(key, nlink)` answers now.
        Expect(FileKey, u64, Answer),
    }
    use Step::*;

    fn run(steps: &[Step]) -> Index {
        let mut index = Index::new(100);
        for (i, step) in steps.iter().enumerate() {
            match step {
                Add(n, k, l) => index.add(Path::new(n), *k, *l),
                Remove(n) => {
                    index.remove(Path::new(n));
                }
                RemoveUnder(n) => {
                    index.remove_under(Path::new(n));
                }
                RemoveGives(n, want) => {
                    let mut got = index.remove(Path::new(n)).others;
                    got.sort();
                    let want: Vec<PathBuf> = want.iter().map(|s| p(s)).collect();
                    assert_eq!(got, want, "step {i}");
                }
                RemoveUnderGives(n, want) => {
                    let got = index.remove_under(Path::new(n)).others;
                    let want: Vec<PathBuf> = want.iter().map(|s| p(s)).collect();
                    assert_eq!(got, want, "step {i}");
                }
                Forget(n, k) => index.forget(Path::new(n), *k),
                Changed(n) => index.changed(Path::new(n)),
                RemoveUnknown(n, want) => {
                    assert_eq!(index.remove(Path::new(n)).unknown, *want, "step {i}");
                }
                RemoveUnderUnknown(n, want) => {
                    assert_eq!(index.remove_under(Path::new(n)).unknown, *want, "step {i}");
                }
                Walk(items) => {
                    let stamp = index.walk_started();
                    index.walk_finished(stamp, found(items), true);
                }
                Invalidate => index.invalidate(),
                Expect(k, l, want) => assert_eq!(&index.names(*k, *l), want, "step {i}"),
            }
        }
        index
    }

    #[test]
    fn scenarios() {
        let table: &[&[Step]] = &[
            // A name going away hands over the file's other names: a write through it just
            // before changed them too (a file of one name left gives nothing).
            &[
                Walk(&[(A, &["a", "d/b", "e/c"]), (B, &["d/x", "y"])]),
                RemoveGives("a", &["d/b", "e/c"]),
                RemoveGives("e/c", &["d/b"]),
                RemoveGives("d/b", &[]),
                RemoveGives("never", &[]),
                // A directory going away: the names elsewhere of what it held.
                RemoveUnderGives("d", &["y"]),
            ],
            // A file written through a new link whose partner is unknown (`ln a b; echo x >
            // b; rm b`): the removal says the inode must be looked up.
            &[
                Add("b", A, 2),
                Changed("b"),
                RemoveUnknown("b", &[A]),
                // Asked once: the name is gone from the index.
                RemoveUnknown("b", &[]),
            ],
            // The same through a directory moved away; an unchanged inode hands over nothing.
            &[
                Add("d/b", A, 2),
                Add("d/y", B, 2),
                Changed("d/b"),
                Changed("elsewhere"),
                RemoveUnderUnknown("d", &[A]),
            ],
            // A complete inode needs no lookup: its other names are handed over.
            &[
                Walk(&[(A, &["a", "b"])]),
                Changed("b"),
                RemoveUnknown("b", &[]),
                Add("c", A, 2),
                RemoveGives("c", &["a"]),
            ],
            // A walk that finds every name settles an earlier change.
            &[
                Add("b", A, 2),
                Changed("b"),
                Walk(&[(A, &["a", "b"])]),
                RemoveGives("b", &["a"]),
            ],
            // A walk makes what it found complete, even with links outside the root.
            &[
                Walk(&[(A, &["a", "d/b"])]),
                Expect(A, 2, exact(&["a", "d/b"])),
                Expect(A, 3, exact(&["a", "d/b"])),
                Expect(B, 2, Answer::Unknown),
                Expect(C, 2, Answer::Unknown),
            ],
            // A link added to a file the walk saw with one link: the other name is unknown.
            &[Add("new", A, 2), Expect(A, 2, partial(&["new"]))],
            // ... until both names were added by events: as many names as links.
            &[
                Add("x", A, 2),
                Add("y", A, 2),
                Expect(A, 2, exact(&["x", "y"])),
            ],
            // A third link added later keeps the inode complete.
            &[
                Walk(&[(A, &["a", "b"])]),
                Add("c", A, 3),
                Expect(A, 3, exact(&["a", "b", "c"])),
            ],
            // Unlink and rename.
            &[
                Walk(&[(A, &["a", "b", "c"])]),
                Remove("b"),
                Expect(A, 2, exact(&["a", "c"])),
                Remove("c"),
                Add("c2", A, 2),
                Expect(A, 2, exact(&["a", "c2"])),
            ],
            // A name renamed over by another file moves to that file.
            &[
                Walk(&[(A, &["a", "b"]), (B, &["x", "y"])]),
                Add("a", B, 3),
                Expect(A, 2, exact(&["b"])),
                Expect(B, 3, exact(&["x", "y", "a"])),
            ],
            // A directory moved away or removed takes its names with it, nothing beside it.
            &[
                Walk(&[(A, &["d/a", "d/e/b", "d-x", "dd/c", "e"])]),
                RemoveUnder("d"),
                Expect(A, 5, exact(&["d-x", "dd/c", "e"])),
                RemoveUnder(""),
                Expect(A, 5, Answer::Unknown),
            ],
            // A name found to be another file is dropped; a name of another inode is kept.
            &[
                Walk(&[(A, &["a", "b"])]),
                Forget("a", B),
                Expect(A, 2, exact(&["a", "b"])),
                Forget("a", A),
                Expect(A, 2, exact(&["b"])),
            ],
            // Lost events: nothing is complete until the next walk.
            &[
                Walk(&[(A, &["a", "b"])]),
                Invalidate,
                Expect(A, 3, partial(&["a", "b"])),
                Expect(A, 2, exact(&["a", "b"])),
                Walk(&[(A, &["a", "b"])]),
                Expect(A, 3, exact(&["a", "b"])),
            ],
        ];
        for (i, steps) in table.iter().enumerate() {
            eprintln!("scenario {i}");
            run(steps);
        }
    }

    #[test]
    fn a_walk_does_not_complete_an_inode_an_event_added_to_meanwhile() {
        let mut index = Index::new(100);
        let stamp = index.walk_started();
        // The walk passed "a" while it had one link; `ln a b` happened behind it.
        index.add(Path::new("b"), A, 2);
        index.walk_finished(stamp, found(&[(A, &["b"])]), true);
        assert_eq!(index.names(A, 2), partial(&["b"]));
        assert!(index.walked());
        // The next walk sees both.
        let stamp = index.walk_started();
        index.walk_finished(stamp, found(&[(A, &["a", "b"])]), true);
        assert_eq!(index.names(A, 2), exact(&["b", "a"]));
    }

    #[test]
    fn a_walk_keeps_what_events_said_since() {
        let mut index = Index::new(100);
        let stamp = index.walk_started();
        // The walk saw "a" as inode A; since then "a" became inode B.
        index.add(Path::new("a"), B, 2);
        index.walk_finished(stamp, found(&[(A, &["a", "z"])]), true);
        assert_eq!(index.names(A, 2), exact(&["z"]));
        assert_eq!(index.names(B, 2), partial(&["a"]));
    }

    #[test]
    fn a_walk_across_lost_events_completes_nothing() {
        let mut index = Index::new(100);
        let stamp = index.walk_started();
        index.invalidate();
        index.walk_finished(stamp, found(&[(A, &["a"])]), true);
        assert_eq!(index.names(A, 2), partial(&["a"]));
        assert!(!index.walked());
    }

    #[test]
    fn a_partial_walk_completes_nothing() {
        let mut index = Index::new(100);
        let stamp = index.walk_started();
        index.walk_finished(stamp, found(&[(A, &["d/a"])]), false);
        assert_eq!(index.names(A, 2), partial(&["d/a"]));
        assert!(!index.walked());
    }

    #[test]
    fn the_cap_bounds_memory_and_unknown_inodes_stay_unknown() {
        let mut index = Index::new(3);
        for (i, name) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            index.add(
                Path::new(name),
                FileKey {
                    dev: 1,
                    ino: i as u64 / 2,
                },
                2,
            );
        }
        assert_eq!(index.len(), 3);
        assert!(index.is_full());
        assert_eq!(
            index.names(FileKey { dev: 1, ino: 0 }, 2),
            exact(&["a", "b"])
        );
        // "d" was refused: its inode answers with what it has, which is not enough.
        assert_eq!(index.names(FileKey { dev: 1, ino: 1 }, 2), partial(&["c"]));
        assert_eq!(index.names(FileKey { dev: 1, ino: 2 }, 2), Answer::Unknown);
        // A walk past the cap adds nothing either, and completes only what it holds.
        let stamp = index.walk_started();
        index.walk_finished(
            stamp,
            found(&[(FileKey { dev: 1, ino: 2 }, &["e", "f"])]),
            true,
        );
        assert_eq!(index.names(FileKey { dev: 1, ino: 2 }, 2), Answer::Unknown);
    }
}
