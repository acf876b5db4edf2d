//! Wiring: backend thread -> filter -> backlog per target -> state machine -> rsync runner.
//! Owns the event loop, signals, reloads, status snapshots and the summary at exit; the
//! decisions (when to flush, what a failed run means) are each target's [`SyncMachine`]'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::backend::{self, Backend, OwnPids};
use crate::backlog::Backlog;
use crate::config::Config;
use crate::dirty::{Batch, Scope};
use crate::event::{ChangeKind, Event};
use crate::failing::{self, FailingPaths};
use crate::filter::{Filter, FilterBuilder, GroupId, Match};
use crate::journal::{Journal, Recovered};
use crate::notify::{Standing, StatusLine, notify, status_text};
use crate::rsync::{self, RsyncOptions};
use crate::runner::{self, Job, is_dir};
use crate::status::{self, Failures, Histogram, LastSync, LastVerify, StatusSnapshot};
use crate::sync_machine::{
    Action, FIRST_BACKOFF, FlushKind, GiveUpCause, Mode, RACES_BEFORE_WHOLE_TREE, RetryCause,
    SyncMachine, Verdict,
};
use crate::target::Target;

/// How the daemon runs, beyond what the configuration says.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Re-read on SIGHUP (a config file given with `watcher run`).
    pub config_path: Option<PathBuf>,
    /// Journal dirty paths under the configured state directory.
    pub journal: bool,
    /// Serve `watcher status` on the configured socket (and metrics, if configured).
    pub status: bool,
    /// rsync --dry-run --itemize-changes; nothing on any target changes.
    pub dry_run: bool,
}

/// How often journals are made durable and the status snapshot is refreshed.
const HOUSEKEEPING: Duration = Duration::from_millis(200);

/// Batches of events in flight from the reader thread; when full, the reader stops reading
/// and the kernel queue absorbs the burst (or overflows, which triggers a rescan).
const EVENT_CHANNEL_BATCHES: usize = 256;

/// What a target is: where it syncs from and to, and how rsync is invoked. Fixed for the
/// life of an engine.
struct Settings {
    group: GroupId,
    group_name: String,
    name: String,
    dest: Target,
    root: PathBuf,
    /// What the root was when the engine started: a root replaced, moved or mounted over
    /// stops its group rather than being followed.
    root_id: FileId,
    rsync: RsyncOptions,
}

/// A file's identity: its device and inode, read without following a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path)?;
        Ok(FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// What a target has done, for status and the summary. Kept across reloads (in [`Stats`]),
/// so counters only ever grow.
#[derive(Debug)]
struct TargetStats {
    runs: u64,
    /// Batches put back to be retried after a failed run.
    retries: u64,
    failures: Failures,
    run_seconds: Histogram,
    transfer: rsync::TransferStats,
    last_sync: Option<LastSync>,
    last_success_unix_ms: Option<u64>,
    last_verify: Option<LastVerify>,
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
        }
    }
}

