//! One target's pending work: its dirty set, the journal that keeps it across a crash, and
//! the age of its oldest unsynced change.
//!
//! Every mark goes to the dirty set and the journal together; a batch handed to rsync is
//! confirmed in the journal only when rsync says it landed, and put back otherwise, so a
//! mark is never lost between the two. A journal that fails to write is dropped with an
//! error in the log: the daemon keeps syncing, only crash recovery is lost.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hashbrown::HashMap;

use crate::dirty::{Batch, DirtySet, Scope};
use crate::journal::Journal;

/// A batch handed to rsync and not yet confirmed.
#[derive(Debug, Clone, Copy)]
struct Flying {
    paths: usize,
    /// Oldest change the batch carries (None for a verify pass, which carries none).
    oldest: Option<Instant>,
    /// The journal's sequence number for the batch, to confirm it once it landed.
    journal_seq: Option<u64>,
}

/// Dirty paths of one target and their bookkeeping.
pub struct Backlog {
    dirty: DirtySet,
    /// When the oldest change still in `dirty` was marked.
    since: Option<Instant>,
    journal: Option<Journal>,
    /// Marked since the flush policy last heard of it.
    touched: bool,
    /// Past this many paths, the deepest are folded into their directories.
    max: usize,
    flying: Option<Flying>,
    /// Renames since the last batch, in order (old, new), for targets that can replay them.
    renames: Vec<(PathBuf, PathBuf)>,
    /// Names moved away since the last batch, with what was marked at or below each before
    /// the move (see [`Backlog::moving`]).
    carried: HashMap<PathBuf, Vec<PathBuf>>,
}

/// Renames kept per batch at most; past that they are not replayed, only synced (their
/// marks are in the dirty set either way).
const MAX_RENAMES: usize = 10_000;

impl Backlog {
    /// An empty backlog that folds past `max` paths, journaling to `journal` if given.
    pub fn new(max: usize, journal: Option<Journal>) -> Self {
        Self {
            dirty: DirtySet::new(),
            since: None,
            journal,
            touched: false,
            max: max.max(1),
            flying: None,
            renames: Vec::new(),
            carried: HashMap::new(),
        }
    }

    /// Paths waiting to be handed to rsync.
    pub fn len(&self) -> usize {
        self.dirty.len()
    }

    /// Nothing waits to be handed to rsync.
    pub fn is_empty(&self) -> bool {
        self.dirty.is_empty()
    }

    /// Marks `rel` dirty, journaling it; folds the backlog when it passes its bound.
    pub fn mark(&mut self, rel: &Path, scope: Scope, now: Instant, target: &dyn Display) {
        if self.dirty.is_empty() {
            self.since = Some(now);
        }
        self.touched = true;
        self.dirty.mark(rel, scope);
        if let Some(journal) = self.journal.as_mut()
            && let Err(e) = journal.record(rel, scope)
        {
            tracing::error!(target = %target, error = %e, "journal write failed; continuing without it");
            self.journal = None;
        }
        if self.dirty.len() > self.max {
            let folded = self.dirty.collapse(self.max / 2);
            tracing::warn!(target = %target, folded, "backlog over its bound: folded paths into their directories");
        }
    }

    /// Journals to `journal` from now on (a reload hands the running one over).
    pub fn set_journal(&mut self, journal: Option<Journal>) {
        self.journal = journal;
    }

