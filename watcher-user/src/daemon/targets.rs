//! One target's side of the engine: its settings, what it has done, and the steps the
//! engine takes on it (marking paths, starting a flush, paths set aside, the root's
//! identity); and `route`, which turns one event into marks on the targets of its group.

use super::*;

impl FileId {
    pub(super) fn of(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path)?;
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Default for TargetStats {
    fn default() -> Self {
        TargetStats {
            runs: 0,
            retries: 0,
            failures: Failures::default(),
            run_seconds: Histogram::new(&status::RUN_SECONDS_BOUNDS),
            transfer: rsync::TransferStats::default(),
            last_sync: None,
            last_success_unix_ms: None,
            last_verify: None,
            post_sync: Default::default(),
        }
    }
}

impl TargetStats {
    /// Counts what a finished batch did: its runs, their durations and bytes, and how it
    /// failed if it did.
    pub(super) fn count(&mut self, done: &runner::Done) {
        self.runs += done.runs;
        for elapsed in &done.run_times {
            self.run_seconds.observe(elapsed.as_secs_f64());
        }
        self.transfer.add(done.transfer);
        match done.class {
            rsync::ExitClass::Success => {}
            rsync::ExitClass::Transient => self.failures.transient += 1,
            rsync::ExitClass::Fatal => self.failures.fatal += 1,
            rsync::ExitClass::SourceRace => self.failures.source_race += 1,
        }
    }
}

impl TargetState {
    /// Marks `rel` dirty (journaled; the backlog folds itself past its bound).
    pub(super) fn mark(&mut self, rel: &Path, scope: Scope, now: Instant) {
        self.backlog.mark(rel, scope, now, &self.settings.dest);
    }

    /// Puts a batch that did not sync back, widened around its files for a run cut short.
    pub(super) fn put_back(&mut self, batch: Batch, now: Instant, widen: bool) {
        let root = &self.settings.root;
        self.backlog
            .put_back(batch, now, widen, |rel| is_dir(&root.join(rel)));
    }

    /// The machine hears of marks made outside the event flow (recovered, carried over, the
    /// initial sync); the first events must not count them again.
    pub(super) fn settle_marks(&mut self, now: Instant) {
        if !self.backlog.is_empty() {
            self.machine.changed(now, false);
        }
        self.backlog.take_touched();
    }

    /// Whether the source root is still the directory the engine started with. When it is
    /// not, the target is given up with an error (once).
    pub(super) fn root_still_there(&mut self) -> bool {
        if self.machine.given_up() {
            return false;
        }
        let now = FileId::of(&self.settings.root);
        if now.as_ref().is_ok_and(|id| *id == self.settings.root_id) {
            return true;
        }
        let what = match now {
            Ok(_) => "was replaced, moved or mounted over".to_string(),
            Err(e) => format!("is gone ({e})"),
        };
        tracing::error!(group = %self.settings.group_name, target = %self.settings.dest,
            root = %self.settings.root.display(),
            "the source root {what}; this target is no longer synced (restart to sync the new one)");
        self.machine.give_up();
        false
    }

    /// Starts a flush of `kind`: takes its batch and says what the runner needs.
    pub(super) fn start_flush(&mut self, index: usize, kind: FlushKind, now: Instant) -> Job {
        let (batch, renames) = match kind {
            FlushKind::Changes => {
                self.failing.batch_started();
                let renames = self.backlog.take_renames();
                (self.backlog.take_batch(now), renames)
            }
            FlushKind::Verify => (self.backlog.verify_batch(), Vec::new()),
        };
        let first_change = self.machine.first_pending();
        self.machine.started(now, kind);
        tracing::debug!(target = %self.settings.dest, paths = batch.len(), ?kind, "flushing");
        Job {
            target: index,
            kind,
            first_change,
            batch,
            root: self.settings.root.clone(),
            dest: self.settings.dest.clone(),
            opts: self.settings.rsync.clone(),
            set_aside: self.failing.held(),
            stop: None,
            renames,
            link: self.settings.link.clone(),
            hard_links: self.settings.hard_links.clone(),
            standby: match kind {
                FlushKind::Changes => self.settings.standby.clone(),
                FlushKind::Verify => None,
            },
        }
    }

    /// Paths set aside whose wait is over go into the backlog again, to be tried.
    pub(super) fn retry_set_aside(&mut self, now: Instant) {
        for rel in self.failing.due(now) {
            let scope = if is_dir(&self.settings.root.join(&rel)) {
                Scope::Subtree
            } else {
                Scope::Entry
            };
            self.mark(&rel, scope, now);
        }
        if self.backlog.take_touched() {
            self.machine.changed(now, false);
        }
    }

