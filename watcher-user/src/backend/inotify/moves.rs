//! Pairing an IN_MOVED_FROM with the IN_MOVED_TO that carries the same cookie, twice:
//! a directory moved within the tree keeps its watches (relinked in the watch tree; one
//! whose MOVED_TO does not come within a grace period left the tree, and its watches go),
//! and any rename within the tree becomes one [`Event::Renamed`](crate::event::Event),
//! which targets can replay.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Most MOVED_FROM halves kept waiting for their MOVED_TO: the kernel queues the two one
/// after the other, so only a move out of the tree (never paired) stays, and a burst of
/// those must not grow without bound.
const MAX_HALVES: usize = 1024;

/// The old paths of renames whose MOVED_TO has not come yet, by cookie.
#[derive(Debug, Default)]
pub(crate) struct RenameHalves {
    from: HashMap<u32, (PathBuf, bool)>,
}

impl RenameHalves {
    /// `path` (a directory when `is_dir`) was moved away with `cookie`.
    pub(crate) fn moved_from(&mut self, cookie: u32, path: PathBuf, is_dir: bool) {
        if self.from.len() >= MAX_HALVES {
            // Unpaired halves are moves out of the tree: forgetting them costs nothing.
            self.from.clear();
        }
        self.from.insert(cookie, (path, is_dir));
    }

    /// The old path of what arrived with `cookie`, if it was seen leaving and is of the
    /// same kind.
    pub(crate) fn moved_to(&mut self, cookie: u32, is_dir: bool) -> Option<PathBuf> {
        let (path, was_dir) = self.from.remove(&cookie)?;
        (was_dir == is_dir).then_some(path)
    }

    pub(crate) fn clear(&mut self) {
        self.from.clear();
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn renames_pair_by_cookie_and_stay_bounded() {
        let mut h = RenameHalves::default();
        h.moved_from(7, "/r/a".into(), false);
        h.moved_from(8, "/r/d".into(), true);
        assert_eq!(h.moved_to(8, true), Some("/r/d".into()));
        assert_eq!(h.moved_to(8, true), None, "a cookie pairs once");
        assert_eq!(h.moved_to(9, false), None, "moved in from outside");
        assert_eq!(h.moved_to(7, true), None, "not the same object");
        for cookie in 0..5000 {
            h.moved_from(cookie, "/r/out".into(), false);
        }
        assert!(h.from.len() <= MAX_HALVES);
    }
}