impl TargetStats {
    /// Counts what a finished batch did: its runs, their durations and bytes, and how it
    /// failed if it did.
    fn count(&mut self, done: &runner::Done) {
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

/// One target: its own backlog and decisions, so a slow or unreachable target never holds
/// back another.
struct TargetState {
    settings: Settings,
    backlog: Backlog,
    machine: SyncMachine,
    /// Paths rsync keeps failing on, set aside so the rest keeps syncing.
    failing: FailingPaths,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl TargetState {
    /// Marks `rel` dirty (journaled; the backlog folds itself past its bound).
    fn mark(&mut self, rel: &Path, scope: Scope, now: Instant) {
        self.backlog.mark(rel, scope, now, &self.settings.dest);
    }

    /// Puts a batch that did not sync back, widened around its files for a run cut short.
    fn put_back(&mut self, batch: Batch, now: Instant, widen: bool) {
        let root = &self.settings.root;
        self.backlog
            .put_back(batch, now, widen, |rel| is_dir(&root.join(rel)));
    }

    /// The machine hears of marks made outside the event flow (recovered, carried over, the
    /// initial sync); the first events must not count them again.
    fn settle_marks(&mut self, now: Instant) {
        if !self.backlog.is_empty() {
            self.machine.changed(now);
        }
        self.backlog.take_touched();
    }

    /// Whether the source root is still the directory the engine started with. When it is
    /// not, the target is given up with an error (once).
    fn root_still_there(&mut self) -> bool {
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
    fn start_flush(&mut self, index: usize, kind: FlushKind, now: Instant) -> Job {
        let (batch, renames) = match kind {
            FlushKind::Changes => {
                self.failing.batch_started();
                let renames = self.backlog.take_renames();
                (self.backlog.take_batch(now), renames)
            }
            FlushKind::Verify => (self.backlog.verify_batch(), Vec::new()),
        };
        self.machine.started(now, kind);
        tracing::debug!(target = %self.settings.dest, paths = batch.len(), ?kind, "flushing");
        Job {
            target: index,
            kind,
            batch,
            root: self.settings.root.clone(),
            dest: self.settings.dest.clone(),
            opts: self.settings.rsync.clone(),
            set_aside: self.failing.excludes(),
            stop: None,
            renames,
        }
    }

    /// Paths set aside whose wait is over go into the backlog again, to be tried.
    fn retry_set_aside(&mut self, now: Instant) {
        for rel in self.failing.due(now) {
            let scope = if is_dir(&self.settings.root.join(&rel)) {
                Scope::Subtree
            } else {
                Scope::Entry
            };
            self.mark(&rel, scope, now);
        }
        if self.backlog.take_touched() {
            self.machine.changed(now);
        }
    }

    /// Says each change of the set-aside paths once.
    fn log_failing(&self, changes: Vec<failing::Change>) {
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

/// Marks what `event` dirtied in every target of its group. Returns whether anything was marked.
fn route(filter: &Filter, targets: &mut [TargetState], event: &Event, now: Instant) -> bool {
    let mut mark = |group: GroupId, rel: &Path, scope: Scope| {
        let mut any = false;
        for t in targets.iter_mut().filter(|t| t.settings.group == group) {
            t.mark(rel, scope, now);
            any = true;
        }
        any
    };
    match event {
        Event::Change {
            kind, path, is_dir, ..
        } => {
            let adds_or_removes = !matches!(kind, ChangeKind::Modified | ChangeKind::Attrib);
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
            for t in targets.iter_mut().filter(|t| t.settings.group == group) {
                t.backlog.renamed(old, new);
                // Found in place after the replay, a renamed file need not be sent again:
                // listed as a subtree, rsync compares it by size and mtime instead of
                // rewriting it (a listed entry is sent whatever its times).
                if !*is_dir {
                    t.mark(new, Scope::Subtree, now);
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
        Event::Overflow => {
            let mut any = false;
            for group in filter.groups() {
                any |= mark(group, Path::new(""), Scope::Subtree);
            }
            any
        }
    }
}

/// Counters for status and the summary at exit. They belong to the daemon, not to one
/// configuration: a reload keeps them.
#[derive(Debug, Default)]
struct Stats {
    event_batches: u64,
    /// Changes under a source root that marked a path for some target.
    events: u64,
    /// Everything the backend read, including changes elsewhere on a watched filesystem.
    backend_events: u64,
    overflows: u64,
    rescans: u64,
    /// For events/s in status: (when, events) at the last refresh.
    rate_mark: Option<(Instant, u64)>,
    events_per_sec: f64,
    /// Per group and target name.
    targets: HashMap<String, HashMap<String, TargetStats>>,
}

impl Stats {
    fn target(&self, settings: &Settings) -> Option<&TargetStats> {
        self.targets.get(&settings.group_name)?.get(&settings.name)
    }

    fn target_mut(&mut self, settings: &Settings) -> &mut TargetStats {
        self.targets
            .entry(settings.group_name.clone())
            .or_default()
            .entry(settings.name.clone())
            .or_default()
    }
}

/// `watcher sync` / `watcher run`: returns the process exit code.
pub fn run(config: Config, opts: RunOptions) -> anyhow::Result<i32> {
    let version = rsync::probe(&config.daemon.rsync)?;
    tracing::debug!(version, "rsync self-test passed");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(supervise(config, opts))
}

/// Where an engine's event loop stands.
enum Lifecycle {
    /// Syncing changes as they come; `ready` once every target finished start-up.
    Running { ready: bool },
    /// Flushing what is dirty, then exiting.
    Draining(DrainCause),
    /// Waiting for the flushes in flight, then handing over to a new configuration.
    Reloading(Box<Config>),
}

/// Why an engine drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainCause {
    /// SIGTERM or SIGINT.
    Signal,
    /// The event reader stopped on its own: exit non-zero.
    ReaderStopped,
}

impl Lifecycle {
    fn mode(&self) -> Mode {
        match self {
            Lifecycle::Running { .. } => Mode::Running,
            Lifecycle::Draining(_) => Mode::Draining,
            Lifecycle::Reloading(_) => Mode::Reloading,
        }
    }
}

/// Everything built from one configuration.
struct Engine {
    config: Config,
    filter: Filter,
    targets: Vec<TargetState>,
    backend_name: &'static str,
    /// Event batches from the reader thread; None once it closed the channel.
    events: Option<mpsc::Receiver<Vec<Event>>>,
    reader: Option<std::thread::JoinHandle<Result<(), backend::BackendError>>>,
    stop: Arc<AtomicBool>,
    /// Set on SIGTERM/SIGINT: a verify pass in flight stops at once (it is only a check
    /// and runs again on its schedule), so the exit never waits for a whole-tree compare.
    stop_verify: watch::Sender<bool>,
}

/// A configuration that passed every check, with its backend started (so no change is
/// missed), not yet running.
struct Prepared {
    config: Config,
    filter: Filter,
    targets: Vec<TargetState>,
    backend: Box<dyn Backend>,
}

/// What ended one engine's event loop.
enum Outcome {
    Exit(i32),
    Reload(Box<Config>),
}

async fn supervise(config: Config, opts: RunOptions) -> anyhow::Result<i32> {
    let own_pids = Arc::new(OwnPids::new());
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let signals = Signals {
        term: &mut sigterm,
        int: &mut sigint,
        hup: &mut sighup,
    };

    let (status_tx, status_rx) = watch::channel(StatusSnapshot::default());
    let mut servers = JoinSet::new();
    if opts.status {
        let socket = status::StatusSocket::bind(&config.daemon.status_socket)
            .context("opening the status socket")?;
        let rx = status_rx.clone();
        servers.spawn(async move {
            if let Err(e) = socket.serve(rx).await {
                tracing::error!(error = %e, "status socket stopped");
            }
        });
        if let Some(addr) = config.daemon.metrics {
            let listener = status::MetricsListener::bind(addr, config.daemon.metrics_allow_remote)
                .context("opening the metrics endpoint")?;
            let rx = status_rx.clone();
            servers.spawn(async move {
                if let Err(e) = listener.serve(rx).await {
                    tracing::error!(error = %e, "metrics endpoint stopped");
                }
            });
        }
    }

    let started = SystemTime::now();
    let mut stats = Stats::default();
    let prepared = Engine::prepare(config, &opts, &own_pids, None)?;
    let mut engine = prepared.into_engine(&opts, Vec::new());
    // The marks are set: every change from now on is seen, so the service is up. The
    // initial sync goes on behind it and is reported in STATUS= lines.
    notify(&[sd_notify::NotifyState::Ready]);
    let mut signals = signals;
    let code = loop {
        match engine
            .run(
                &opts,
                &own_pids,
                &status_tx,
                started,
                &mut stats,
                &mut signals,
            )
            .await?
        {
            Outcome::Exit(code) => break code,
            Outcome::Reload(new_config) => {
                match Engine::prepare(*new_config, &opts, &own_pids, Some(&engine)) {
                    Ok(prepared) => {
                        // The new marks are set and every new part is ready: stop the old reader,
                        // take in its last events, and carry every dirty path and journal over.
                        let carried = engine.stop_and_hand_over().await;
                        engine = prepared.into_engine(&opts, carried);
                        tracing::info!("configuration reloaded");
                        notify(&[sd_notify::NotifyState::Ready]);
                    }
                    Err(e) => {
                        tracing::error!("reload failed, keeping the running configuration: {e:#}");
                        notify(&[sd_notify::NotifyState::Ready]);
                    }
                }
            }
        }
    };
    servers.abort_all();
    Ok(code)
}

struct Signals<'a> {
    term: &'a mut tokio::signal::unix::Signal,
    int: &'a mut tokio::signal::unix::Signal,
    hup: &'a mut tokio::signal::unix::Signal,
}

/// Dirty paths and journals carried across a reload, keyed by group and target name.
type HandOver = Vec<(String, String, Batch, Option<Journal>)>;

/// Which targets of the running engine a new one takes over, by group and target name.
type Continuing = Vec<(String, String)>;

/// Opens the journal of a target, replaying what the previous run left: its unsynced marks,
/// and whether it stopped cleanly.
fn open_journal(
    config: &Config,
    group: &str,
    target: &str,
) -> anyhow::Result<(Journal, Recovered)> {
    let dir = &config.daemon.state_dir;
    let (journal, found) = Journal::open_target(dir, group, target)
        .with_context(|| format!("opening the journal in {}", dir.display()))?;
    if !found.marks.is_empty() {
        tracing::info!(group = %group, target = %target, paths = found.marks.len(),
            "resuming unsynced changes from the journal");
    }
    if found.existed && !found.clean {
        tracing::warn!(group = %group, target = %target,
            "previous run did not shut down cleanly: re-syncing the whole tree");
    }
    Ok((journal, found))
}

/// Builds every target of `config`. Targets the running engine has (`continuing`) get their
/// backlog and journal when it hands them over; the others open their journal here, so a
/// journal that cannot be opened fails the new configuration before anything of the old
/// one stopped.
fn target_states(
    config: &Config,
    groups: &[GroupId],
    opts: &RunOptions,
    filter: &Filter,
    continuing: &Continuing,
) -> anyhow::Result<Vec<TargetState>> {
    let now = Instant::now();
    let mut targets = Vec::new();
    for (group, g) in groups.iter().zip(&config.groups) {
        let root = filter.root(*group).to_path_buf();
        let root_id = FileId::of(&root)
            .with_context(|| format!("sync group {}: source {}", g.name, root.display()))?;
        for t in &g.targets {
            let settings = Settings {
                group: *group,
                group_name: g.name.clone(),
                name: t.name.clone(),
                dest: t.dest.clone(),
                root: root.clone(),
                root_id,
                rsync: RsyncOptions {
                    binary: config.daemon.rsync.clone(),
                    hardlinks: g.hard_links,
                    one_file_system: g.one_file_system,
                    excludes: filter.excludes(*group).to_vec(),
                    extra_args: t.rsync_args(g),
                    dry_run: opts.dry_run,
                },
            };
            let carried = continuing
                .iter()
                .any(|(gn, tn)| *gn == g.name && *tn == t.name);
            let mut needs_full_sync = g.initial_sync && !carried;
            let mut recovered: Option<Recovered> = None;
            let journal = if opts.journal && !carried {
                let (journal, found) = open_journal(config, &g.name, &t.name)
                    .with_context(|| format!("sync group {}: target {}", g.name, t.name))?;
                // After an unclean stop, what changed while nobody was watching is unknown,
                // so the whole tree is compared.
                needs_full_sync |= found.existed && !found.clean;
                recovered = Some(found);
                Some(journal)
            } else {
                None
            };
            let mut state = TargetState {
                settings,
                backlog: Backlog::new(t.max_backlog, journal),
                machine: SyncMachine::new(g.flush, g.verify_interval, now),
                failing: FailingPaths::default(),
            };
            if let Some(found) = &recovered {
                state.backlog.restore(&found.marks, now);
            }
            if needs_full_sync {
                state.mark(Path::new(""), Scope::Subtree, now);
                state.machine.needs_initial_sync();
            }
            state.settle_marks(now);
            targets.push(state);
        }
    }
    Ok(targets)
}

/// What a reload cannot change while the daemon runs: said clearly, and the running
/// configuration kept.
fn check_reloadable(old: &Config, new: &Config, opts: &RunOptions) -> anyhow::Result<()> {
    let (was, now) = (&old.daemon, &new.daemon);
    if opts.journal && was.state_dir != now.state_dir {
        bail!(
            "state_dir changed from {} to {}: the journals cannot move while the daemon runs; \
             restart the service to use the new directory",
            was.state_dir.display(),
            now.state_dir.display()
        );
    }
    if opts.status && was.status_socket != now.status_socket {
        tracing::warn!(old = %was.status_socket.display(), new = %now.status_socket.display(),
            "status_socket changed: the new socket takes effect when the service restarts");
    }
    if opts.status && was.metrics != now.metrics {
        tracing::warn!("metrics changed: the new endpoint takes effect when the service restarts");
    }
    Ok(())
}

impl Prepared {
    /// Takes over the running engine's backlogs and journals and starts reading events.
    fn into_engine(mut self, opts: &RunOptions, carried: HandOver) -> Engine {
        let now = Instant::now();
        for (group, target, batch, journal) in carried {
            let Some(state) = self
                .targets
                .iter_mut()
                .find(|t| t.settings.group_name == group && t.settings.name == target)
            else {
                if !batch.is_empty() {
                    tracing::warn!(group = %group, target = %target, paths = batch.len(),
                        "target removed from the configuration; its unsynced paths are dropped");
                }
                continue;
            };
            // A journal dropped after a write error is tried again with the new engine.
            let journal = match journal {
                Some(journal) => Some(journal),
                None if opts.journal => match open_journal(&self.config, &group, &target) {
                    Ok((journal, _)) => Some(journal),
                    Err(e) => {
                        tracing::error!(group = %group, target = %target,
                            "{e:#}; continuing without a journal");
                        None
                    }
                },
                None => None,
            };
            state.backlog.set_journal(journal);
            state.backlog.restore_batch(batch, now);
            state.settle_marks(now);
        }
        let backend_name = self.backend.name();
        for g in &self.config.groups {
            tracing::info!(group = %g.name, source = %g.source.display(), backend = backend_name,
                targets = g.targets.len(), "watching");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (events, reader) = spawn_reader(self.backend, stop.clone());
        Engine {
            config: self.config,
            filter: self.filter,
            targets: self.targets,
            backend_name,
            events: Some(events),
            reader: Some(reader),
            stop,
            stop_verify: watch::Sender::new(false),
        }
    }
}

impl Engine {
    /// Builds everything a configuration needs and starts its backend (so no change is
    /// missed), without stopping or touching the running engine, if any: any failure leaves
    /// it running. Local target directories are created last, once every check passed (and
    /// never in a dry run).
    fn prepare(
        config: Config,
        opts: &RunOptions,
        own_pids: &Arc<OwnPids>,
        running: Option<&Engine>,
    ) -> anyhow::Result<Prepared> {
        if let Some(running) = running {
            check_reloadable(&running.config, &config, opts)?;
        }
        let mut builder = FilterBuilder::new();
        let mut groups = Vec::new();
        for g in &config.groups {
            let id = builder
                .add_group(&g.source, g.excludes.clone())
                .with_context(|| format!("sync group {}", g.name))?;
            groups.push(id);
        }
        let filter = builder.build()?;
        let roots: Vec<PathBuf> = config.groups.iter().map(|g| g.source.clone()).collect();
        let d = &config.daemon;
        let options = backend::BackendOptions {
            kind: d.backend,
            ebpf: backend::ebpf::EbpfOptions {
                ringbuf_bytes: d.ebpf_ringbuf_bytes,
                probes: d.ebpf_probes,
                kernel_filter: d.ebpf_kernel_filter,
            },
            one_file_system: config
                .groups
                .iter()
                .filter(|g| g.one_file_system)
                .map(|g| g.source.clone())
                .collect(),
        };
        let backend = backend::start(&options, &roots, own_pids.clone())
            .context("starting change capture")?;
        let continuing: Continuing = running.map_or_else(Vec::new, |engine| {
            engine
                .targets
                .iter()
                .map(|t| (t.settings.group_name.clone(), t.settings.name.clone()))
                .collect()
        });
        let targets = target_states(&config, &groups, opts, &filter, &continuing)?;
        if !opts.dry_run {
            for g in &config.groups {
                for t in &g.targets {
                    t.dest
                        .create_local_dir()
                        .with_context(|| format!("sync group {}: target {}", g.name, t.name))?;
                }
            }
        }
        Ok(Prepared {
            config,
            filter,
            targets,
            backend,
        })
    }

    /// The dirty paths of every target and their journals, after the reader stopped and its
    /// last events were routed.
    async fn stop_and_hand_over(mut self) -> HandOver {
        self.stop.store(true, Ordering::Relaxed);
        let now = Instant::now();
        if let Some(events) = self.events.as_mut() {
            while let Some(batch) = events.recv().await {
                for event in &batch {
                    route(&self.filter, &mut self.targets, event, now);
                }
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        self.targets
            .into_iter()
            .map(|t| {
                let (batch, journal) = t.backlog.hand_over();
                (t.settings.group_name, t.settings.name, batch, journal)
            })
            .collect()
    }

    fn snapshot(&self, stats: &Stats, started: SystemTime) -> StatusSnapshot {
        let now = Instant::now();
        let no_runs = TargetStats::default();
        let mut groups: Vec<status::GroupStatus> = Vec::new();
        for g in &self.config.groups {
            let targets = self
                .targets
                .iter()
                .filter(|t| t.settings.group_name == g.name)
                .map(|t| (t, stats.target(&t.settings).unwrap_or(&no_runs)))
                .map(|(t, ts)| status::TargetStatus {
                    name: t.settings.name.clone(),
                    dest: t.settings.dest.to_string(),
                    state: t.machine.phase(t.backlog.len()),
                    dirty_paths: t.backlog.len() as u64,
                    oldest_unsynced_ms: t
                        .backlog
                        .oldest_unsynced()
                        .map(|o| now.saturating_duration_since(o).as_millis() as u64),
                    in_flight_paths: t.backlog.in_flight_paths() as u64,
                    last_sync: ts.last_sync.clone(),
                    last_success_unix_ms: ts.last_success_unix_ms,
                    consecutive_failures: t.machine.failures(),
                    rsync_runs: ts.runs,
                    retries_total: ts.retries,
                    failures: ts.failures.clone(),
                    run_seconds: ts.run_seconds.clone(),
                    sent_bytes: ts.transfer.sent,
                    received_bytes: ts.transfer.received,
                    literal_bytes: ts.transfer.literal,
                    verify: ts.last_verify.clone(),
                    failing_paths: t
                        .failing
                        .iter()
                        .take(status::MAX_FAILING_SHOWN)
                        .map(|(path, f)| status::FailingPath {
                            path: path.to_string_lossy().into_owned(),
                            error: f.error.clone(),
                            since_unix_ms: f.since_unix_ms,
                            failures: f.failures,
                        })
                        .collect(),
                    failing_paths_total: t.failing.len() as u64,
                })
                .collect();
            groups.push(status::GroupStatus {
                name: g.name.clone(),
                source: g.source.display().to_string(),
                targets,
            });
        }
        StatusSnapshot {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_unix_ms: unix_ms(started),
            taken_unix_ms: unix_ms(SystemTime::now()),
            backend: self.backend_name.to_string(),
            events_total: stats.events,
            backend_events_total: stats.backend_events,
            events_per_sec: stats.events_per_sec,
            overflows: stats.overflows,
            rescans: stats.rescans,
            groups,
        }
    }

    /// Starts every flush the targets' machines ask for; returns the earliest instant one of
    /// them wants to be asked again.
    fn start_flushes(
        &mut self,
        mode: Mode,
        tasks: &mut JoinSet<runner::Done>,
        own_pids: &Arc<OwnPids>,
    ) -> Option<Instant> {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        for (index, t) in self.targets.iter_mut().enumerate() {
            if mode == Mode::Running {
                t.retry_set_aside(now);
                if let Some(at) = t.failing.next_due() {
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                }
            }
            match t.machine.decide(now, t.backlog.len(), mode) {
                Action::Flush(_) if !t.root_still_there() => {}
                Action::Flush(kind) => {
                    let mut job = t.start_flush(index, kind, now);
                    if kind == FlushKind::Verify {
                        job.stop = Some(self.stop_verify.subscribe());
                    }
                    tasks.spawn(runner::run(job, own_pids.clone()));
                }
                Action::WaitUntil(at) => wake = Some(wake.map_or(at, |w| w.min(at))),
                Action::Idle => {}
            }
        }
        wake
    }

    /// Routes a batch of events from the reader and tells each touched target's machine.
    fn take_in(&mut self, batch: &[Event], stats: &mut Stats) {
        let now = Instant::now();
        stats.event_batches += 1;
        stats.backend_events += batch.len() as u64;
        for event in batch {
            let marked = route(&self.filter, &mut self.targets, event, now);
            match event {
                Event::Overflow => stats.overflows += 1,
                Event::Rescan { .. } => stats.rescans += 1,
                Event::Change { .. } => stats.events += u64::from(marked),
                Event::Renamed { .. } => {}
            }
        }
        for t in &mut self.targets {
            if t.backlog.take_touched() {
                t.machine.changed(now);
            }
        }
    }

    /// Housekeeping: journals made durable, the event rate, a fresh status snapshot.
    fn housekeeping(
        &mut self,
        stats: &mut Stats,
        status_tx: &watch::Sender<StatusSnapshot>,
        started: SystemTime,
    ) {
        for t in &mut self.targets {
            t.backlog.sync_journal(&t.settings.dest);
            t.root_still_there();
        }
        let now = Instant::now();
        if let Some((at, count)) = stats.rate_mark {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            if secs >= 1.0 {
                stats.events_per_sec = (stats.events - count) as f64 / secs;
                stats.rate_mark = Some((now, stats.events));
            }
        } else {
            stats.rate_mark = Some((now, stats.events));
        }
        status_tx.send_replace(self.snapshot(stats, started));
    }

    async fn run(
        &mut self,
        opts: &RunOptions,
        own_pids: &Arc<OwnPids>,
        status_tx: &watch::Sender<StatusSnapshot>,
        started: SystemTime,
        stats: &mut Stats,
        signals: &mut Signals<'_>,
    ) -> anyhow::Result<Outcome> {
        let mut tasks: JoinSet<runner::Done> = JoinSet::new();
        let mut lifecycle = Lifecycle::Running { ready: false };
        let mut status_line = StatusLine::default();
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watchdog =
            sd_notify::watchdog_enabled().map(|period| tokio::time::interval(period / 2));
        if self.targets.iter().any(|t| !t.machine.in_step()) {
            tracing::info!("initial sync started");
        }

        loop {
            let wake = self.start_flushes(lifecycle.mode(), &mut tasks, own_pids);
            // An unreachable target must not hold the service in start-up forever: its
            // initial sync keeps being retried after `ready`, and status shows it.
            if let Lifecycle::Running { ready } = &mut lifecycle
                && !*ready
                && self.targets.iter().all(|t| t.machine.started_up())
            {
                *ready = true;
                tracing::info!(targets = self.targets.len(), "ready");
            }
            status_line.update(self.status_text());
            if self.targets.iter().all(|t| t.machine.given_up()) {
                break;
            }
            let in_flight = self.targets.iter().any(|t| t.machine.in_flight().is_some());
            match &lifecycle {
                Lifecycle::Reloading(_) if !in_flight => break,
                Lifecycle::Draining(_)
                    if self.events.is_none()
                        && self
                            .targets
                            .iter()
                            .all(|t| t.machine.settled(t.backlog.len())) =>
                {
                    break;
                }
                _ => {}
            }

            let sleep = tokio::time::sleep_until(
                wake.map(tokio::time::Instant::from_std)
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                msg = async { match self.events.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => match msg {
                    Some(batch) => self.take_in(&batch, stats),
                    None => {
                        self.events = None;
                        if let Lifecycle::Running { .. } = lifecycle {
                            tracing::error!("the event reader stopped; flushing and exiting");
                            lifecycle = Lifecycle::Draining(DrainCause::ReaderStopped);
                        }
                    }
                },
                Some(joined) = tasks.join_next() => {
                    let done = joined.context("a flush task panicked")?;
                    self.finish(done, lifecycle.mode(), stats);
                },
                _ = housekeeping.tick() => self.housekeeping(stats, status_tx, started),
                _ = async { match watchdog.as_mut() { Some(w) => { w.tick().await; } None => std::future::pending().await } } => {
                    notify(&[sd_notify::NotifyState::Watchdog]);
                },
                _ = sleep => {},
                _ = signals.term.recv() => begin_shutdown(&mut lifecycle, &self.stop, &self.stop_verify, "SIGTERM")?,
                _ = signals.int.recv() => begin_shutdown(&mut lifecycle, &self.stop, &self.stop_verify, "SIGINT")?,
                _ = signals.hup.recv() => {
                    let path = opts.config_path.as_deref();
                    match (path, &lifecycle) {
                        (Some(path), Lifecycle::Running { .. } | Lifecycle::Reloading(_)) => {
                            notify(&[sd_notify::NotifyState::Reloading]);
                            match crate::config::load(path) {
                                Ok(cfg) => {
                                    tracing::info!(config = %path.display(), "SIGHUP: reloading once in-flight syncs finish");
                                    lifecycle = Lifecycle::Reloading(Box::new(cfg));
                                }
                                Err(e) => {
                                    tracing::error!("SIGHUP: {e}; keeping the running configuration");
                                    notify(&[sd_notify::NotifyState::Ready]);
                                }
                            }
                        }
                        (Some(_), Lifecycle::Draining(_)) => {
                            tracing::info!("SIGHUP ignored: exiting");
                        }
                        (None, _) => tracing::info!("SIGHUP ignored: no configuration file to reload"),
                    }
                },
            }
        }

        if let Lifecycle::Reloading(cfg) = lifecycle {
            status_tx.send_replace(self.snapshot(stats, started));
            return Ok(Outcome::Reload(cfg));
        }
        let mut reader_failed = lifecycle_failed(&lifecycle);
        notify(&[sd_notify::NotifyState::Stopping]);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(events) = self.events.as_mut() {
            events.close();
        }
        if let Some(reader) = self.reader.take() {
            match tokio::task::spawn_blocking(move || reader.join()).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::error!("event reader failed: {}", backend::error_chain(&e));
                    reader_failed = true;
                }
                _ => bail!("the event reader thread panicked"),
            }
        }
        let unsynced: usize = self.targets.iter().map(|t| t.backlog.len()).sum();
        for t in &mut self.targets {
            t.backlog.close(&t.settings.dest);
        }
        tracing::info!(
            events = stats.events,
            backend_events = stats.backend_events,
            event_batches = stats.event_batches,
            overflows = stats.overflows,
            rescans = stats.rescans,
            rsync_runs = stats
                .targets
                .values()
                .flat_map(|g| g.values())
                .map(|t| t.runs)
                .sum::<u64>(),
            unsynced,
            "stopped"
        );
        let gave_up = self.targets.iter().any(|t| t.machine.given_up());
        Ok(Outcome::Exit(i32::from(reader_failed || gave_up)))
    }

    /// The `STATUS=` line for systemd: initial sync progress, in step, retrying targets.
    fn status_text(&self) -> String {
        let several_groups = self.config.groups.len() > 1;
        let standings: Vec<Standing> = self
            .targets
            .iter()
            .map(|t| Standing {
                label: if several_groups {
                    format!("{}/{}", t.settings.group_name, t.settings.name)
                } else {
                    t.settings.name.clone()
                },
                in_step: t.machine.in_step(),
                retrying: t.machine.failures() > 0,
                failed: t.machine.given_up(),
            })
            .collect();
        status_text(&standings)
    }

    /// Takes a finished flush into account: the target's machine decides, this carries
    /// the decision out on the backlog and says it in the log.
    fn finish(&mut self, done: runner::Done, mode: Mode, stats: &mut Stats) {
        let now = Instant::now();
        let t = &mut self.targets[done.target];
        let ts = stats.target_mut(&t.settings);
        ts.count(&done);
        let mut finished = done.finished();
        if finished.kind == FlushKind::Changes
            && let Some(failures) = &done.failures
        {
            let (rerun, changes) = t.failing.failed(now, unix_ms(SystemTime::now()), failures);
            t.log_failing(changes);
            finished.set_aside = rerun;
        }
        let verdict = t.machine.finished(now, finished, mode);
        match verdict {
            Verdict::Synced { .. } => {
                let changes = t.failing.synced();
                t.log_failing(changes);
            }
            Verdict::Retry {
                cause: RetryCause::PathsSetAside,
                ..
            }
            | Verdict::Verified => {}
            Verdict::Retry { .. } | Verdict::GiveUp { .. } => t.failing.not_synced(),
        }
        let record = LastSync {
            finished_unix_ms: unix_ms(SystemTime::now()),
            ok: done.class == rsync::ExitClass::Success,
            code: done.code,
            paths: done.batch.len() as u64,
            elapsed_ms: done.elapsed.as_millis() as u64,
            detail: done.detail.lines().next().unwrap_or("").to_string(),
        };
        let dest = t.settings.dest.clone();
        match verdict {
            Verdict::Verified if done.stopped => {
                t.backlog.verify_done();
                tracing::info!(target = %dest, "verify pass stopped for exit; it runs again on its schedule after the next start");
            }
            Verdict::Verified => {
                t.backlog.verify_done();
                ts.last_verify = Some(LastVerify {
                    finished_unix_ms: record.finished_unix_ms,
                    fixed_paths: done.itemized,
                    ok: record.ok,
                });
                if record.ok {
                    tracing::info!(target = %dest, repaired = done.itemized, "verify pass done");
                } else {
                    tracing::warn!(target = %dest, "verify pass failed: {}", done.detail);
                }
            }
            Verdict::Synced { initial_sync_done } => {
                ts.last_success_unix_ms = Some(record.finished_unix_ms);
                ts.last_sync = Some(record);
                t.backlog.confirm(&dest);
                if initial_sync_done {
                    tracing::info!(target = %dest, elapsed_ms = done.elapsed.as_millis() as u64, "initial sync done");
                }
            }
            Verdict::Retry {
                cause,
                widen,
                whole_tree,
                at,
            } => {
                ts.retries += 1;
                ts.last_sync = Some(record);
                // A run cut short (a signal, a race) may leave temporary files where a
                // transfer was under way: widening syncs the directories it worked in.
                t.put_back(done.batch, now, widen);
                match cause {
                    RetryCause::Failure => {
                        let wait =
                            at.map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
                        tracing::warn!(target = %dest, retry_in_ms = wait.as_millis() as u64,
                            paths = t.backlog.len(), "{}", done.detail);
                    }
                    RetryCause::SourceRace if whole_tree => {
                        t.mark(Path::new(""), Scope::Subtree, now);
                        tracing::warn!(target = %dest, "rsync lost {RACES_BEFORE_WHOLE_TREE} \
                            runs in a row to directories changing under it; syncing the whole tree");
                    }
                    RetryCause::SourceRace => {
                        tracing::info!(target = %dest, retry_in_ms = FIRST_BACKOFF.as_millis() as u64,
                            "a listed directory changed while rsync read it; retrying");
                        tracing::debug!(target = %dest, "{}", done.detail);
                    }
                    RetryCause::PathsSetAside => {
                        tracing::debug!(target = %dest, "{}", done.detail);
                    }
                }
            }
            Verdict::GiveUp { cause, widen } => {
                ts.last_sync = Some(record);
                t.put_back(done.batch, now, widen);
                match cause {
                    GiveUpCause::Draining => {
                        tracing::error!(target = %dest, paths = t.backlog.len(),
                        "{}; exiting with changes not synced", done.detail)
                    }
                    GiveUpCause::Fatal => tracing::error!(target = %dest, paths = t.backlog.len(),
                        "{}; this target is no longer synced", done.detail),
                }
            }
        }
    }
}

/// The engine drains because its reader stopped on its own.
fn lifecycle_failed(lifecycle: &Lifecycle) -> bool {
    matches!(lifecycle, Lifecycle::Draining(DrainCause::ReaderStopped))
}

/// Starts the reader thread: it owns the backend and forwards event batches.
fn spawn_reader(
    backend: Box<dyn Backend>,
    stop: Arc<AtomicBool>,
) -> (
    mpsc::Receiver<Vec<Event>>,
    std::thread::JoinHandle<Result<(), backend::BackendError>>,
) {
    let (tx, rx) = mpsc::channel::<Vec<Event>>(EVENT_CHANNEL_BATCHES);
    let handle = std::thread::Builder::new()
        .name("events".into())
        .spawn(move || backend.run(&mut |events| tx.blocking_send(events).is_ok(), &stop))
        .expect("spawning the event reader thread");
    (rx, handle)
}

/// First signal: stop reading, stop a verify pass, flush what is dirty, exit (a pending
/// reload is dropped). Second: exit now.
fn begin_shutdown(
    lifecycle: &mut Lifecycle,
    stop: &AtomicBool,
    stop_verify: &watch::Sender<bool>,
    signal: &str,
) -> anyhow::Result<()> {
    if let Lifecycle::Draining(_) = lifecycle {
        bail!("{signal} again: exiting without flushing");
    }
    tracing::info!(signal, "flushing pending changes, then exiting");
    notify(&[sd_notify::NotifyState::Stopping]);
    *lifecycle = Lifecycle::Draining(DrainCause::Signal);
    stop.store(true, Ordering::Relaxed);
    stop_verify.send_replace(true);
    Ok(())
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