    /// Says each change of the set-aside paths once.
    pub(super) fn log_failing(&self, changes: Vec<failing::Change>) {
        let dest = &self.settings.dest;
        for change in changes {
            match change {
                failing::Change::SetAside(path, error) => tracing::warn!(target = %dest,
                    path = %path.display(), error = %error,
                    "rsync cannot sync this path; syncing the rest without it, retrying it with backoff"),
                failing::Change::StillFailing(path, error) => tracing::debug!(target = %dest,
                    path = %path.display(), error = %error, "still failing"),
                failing::Change::Recovered(path) => tracing::info!(target = %dest,
                    path = %path.display(), "a path that failed syncs again"),
            }
        }
    }
}

/// Keeps each group's hard-link index current with `event` (names made, moved, removed;
/// events lost). Returns the names to mark dirty that no event named (see
/// [`HardLinks::on_change`]), with their group.
fn track_links(filter: &Filter, targets: &[TargetState], event: &Event) -> Vec<(GroupId, PathBuf)> {
    let links_of = |group: GroupId| {
        targets
            .iter()
            .find(|t| t.settings.group == group)
            .map(|t| &t.settings.hard_links)
    };
    match event {
        Event::Change {
            kind, path, is_dir, ..
        } => {
            if let Match::Inside(group, rel) = filter.classify(path, *is_dir)
                && let Some(links) = links_of(group)
            {
                return links
                    .on_change(*kind, rel, *is_dir)
                    .into_iter()
                    .map(|name| (group, name))
                    .collect();
            }
        }
        // Its MovedFrom and MovedTo changes came before it.
        Event::Renamed { .. } => {}
        Event::OtherNamesChanged { path, dev, ino } => {
            if let Match::Inside(group, _) = filter.classify(path, false)
                && let Some(links) = links_of(group)
            {
                let key = FileKey {
                    dev: *dev,
                    ino: *ino,
                };
                return links
                    .names_of(key)
                    .into_iter()
                    .map(|name| (group, name))
                    .collect();
            }
        }
        Event::Rescan { path } => {
            for t in targets {
                if path.starts_with(&t.settings.root) || t.settings.root.starts_with(path) {
                    t.settings.hard_links.lost_events();
                }
            }
        }
        Event::Overflow => {
            for t in targets {
                t.settings.hard_links.lost_events();
            }
        }
    }
    Vec::new()
}

/// Marks what `event` dirtied in every target of its group. Returns whether anything was marked.
pub(super) fn route(
    filter: &Filter,
    targets: &mut [TargetState],
    event: &Event,
    now: Instant,
) -> bool {
    let other_names = track_links(filter, targets, event);
    // What was written below a name before it moves away goes with it (see `Backlog::moving`).
    if let Event::Change {
        kind: ChangeKind::MovedFrom,
        path,
        is_dir,
        ..
    } = event
        && let Match::Inside(group, rel) = filter.classify(path, *is_dir)
    {
        for t in targets.iter_mut().filter(|t| t.settings.group == group) {
            t.backlog.moving(rel);
        }
    }
    let mut mark = |group: GroupId, rel: &Path, scope: Scope| {
        let mut any = false;
        for t in targets.iter_mut().filter(|t| t.settings.group == group) {
            t.mark(rel, scope, now);
            any = true;
        }
        any
    };
    for (group, name) in &other_names {
        mark(*group, name, Scope::Entry);
    }
    match event {
        Event::Change {
            kind, path, is_dir, ..
        } => {
            let adds_or_removes = kind.adds_or_removes();
            let (group, rel) = match filter.classify(path, *is_dir) {
                Match::Inside(group, rel) => (group, rel),
                // An excluded name still changes its directory's mtime as it comes and goes.
                Match::Excluded(_, rel) if adds_or_removes => {
                    // Only if the directory itself is synced (it may be excluded as well).
                    if rel.parent().is_some()
                        && let Some(dir) = path.parent()
                        && let Match::Inside(group, parent) = filter.classify(dir, true)
                    {
                        mark(group, parent, Scope::Entry);
                    }
                    return false;
                }
                Match::Excluded(..) | Match::Outside => return false,
            };
            // A directory that appears may already hold files nobody reported to us.
            let scope = if *is_dir && matches!(kind, ChangeKind::Created | ChangeKind::MovedTo) {
                Scope::Subtree
            } else {
                Scope::Entry
            };
            let marked = mark(group, rel, scope);
            // Adding or removing a name changes the parent's mtime, and rsync does not carry
            // the times of directories it only implies from a listed path.
            if adds_or_removes && let Some(parent) = rel.parent() {
                mark(group, parent, Scope::Entry);
            }
            marked
        }
        Event::Renamed { from, to, is_dir } => {
            // Only a rename within one group, between names rsync syncs, can be replayed;
            // anything else stays what its MovedFrom and MovedTo made it (a delete, a new
            // subtree).
            let (Match::Inside(group, old), Match::Inside(to_group, new)) =
                (filter.classify(from, *is_dir), filter.classify(to, *is_dir))
            else {
                return false;
            };
            if group != to_group {
                return false;
            }
            // Found in place after the replay, a renamed file need not be sent again: listed
            // as a subtree, rsync compares it by size and mtime instead of rewriting it (a
            // listed entry is sent whatever its times). Not a file with other names: as an
            // entry, the batch brings every name of it along (see `link_walk`).
            let quick_check = !*is_dir
                && std::fs::symlink_metadata(to).is_ok_and(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.is_file() && m.nlink() == 1
                });
            for t in targets.iter_mut().filter(|t| t.settings.group == group) {
                t.backlog.renamed(old, new);
                if quick_check {
                    t.mark(new, Scope::Subtree, now);
                }
                for written in t.backlog.carried(old, new) {
                    t.mark(&written, Scope::Entry, now);
                }
            }
            false
        }
        Event::Rescan { path } => {
            let mut any = false;
            if let Some((group, rel)) = filter.lookup(path, true) {
                any |= mark(group, rel, Scope::Subtree);
            }
            for group in filter.groups_at_or_below(path) {
                any |= mark(group, Path::new(""), Scope::Subtree);
            }
            any
        }
        // Its names were marked by `track_links`.
        Event::OtherNamesChanged { .. } => !other_names.is_empty(),
        Event::Overflow => {
            let mut any = false;
            for group in filter.groups() {
                any |= mark(group, Path::new(""), Scope::Subtree);
            }
            any
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flush::FlushConfig;

    fn target(group: GroupId) -> TargetState {
        TargetState {
            settings: Settings {
                group,
                group_name: "g".into(),
                name: "t".into(),
                dest: Target::Remote("host::m".into()),
                root: "/srv/data".into(),
                root_id: FileId { dev: 0, ino: 0 },
                rsync: RsyncOptions::default(),
                hard_links: HardLinks::new(Path::new("/srv/data")),
                link: None,
                post_sync: None,
                standby: None,
            },
            backlog: Backlog::new(1_000, None),
            machine: SyncMachine::new(FlushConfig::default(), None, Instant::now()),
            failing: FailingPaths::default(),
        }
    }

    fn change(kind: ChangeKind, path: &str, is_dir: bool) -> Event {
        Event::Change {
            kind,
            path: path.into(),
            is_dir,
            pid: 1,
        }
    }

    fn batch(entries: &[&str], subtrees: &[&str]) -> Batch {
        Batch {
            entries: entries.iter().map(PathBuf::from).collect(),
            subtrees: subtrees.iter().map(PathBuf::from).collect(),
            ..Batch::default()
        }
    }

    #[test]
    fn events_mark_what_rsync_must_look_at() {
        use ChangeKind::*;
        let table: &[(Event, Batch)] = &[
            (
                change(Modified, "/srv/data/d/f", false),
                batch(&["d/f"], &[]),
            ),
            (change(Attrib, "/srv/data/d", true), batch(&["d"], &[])),
            // A new name changes its directory's mtime too.
            (
                change(Created, "/srv/data/d/f", false),
                batch(&["d", "d/f"], &[]),
            ),
            (
                change(Deleted, "/srv/data/f", false),
                batch(&["", "f"], &[]),
            ),
            // A directory that appears brings whatever it already holds.
            (
                change(Created, "/srv/data/d/new", true),
                batch(&["d"], &["d/new"]),
            ),
            (change(MovedTo, "/srv/data/n", true), batch(&[""], &["n"])),
            (
                change(MovedFrom, "/srv/data/old", true),
                batch(&["", "old"], &[]),
            ),
            // Excluded: not synced, but its directory's mtime is.
            (
                change(Created, "/srv/data/d/x.swp", false),
                batch(&["d"], &[]),
            ),
            (
                change(Modified, "/srv/data/d/x.swp", false),
                batch(&[], &[]),
            ),
            // Inside an excluded directory: nothing at all.
            (
                change(Created, "/srv/data/.cache/a/b", false),
                batch(&[], &[]),
            ),
            (change(Created, "/srv/other/f", false), batch(&[], &[])),
            (
                Event::Rescan {
                    path: "/srv/data/d".into(),
                },
                batch(&[], &["d"]),
            ),
            (
                Event::Rescan {
                    path: "/srv".into(),
                },
                batch(&[], &[""]),
            ),
            (Event::Overflow, batch(&[], &[""])),
        ];
        for (event, want) in table {
            let mut builder = FilterBuilder::new();
            let group = builder
                .add_root(Path::new("/srv/data"), &["*.swp".into(), ".cache/".into()])
                .unwrap();
            let filter = builder.build().unwrap();
            let mut targets = vec![target(group), target(group)];
            route(&filter, &mut targets, event, Instant::now());
            for t in &mut targets {
                assert_eq!(&t.backlog.take_all(), want, "{event:?}");
            }
        }
    }
}