    /// Adds paths recovered from the journal without journaling them again.
    pub fn restore<'a>(
        &mut self,
        marks: impl IntoIterator<Item = &'a (PathBuf, Scope)>,
        now: Instant,
    ) {
        for (rel, scope) in marks {
            self.dirty.mark(rel, *scope);
        }
        self.restored(now);
    }

    /// Adds a batch carried over from the engine before a reload (its journal came along).
    pub fn restore_batch(&mut self, batch: Batch, now: Instant) {
        self.dirty.merge(batch);
        self.restored(now);
    }

    fn restored(&mut self, now: Instant) {
        if !self.dirty.is_empty() && self.since.is_none() {
            self.since = Some(now);
        }
    }

    /// Records a rename to replay before the next batch (its paths are marked separately).
    pub fn renamed(&mut self, old: &Path, new: &Path) {
        if self.renames.len() < MAX_RENAMES {
            self.renames.push((old.to_path_buf(), new.to_path_buf()));
        }
    }

    /// `old` is about to be moved away (its MovedFrom, before it is marked): what was
    /// marked at or below it is remembered, for [`Backlog::carried`] to move to the new name
    /// if the rename is replayed. A write marked there before the move must reach the new
    /// name too, where the replayed rename puts the replica's old data and rsync's quick
    /// check would pass a rewrite that kept size and mtime. Past the bound, the batch's
    /// subtrees are compared by content instead.
    pub fn moving(&mut self, old: &Path) {
        if self.carried.len() >= MAX_RENAMES {
            self.dirty.compare_subtrees_by_content();
            return;
        }
        let marked = self.dirty.marked_under(old);
        if !marked.is_empty() {
            self.carried.insert(old.to_path_buf(), marked);
        }
    }

    /// The paths to mark below `new` for what was marked below `old` before it moved there
    /// (see [`Backlog::moving`]).
    pub fn carried(&mut self, old: &Path, new: &Path) -> Vec<PathBuf> {
        let Some(marked) = self.carried.remove(old) else {
            return Vec::new();
        };
        marked
            .iter()
            .filter_map(|p| p.strip_prefix(old).ok())
            .map(|below| {
                if below.as_os_str().is_empty() {
                    new.to_path_buf()
                } else {
                    new.join(below)
                }
            })
            .collect()
    }

    /// The renames the next batch carries, in the order they happened.
    pub fn take_renames(&mut self) -> Vec<(PathBuf, PathBuf)> {
        std::mem::take(&mut self.renames)
    }

    /// Whether anything was marked since the last call.
    pub fn take_touched(&mut self) -> bool {
        std::mem::take(&mut self.touched)
    }

    /// Starts a flush of every dirty path: the batch to hand to rsync.
    pub fn take_batch(&mut self, now: Instant) -> Batch {
        let batch = self.dirty.take();
        // A rename still unpaired now is not replayed before this batch, which syncs the
        // old name (gone from the replica then): the new one is copied, not found in place.
        self.carried.clear();
        let journal_seq = self.journal.as_mut().and_then(|j| j.batch_taken().ok());
        self.flying = Some(Flying {
            paths: batch.len(),
            oldest: Some(self.since.take().unwrap_or(now)),
            journal_seq,
        });
        batch
    }

    /// Starts a verify pass: the whole root, nothing taken from the dirty set.
    pub fn verify_batch(&mut self) -> Batch {
        self.flying = Some(Flying {
            paths: 1,
            oldest: None,
            journal_seq: None,
        });
        Batch {
            entries: Vec::new(),
            subtrees: vec![Default::default()],
            ..Batch::default()
        }
    }

    /// The flush in flight landed: confirm its marks in the journal.
    pub fn confirm(&mut self, target: &dyn Display) {
        let flying = self.flying.take();
        if let (Some(j), Some(seq)) = (self.journal.as_mut(), flying.and_then(|f| f.journal_seq))
            && let Err(e) = j.confirmed(seq)
        {
            tracing::error!(target = %target, error = %e, "journal write failed; continuing without it");
            self.journal = None;
        }
    }

    /// The verify pass in flight ended; nothing to confirm.
    pub fn verify_done(&mut self) {
        self.flying = None;
    }

    /// Puts back a batch that did not sync, keeping the age of its oldest change; `widen`
    /// for a run cut short (see [`DirtySet::merge_widened`]), `is_dir` telling which paths
    /// are directories now.
    pub fn put_back(
        &mut self,
        batch: Batch,
        now: Instant,
        widen: bool,
        is_dir: impl Fn(&Path) -> bool,
    ) {
        let oldest = self.flying.take().and_then(|f| f.oldest).unwrap_or(now);
        if widen {
            self.dirty.merge_widened(batch, is_dir);
        } else {
            self.dirty.merge(batch);
        }
        self.since = Some(self.since.map_or(oldest, |d| d.min(oldest)));
    }

    /// Paths of the flush in flight (0 when none).
    pub fn in_flight_paths(&self) -> usize {
        self.flying.map_or(0, |f| f.paths)
    }

    /// The oldest change not yet confirmed by rsync.
    pub fn oldest_unsynced(&self) -> Option<Instant> {
        let flying = self.flying.filter(|f| f.paths > 0).and_then(|f| f.oldest);
        match (flying, self.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Makes the journal durable (housekeeping).
    pub fn sync_journal(&mut self, target: &dyn Display) {
        if let Some(j) = self.journal.as_mut()
            && let Err(e) = j.sync()
        {
            tracing::error!(target = %target, error = %e, "journal sync failed; continuing without it");
            self.journal = None;
        }
    }

    /// Closes the journal at exit: clean when nothing is left unsynced, so the next start
    /// skips the whole-tree re-sync.
    pub fn close(&mut self, target: &dyn Display) {
        if let Some(journal) = self.journal.take() {
            let result = if self.dirty.is_empty() && self.flying.is_none() {
                journal.close_clean()
            } else {
                let mut journal = journal;
                journal.sync()
            };
            if let Err(e) = result {
                tracing::error!(target = %target, error = %e, "closing the journal failed");
            }
        }
    }

    /// Everything pending and the journal, for the engine that takes over after a reload.
    pub fn hand_over(mut self) -> (Batch, Option<Journal>) {
        (self.dirty.take(), self.journal.take())
    }

    #[cfg(test)]
    pub fn take_all(&mut self) -> Batch {
        self.dirty.take()
    }
}
