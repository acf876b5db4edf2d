//! Files written through a name that was gone by the time the backend looked, held until
//! the event that took the name away says how it went.
//!
//! `ln a b; echo x >b; rm b`, faster than the daemon reads its events: the write reached
//! `a`, which no event names. fanotify's write event carries the file's own handle, so
//! the backend can still find the file and its identity; whether its other names need
//! looking up (a walk of the root) depends on what happened to `b`:
//!
//! - unlinked: the file lives on only under names nobody reported, so they are looked up;
//! - moved away, alone or with a directory above it: the file lives on under the new name,
//!   whose own events and batch bring its other names; no walk. This is the common case
//!   (a temporary file renamed into place, a directory renamed right after a write), and
//!   a walk of a big root for each would be ruinous.
//!
//! Whatever took the name away was queued after the write (the name was there when the
//! write happened and gone when the backend looked), so it comes soon: entries do not
//! linger. The set is bounded all the same; a file it cannot hold is looked up at once.
//!
//! Pure: the backend tells it what its events say.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Most entries held; past it a file is looked up at once (slower, never wrong).
const CAP: usize = 4096;

/// A file's identity: device and inode number.
pub type Identity = (u64, u64);

/// Names written through and gone, with the file each named.
#[derive(Debug, Default)]
pub struct Vanished {
    by_name: BTreeMap<PathBuf, Identity>,
}

impl Vanished {
    /// A write or attribute change went through `path`, which is gone now, to file `id`
    /// that still has links. False when the set is full: look the file up now.
    pub fn note(&mut self, path: &Path, id: Identity) -> bool {
        if self.by_name.len() >= CAP && !self.by_name.contains_key(path) {
            return false;
        }
        self.by_name.insert(path.to_path_buf(), id);
        true
    }

    /// File `path` was unlinked: the file it named, if it was written through that name
    /// and still has other names to look up.
    pub fn unlinked(&mut self, path: &Path) -> Option<Identity> {
        self.by_name.remove(path)
    }

    /// File `path` was moved away: its new name carries the change.
    pub fn moved_away(&mut self, path: &Path) {
        self.by_name.remove(path);
    }

    /// Directory `from` was renamed to `to`: what was noted below it is below `to` now.
    pub fn directory_moved(&mut self, from: &Path, to: &Path) {
        let moved = self.take_under(from);
        for (path, id) in moved {
            let rel = path.strip_prefix(from).expect("taken from under `from`");
            self.by_name.insert(to.join(rel), id);
        }
    }

    /// Directory `path` is gone, or moved to a name not known: what was below it is
    /// forgotten (each name's own removal came first, or its new name carries the change).
    pub fn directory_gone(&mut self, path: &Path) {
        self.take_under(path);
    }

    /// Events were lost: the roots are rescanned, and what was noted means nothing more.
    pub fn clear(&mut self) {
        self.by_name.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_name.len()
    }

    fn take_under(&mut self, dir: &Path) -> Vec<(PathBuf, Identity)> {
        // Component order puts a directory's descendants right after it.
        let below: Vec<PathBuf> = self
            .by_name
            .range(dir.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(dir))
            .filter(|(p, _)| p.as_path() != dir)
            .map(|(p, _)| p.clone())
            .collect();
        below
            .into_iter()
            .filter_map(|p| self.by_name.remove(&p).map(|id| (p, id)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Step {
        Note(&'static str, Identity),
        Unlinked(&'static str, Option<Identity>),
        MovedAway(&'static str),
        DirectoryMoved(&'static str, &'static str),
        DirectoryGone(&'static str),
        Clear,
        Len(usize),
    }
    use Step::*;

    const A: Identity = (1, 10);
    const B: Identity = (1, 20);

    #[test]
    fn scenarios() {
        let table: &[&[Step]] = &[
            // ln a b; echo x >b; rm b: looked up once.
            &[
                Note("/r/b", A),
                Unlinked("/r/b", Some(A)),
                Unlinked("/r/b", None),
            ],
            // A temporary file written, then renamed into place: no lookup.
            &[
                Note("/r/.t", A),
                MovedAway("/r/.t"),
                Unlinked("/r/.t", None),
                Len(0),
            ],
            // Written, its directory renamed, then unlinked under the new name.
            &[
                Note("/r/d/b", A),
                Note("/r/d/e/c", B),
                Note("/r/d-x", B),
                DirectoryMoved("/r/d", "/r/n"),
                Unlinked("/r/d/b", None),
                Unlinked("/r/n/b", Some(A)),
                Unlinked("/r/n/e/c", Some(B)),
                // Beside the directory, not below it.
                Unlinked("/r/d-x", Some(B)),
            ],
            // A directory removed or moved to a name not known takes its entries along.
            &[
                Note("/r/d/b", A),
                Note("/r/dd", B),
                DirectoryGone("/r/d"),
                Unlinked("/r/d/b", None),
                Len(1),
                Clear,
                Len(0),
            ],
            // Noted again under the same name: the latest file.
            &[Note("/r/b", A), Note("/r/b", B), Unlinked("/r/b", Some(B))],
        ];
        for (i, steps) in table.iter().enumerate() {
            let mut v = Vanished::default();
            for (j, step) in steps.iter().enumerate() {
                let at = format!("scenario {i}, step {j}");
                match step {
                    Note(p, id) => assert!(v.note(Path::new(p), *id), "{at}"),
                    Unlinked(p, want) => assert_eq!(v.unlinked(Path::new(p)), *want, "{at}"),
                    MovedAway(p) => v.moved_away(Path::new(p)),
                    DirectoryMoved(from, to) => v.directory_moved(Path::new(from), Path::new(to)),
                    DirectoryGone(p) => v.directory_gone(Path::new(p)),
                    Clear => v.clear(),
                    Len(n) => assert_eq!(v.len(), *n, "{at}"),
                }
            }
        }
    }

    #[test]
    fn a_full_set_asks_for_a_lookup_at_once() {
        let mut v = Vanished::default();
        for i in 0..CAP {
            assert!(v.note(Path::new(&format!("/r/{i}")), A));
        }
        assert!(!v.note(Path::new("/r/one-more"), A));
        // An entry it holds can still be updated.
        assert!(v.note(Path::new("/r/0"), B));
        assert_eq!(v.len(), CAP);
    }
}
