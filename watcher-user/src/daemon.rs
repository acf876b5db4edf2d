//! Wiring: backend thread -> filter -> dirty set per target -> flush policy -> rsync.
//! Owns the event loop, signals, reloads, the journal and status hooks, and the summary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::backend::{self, Backend, OwnPids};
use crate::config::Config;
use crate::dirty::{Batch, DirtySet, Scope};
use crate::event::{ChangeKind, Event};
use crate::filter::{Filter, FilterBuilder, GroupId, Match};
use crate::flush::{Decision, FlushPolicy};
use crate::journal::Journal;
use crate::rsync::{self, ExitClass, RsyncOptions};
use crate::status::{self, LastSync, LastVerify, StatusSnapshot, TargetState as Phase};
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

/// Longest wait between retries of a failing target.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Partial transfers (rsync code 23) retried at once before backing off.
const PARTIAL_RETRIES: u32 = 5;
/// Consecutive usage or protocol errors after which a target is given up.
const FATAL_AFTER: u32 = 3;
/// Consecutive runs lost to a source race (a listed directory vanished mid-run) after
/// which the next run is a whole-tree one, which such a race cannot abort.
const RACES_BEFORE_WHOLE_TREE: u32 = 3;
/// How often journals are made durable and the status snapshot is refreshed.
const HOUSEKEEPING: Duration = Duration::from_millis(200);
/// How often a long whole-tree run reports progress in the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Batches of events in flight from the reader thread; when full, the reader stops reading
/// and the kernel queue absorbs the burst (or overflows, which triggers a rescan).
const EVENT_CHANNEL_BATCHES: usize = 256;

/// What a flush is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlushKind {
    /// Dirty paths (or the whole root, for the initial sync and rescans).
    Changes,
    /// A scheduled whole-tree pass that counts what it had to repair.
    Verify,
}

/// Per-target state: its own backlog, so a slow or unreachable target never holds back another.
struct TargetState {
    group: GroupId,
    group_name: String,
    name: String,
    target: Target,
    root: PathBuf,
    rsync: RsyncOptions,
    dirty: DirtySet,
    /// When the oldest change still in `dirty` was marked.
    dirty_since: Option<Instant>,
    policy: FlushPolicy,
    max_backlog: usize,
    in_flight: Option<InFlight>,
    retry_at: Option<Instant>,
    failures: u32,
    retries_total: u64,
    /// Set after a fatal rsync error: the target is no longer synced.
    fatal: Option<String>,
    /// A whole-tree sync has completed since start (or none was needed).
    in_step: bool,
    runs: u64,
    journal: Option<Journal>,
    verify_interval: Option<Duration>,
    verify_due: Option<Instant>,
    last_sync: Option<LastSync>,
    last_verify: Option<LastVerify>,
    /// Marked since the flush policy last heard of it.
    touched: bool,
    /// Consecutive runs that ended in a usage or protocol error.
    fatal_streak: u32,
    /// Consecutive runs aborted by a source race.
    race_streak: u32,
}

struct InFlight {
    kind: FlushKind,
    paths: usize,
    /// Oldest change the batch carries.
    oldest: Instant,
    journal_seq: Option<u64>,
}

/// What a flush task reports back.
struct FlushDone {
    target: usize,
    kind: FlushKind,
    batch: Batch,
    class: ExitClass,
    code: Option<i32>,
    /// An rsync run was killed by a signal.
    killed: bool,
    detail: String,
    runs: u64,
    /// Paths rsync itemized (verify passes count repairs this way).
    itemized: u64,
    elapsed: Duration,
}

fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl TargetState {
    /// Marks `rel` dirty, journaling it; folds the backlog when it passes its bound.
    fn mark(&mut self, rel: &Path, scope: Scope, now: Instant) {
        if self.dirty.is_empty() {
            self.dirty_since = Some(now);
        }
        self.touched = true;
        self.dirty.mark(rel, scope);
        if let Some(journal) = self.journal.as_mut()
            && let Err(e) = journal.record(rel, scope)
        {
            tracing::error!(target = %self.target, error = %e, "journal write failed; continuing without it");
            self.journal = None;
        }
        if self.dirty.len() > self.max_backlog {
            let folded = self.dirty.collapse(self.max_backlog / 2);
            tracing::warn!(target = %self.target, folded, "backlog over its bound: folded paths into their directories");
        }
    }

    /// Puts back a batch that did not sync, keeping the age of its oldest change;
    /// `widened` for a run cut short (see [`DirtySet::merge_widened`]).
    fn put_back(&mut self, batch: Batch, oldest: Instant, widened: bool) {
        if widened {
            let root = &self.root;
            self.dirty
                .merge_widened(batch, |rel| is_dir(&root.join(rel)));
        } else {
            self.dirty.merge(batch);
        }
        self.dirty_since = Some(self.dirty_since.map_or(oldest, |d| d.min(oldest)));
    }

    /// The oldest change not yet confirmed by rsync.
    fn oldest_unsynced(&self) -> Option<Instant> {
        let flying = self
            .in_flight
            .as_ref()
            .filter(|f| f.kind == FlushKind::Changes && f.paths > 0)
            .map(|f| f.oldest);
        match (flying, self.dirty_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn phase(&self) -> Phase {
        if self.fatal.is_some() {
            Phase::Failed
        } else if !self.in_step {
            Phase::InitialSync
        } else if self.failures > 0 {
            Phase::Retrying
        } else if self.in_flight.is_some() || !self.dirty.is_empty() {
            Phase::Syncing
        } else {
            Phase::InStep
        }
    }
}

/// Marks what `event` dirtied in every target of its group. Returns whether anything was marked.
fn route(filter: &Filter, targets: &mut [TargetState], event: &Event, now: Instant) -> bool {
    let mut mark = |group: GroupId, rel: &Path, scope: Scope| {
        let mut any = false;
        for t in targets.iter_mut().filter(|t| t.group == group) {
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

/// Runs the rsync processes for one batch; stops at the first run that does not succeed.
async fn flush(
    index: usize,
    kind: FlushKind,
    batch: Batch,
    root: PathBuf,
    target: Target,
    opts: RsyncOptions,
    own_pids: Arc<OwnPids>,
) -> FlushDone {
    let started = Instant::now();
    let mut done = FlushDone {
        target: index,
        kind,
        batch,
        class: ExitClass::Success,
        code: Some(0),
        killed: false,
        detail: String::new(),
        runs: 0,
        itemized: 0,
        elapsed: Duration::ZERO,
    };
    let planned = {
        let batch = done.batch.clone();
        let (root, target, opts) = (root.clone(), target.clone(), opts.clone());
        tokio::task::spawn_blocking(move || rsync::plan(&batch, &root, &target, &opts, is_dir))
            .await
    };
    let mut runs = match planned {
        Ok(runs) => runs,
        Err(e) => {
            done.class = ExitClass::Transient;
            done.detail = format!("planning the batch failed: {e}");
            return done;
        }
    };
    let whole_tree = done.batch.covers_root();
    let itemize = kind == FlushKind::Verify || opts.dry_run;
    for run in &mut runs {
        if kind == FlushKind::Verify && !opts.dry_run {
            run.args.insert(1, "--itemize-changes".into());
        }
        if whole_tree {
            // Overall progress on stdout, parsed for the log (rsync 3.1+).
            run.args.insert(1, "--info=progress2".into());
        }
    }
    for run in &runs {
        let label = match kind {
            FlushKind::Verify => "verify",
            FlushKind::Changes if whole_tree => "full sync",
            FlushKind::Changes => "batch",
        };
        let progress = whole_tree.then(|| rsync::Progress::new(label, &target, PROGRESS_EVERY));
        let result = rsync::execute(&opts.binary, run, &own_pids, itemize, progress).await;
        done.runs += 1;
        match result {
            Ok(r) => {
                tracing::info!(
                    target = %target,
                    paths = run.paths,
                    code = r.code,
                    elapsed_ms = r.elapsed.as_millis() as u64,
                    "rsync finished"
                );
                done.itemized += r.itemized;
                if opts.dry_run {
                    for line in r.stdout.lines() {
                        tracing::info!(target = %target, "dry run: {line}");
                    }
                }
                done.code = r.code;
                done.killed = r.code.is_none();
                if r.class != ExitClass::Success {
                    done.class = r.class;
                    done.detail = format!(
                        "rsync exited with {:?} ({}): {}\n  command: {}",
                        r.code,
                        rsync::describe(r.code),
                        r.stderr,
                        rsync::display_args(&opts.binary, &run.args)
                    );
                    break;
                }
                if !r.stderr.is_empty() {
                    tracing::debug!(target = %target, stderr = %r.stderr, "rsync warnings");
                }
            }
            Err(e) => {
                done.class = ExitClass::Transient;
                done.code = None;
                done.detail = format!("cannot run {}: {e}", opts.binary.display());
                break;
            }
        }
    }
    done.elapsed = started.elapsed();
    done
}

/// Counters for status and the summary at exit.
#[derive(Debug, Default)]
struct Stats {
    event_batches: u64,
    events: u64,
    overflows: u64,
    rescans: u64,
    /// For events/s in status: (when, events) at the last refresh.
    rate_mark: Option<(Instant, u64)>,
    events_per_sec: f64,
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

/// Everything built from one configuration.
struct Engine {
    config: Config,
    filter: Filter,
    targets: Vec<TargetState>,
    backend_name: &'static str,
    events: mpsc::Receiver<Vec<Event>>,
    reader: Option<std::thread::JoinHandle<Result<(), backend::BackendError>>>,
    stop: Arc<AtomicBool>,
}

/// A configuration that passed every check, with its backend started (so no change is
/// missed), not yet running.
struct Prepared {
    config: Config,
    filter: Filter,
    groups: Vec<GroupId>,
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
            let listener =
                status::MetricsListener::bind(addr).context("opening the metrics endpoint")?;
            let rx = status_rx.clone();
            servers.spawn(async move {
                if let Err(e) = listener.serve(rx).await {
                    tracing::error!(error = %e, "metrics endpoint stopped");
                }
            });
        }
    }

    let started = SystemTime::now();
    let prepared = Engine::prepare(config, &own_pids)?;
    let mut engine = prepared.into_engine(&opts, Vec::new())?;
    let mut signals = signals;
    let code = loop {
        match engine
            .run(&opts, &own_pids, &status_tx, started, &mut signals)
            .await?
        {
            Outcome::Exit(code) => break code,
            Outcome::Reload(new_config) => match Engine::prepare(*new_config, &own_pids) {
                Ok(prepared) => {
                    // The new marks are set: stop the old reader, take in its last events,
                    // and carry every dirty path and journal over.
                    let backlog = engine.stop_and_hand_over().await;
                    engine = prepared.into_engine(&opts, backlog)?;
                    tracing::info!("configuration reloaded");
                    notify(&[sd_notify::NotifyState::Ready]);
                }
                Err(e) => {
                    tracing::error!("reload failed, keeping the running configuration: {e:#}");
                    notify(&[sd_notify::NotifyState::Ready]);
                }
            },
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
type Backlog = Vec<(String, String, Batch, Option<Journal>)>;

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    // Not under systemd (no NOTIFY_SOCKET) is the normal case outside a service.
    let _ = sd_notify::notify(states);
}

fn target_states(
    config: &Config,
    groups: &[GroupId],
    opts: &RunOptions,
    filter: &Filter,
    backlog: &mut Backlog,
) -> anyhow::Result<Vec<TargetState>> {
    let now = Instant::now();
    let mut targets = Vec::new();
    for (group, g) in groups.iter().zip(&config.groups) {
        for t in &g.targets {
            let mut state = TargetState {
                group: *group,
                group_name: g.name.clone(),
                name: t.name.clone(),
                target: t.dest.clone(),
                root: filter.root(*group).to_path_buf(),
                rsync: RsyncOptions {
                    binary: config.daemon.rsync.clone(),
                    hardlinks: g.hard_links,
                    excludes: filter.excludes(*group).to_vec(),
                    extra_args: t.rsync_args(g),
                    dry_run: opts.dry_run,
                },
                dirty: DirtySet::new(),
                dirty_since: None,
                policy: FlushPolicy::new(g.flush),
                max_backlog: t.max_backlog.max(1),
                in_flight: None,
                retry_at: None,
                failures: 0,
                retries_total: 0,
                fatal: None,
                in_step: true,
                runs: 0,
                journal: None,
                verify_interval: g.verify_interval,
                verify_due: g.verify_interval.map(|i| now + i),
                last_sync: None,
                last_verify: None,
                touched: false,
                fatal_streak: 0,
                race_streak: 0,
            };
            let (carried, carried_journal) = match backlog
                .iter()
                .position(|(gn, tn, _, _)| *gn == g.name && *tn == t.name)
            {
                Some(i) => {
                    let (_, _, batch, journal) = backlog.swap_remove(i);
                    (Some(batch), journal)
                }
                None => (None, None),
            };
            let mut needs_full_sync = g.initial_sync && carried.is_none();
            if carried_journal.is_some() {
                state.journal = carried_journal;
            } else if opts.journal {
                let key = format!("{}-{}", g.name, t.name);
                let (journal, recovered) = Journal::open(&config.daemon.state_dir, &key)
                    .with_context(|| {
                        format!(
                            "opening the journal in {}",
                            config.daemon.state_dir.display()
                        )
                    })?;
                if !recovered.marks.is_empty() {
                    tracing::info!(group = %g.name, target = %t.name, paths = recovered.marks.len(),
                        "resuming unsynced changes from the journal");
                }
                for (rel, scope) in &recovered.marks {
                    state.dirty.mark(rel, *scope);
                }
                if recovered.existed && !recovered.clean {
                    // The previous run did not stop cleanly: what changed while nobody was
                    // watching is unknown, so the whole tree is compared.
                    tracing::warn!(group = %g.name, target = %t.name,
                        "previous run did not shut down cleanly: re-syncing the whole tree");
                    needs_full_sync = true;
                }
                state.journal = Some(journal);
            }
            if let Some(batch) = carried {
                state.dirty.merge(batch);
            }
            if needs_full_sync {
                state.mark(Path::new(""), Scope::Subtree, now);
                state.in_step = false;
            }
            if !state.dirty.is_empty() {
                state.dirty_since = Some(now);
                state.policy.on_change(now);
            }
            // The policy was told above; the first events must not count this again.
            state.touched = false;
            targets.push(state);
        }
    }
    Ok(targets)
}

impl Prepared {
    /// Builds the targets (with carried-over backlogs) and starts reading events.
    fn into_engine(self, opts: &RunOptions, mut backlog: Backlog) -> anyhow::Result<Engine> {
        let targets = target_states(&self.config, &self.groups, opts, &self.filter, &mut backlog)?;
        for (group, target, batch, _) in &backlog {
            if !batch.is_empty() {
                tracing::warn!(group = %group, target = %target, paths = batch.len(),
                    "target removed from the configuration; its unsynced paths are dropped");
            }
        }
        let backend_name = self.backend.name();
        for g in &self.config.groups {
            tracing::info!(group = %g.name, source = %g.source.display(), backend = backend_name,
                targets = g.targets.len(), "watching");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (events, reader) = spawn_reader(self.backend, stop.clone());
        Ok(Engine {
            config: self.config,
            filter: self.filter,
            targets,
            backend_name,
            events,
            reader: Some(reader),
            stop,
        })
    }
}

impl Engine {
    /// Creates missing local target directories, builds the filter from the checked
    /// configuration and starts the backend.
    fn prepare(config: Config, own_pids: &Arc<OwnPids>) -> anyhow::Result<Prepared> {
        let mut builder = FilterBuilder::new();
        let mut groups = Vec::new();
        for g in &config.groups {
            let id = builder
                .add_group(&g.source, g.excludes.clone())
                .with_context(|| format!("sync group {}", g.name))?;
            groups.push(id);
            for t in &g.targets {
                t.dest
                    .create_local_dir()
                    .with_context(|| format!("sync group {}: target {}", g.name, t.name))?;
            }
        }
        let filter = builder.build()?;
        let roots: Vec<PathBuf> = config.groups.iter().map(|g| g.source.clone()).collect();
        let d = &config.daemon;
        backend::ebpf::set_probe_choice(d.ebpf_probes);
        backend::ebpf::set_ringbuf_bytes(d.ebpf_ringbuf_bytes);
        backend::ebpf::set_kernel_filter(d.ebpf_kernel_filter);
        let backend = backend::start(config.daemon.backend, &roots, own_pids.clone())
            .context("starting change capture")?;
        Ok(Prepared {
            config,
            filter,
            groups,
            backend,
        })
    }

    /// The dirty paths of every target and their journals, after the reader stopped and its
    /// last events were routed.
    async fn stop_and_hand_over(mut self) -> Backlog {
        self.stop.store(true, Ordering::Relaxed);
        let now = Instant::now();
        while let Some(batch) = self.events.recv().await {
            for event in &batch {
                route(&self.filter, &mut self.targets, event, now);
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        self.targets
            .into_iter()
            .map(|mut t| (t.group_name, t.name, t.dirty.take(), t.journal.take()))
            .collect()
    }
    fn snapshot(&self, stats: &Stats, started: SystemTime) -> StatusSnapshot {
        let now = Instant::now();
        let mut groups: Vec<status::GroupStatus> = Vec::new();
        for g in &self.config.groups {
            let targets = self
                .targets
                .iter()
                .filter(|t| t.group_name == g.name)
                .map(|t| status::TargetStatus {
                    name: t.name.clone(),
                    dest: t.target.to_string(),
                    state: t.phase(),
                    dirty_paths: t.dirty.len() as u64,
                    oldest_unsynced_ms: t
                        .oldest_unsynced()
                        .map(|o| now.saturating_duration_since(o).as_millis() as u64),
                    in_flight_paths: t.in_flight.as_ref().map_or(0, |f| f.paths as u64),
                    last_sync: t.last_sync.clone(),
                    consecutive_failures: t.failures,
                    rsync_runs: t.runs,
                    retries_total: t.retries_total,
                    verify: t.last_verify.clone(),
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
            backend: self.backend_name.to_string(),
            events_total: stats.events,
            events_per_sec: stats.events_per_sec,
            overflows: stats.overflows,
            rescans: stats.rescans,
            groups,
        }
    }

    async fn run(
        &mut self,
        opts: &RunOptions,
        own_pids: &Arc<OwnPids>,
        status_tx: &watch::Sender<StatusSnapshot>,
        started: SystemTime,
        signals: &mut Signals<'_>,
    ) -> anyhow::Result<Outcome> {
        let mut tasks: JoinSet<FlushDone> = JoinSet::new();
        let mut stats = Stats::default();
        let mut ready_logged = false;
        let mut shutting_down = false;
        let mut reload: Option<Box<Config>> = None;
        let mut reader_done = false;
        let mut exit_code = 0;
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watchdog =
            sd_notify::watchdog_enabled().map(|period| tokio::time::interval(period / 2));
        if self.targets.iter().any(|t| !t.in_step) {
            tracing::info!("initial sync started");
        }

        loop {
            let now = Instant::now();
            let mut wake: Option<Instant> = None;
            let mut wake_at = |at: Instant| wake = Some(wake.map_or(at, |w: Instant| w.min(at)));
            // Draining for exit: flush everything now, start no verify pass. A reload starts
            // nothing new: the next engine takes the dirty paths over.
            let draining = shutting_down;
            for (index, t) in self.targets.iter_mut().enumerate() {
                if t.in_flight.is_some() || t.fatal.is_some() || reload.is_some() {
                    continue;
                }
                if let Some(at) = t.retry_at {
                    if now < at && !draining {
                        wake_at(at);
                        continue;
                    }
                    t.retry_at = None;
                }
                let mut kind = FlushKind::Changes;
                let decision = if t.dirty.is_empty() {
                    match t.verify_due {
                        Some(due) if !draining && now >= due => {
                            kind = FlushKind::Verify;
                            Decision::FlushNow
                        }
                        Some(due) if !draining => {
                            wake_at(due);
                            Decision::Idle
                        }
                        _ => Decision::Idle,
                    }
                } else if draining {
                    Decision::FlushNow
                } else {
                    t.policy.decide(now, t.dirty.len(), false)
                };
                match decision {
                    Decision::FlushNow => {
                        let batch = if kind == FlushKind::Verify {
                            Batch {
                                entries: Vec::new(),
                                subtrees: vec![PathBuf::new()],
                            }
                        } else {
                            t.dirty.take()
                        };
                        let journal_seq = match (kind, t.journal.as_mut()) {
                            (FlushKind::Changes, Some(j)) => j.batch_taken().ok(),
                            _ => None,
                        };
                        t.in_flight = Some(InFlight {
                            kind,
                            paths: batch.len(),
                            oldest: t.dirty_since.take().unwrap_or(now),
                            journal_seq,
                        });
                        t.policy.on_flush_started(now);
                        tracing::debug!(target = %t.target, paths = batch.len(), ?kind, "flushing");
                        tasks.spawn(flush(
                            index,
                            kind,
                            batch,
                            t.root.clone(),
                            t.target.clone(),
                            t.rsync.clone(),
                            own_pids.clone(),
                        ));
                    }
                    Decision::WaitUntil(at) => wake_at(at),
                    Decision::Idle | Decision::Busy => {}
                }
            }
            // An unreachable target must not hold the service in start-up forever: its
            // initial sync keeps being retried after `ready`, and status shows it.
            if !ready_logged
                && self
                    .targets
                    .iter()
                    .all(|t| t.in_step || t.fatal.is_some() || t.failures > 0)
            {
                ready_logged = true;
                tracing::info!(targets = self.targets.len(), "ready");
                notify(&[sd_notify::NotifyState::Ready]);
            }
            if self.targets.iter().all(|t| t.fatal.is_some()) {
                exit_code = 1;
                break;
            }
            let idle = self
                .targets
                .iter()
                .all(|t| t.in_flight.is_none() && (t.dirty.is_empty() || t.fatal.is_some()));
            if reload.is_some() && self.targets.iter().all(|t| t.in_flight.is_none()) {
                break;
            }
            if shutting_down && reader_done && idle {
                break;
            }

            let sleep = tokio::time::sleep_until(
                wake.map(tokio::time::Instant::from_std)
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                msg = self.events.recv(), if !reader_done => match msg {
                    Some(batch) => {
                        let now = Instant::now();
                        stats.event_batches += 1;
                        stats.events += batch.len() as u64;
                        for event in &batch {
                            match event {
                                Event::Overflow => stats.overflows += 1,
                                Event::Rescan { .. } => stats.rescans += 1,
                                Event::Change { .. } => {}
                            }
                            route(&self.filter, &mut self.targets, event, now);
                        }
                        for t in &mut self.targets {
                            if std::mem::take(&mut t.touched) {
                                t.policy.on_change(now);
                            }
                        }
                    }
                    None => {
                        reader_done = true;
                        if !shutting_down {
                            tracing::error!("the event reader stopped; flushing and exiting");
                            shutting_down = true;
                            exit_code = 1;
                        }
                    }
                },
                Some(joined) = tasks.join_next() => {
                    let done = joined.context("a flush task panicked")?;
                    self.finish(done, shutting_down, &mut exit_code);
                },
                _ = housekeeping.tick() => {
                    for t in &mut self.targets {
                        if let Some(j) = t.journal.as_mut()
                            && let Err(e) = j.sync()
                        {
                            tracing::error!(target = %t.target, error = %e, "journal sync failed; continuing without it");
                            t.journal = None;
                        }
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
                    status_tx.send_replace(self.snapshot(&stats, started));
                },
                _ = async { match watchdog.as_mut() { Some(w) => { w.tick().await; } None => std::future::pending().await } } => {
                    notify(&[sd_notify::NotifyState::Watchdog]);
                },
                _ = sleep => {},
                _ = signals.term.recv() => begin_shutdown(&mut shutting_down, &self.stop, "SIGTERM")?,
                _ = signals.int.recv() => begin_shutdown(&mut shutting_down, &self.stop, "SIGINT")?,
                _ = signals.hup.recv() => {
                    if let Some(path) = opts.config_path.as_deref().filter(|_| !shutting_down) {
                        notify(&[sd_notify::NotifyState::Reloading]);
                        match crate::config::load(path) {
                            Ok(cfg) => {
                                tracing::info!(config = %path.display(), "SIGHUP: reloading once in-flight syncs finish");
                                reload = Some(Box::new(cfg));
                            }
                            Err(e) => {
                                tracing::error!("SIGHUP: {e}; keeping the running configuration");
                                notify(&[sd_notify::NotifyState::Ready]);
                            }
                        }
                    } else {
                        tracing::info!("SIGHUP ignored: no configuration file to reload");
                    }
                },
            }
        }

        if let Some(cfg) = reload {
            status_tx.send_replace(self.snapshot(&stats, started));
            return Ok(Outcome::Reload(cfg));
        }
        notify(&[sd_notify::NotifyState::Stopping]);
        self.stop.store(true, Ordering::Relaxed);
        self.events.close();
        if let Some(reader) = self.reader.take() {
            match tokio::task::spawn_blocking(move || reader.join()).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    tracing::error!("event reader failed: {}", backend::error_chain(&e));
                    exit_code = 1;
                }
                _ => bail!("the event reader thread panicked"),
            }
        }
        let unsynced: usize = self.targets.iter().map(|t| t.dirty.len()).sum();
        for t in &mut self.targets {
            if let Some(journal) = t.journal.take() {
                let result = if t.dirty.is_empty() && t.in_flight.is_none() {
                    journal.close_clean()
                } else {
                    let mut journal = journal;
                    journal.sync()
                };
                if let Err(e) = result {
                    tracing::error!(target = %t.target, error = %e, "closing the journal failed");
                }
            }
        }
        tracing::info!(
            events = stats.events,
            event_batches = stats.event_batches,
            overflows = stats.overflows,
            rescans = stats.rescans,
            rsync_runs = self.targets.iter().map(|t| t.runs).sum::<u64>(),
            unsynced,
            "stopped"
        );
        Ok(Outcome::Exit(exit_code))
    }

    /// Takes a finished flush into account: confirm, retry, or give up on the target.
    fn finish(&mut self, done: FlushDone, shutting_down: bool, exit_code: &mut i32) {
        let now = Instant::now();
        let t = &mut self.targets[done.target];
        let flight = t.in_flight.take();
        t.runs += done.runs;
        t.policy.on_flush_finished(now);
        let record = LastSync {
            finished_unix_ms: unix_ms(SystemTime::now()),
            ok: done.class == ExitClass::Success,
            code: done.code,
            paths: done.batch.len() as u64,
            elapsed_ms: done.elapsed.as_millis() as u64,
            detail: done.detail.lines().next().unwrap_or("").to_string(),
        };
        if done.kind == FlushKind::Verify {
            t.verify_due = t.verify_interval.map(|i| now + i);
            t.last_verify = Some(LastVerify {
                finished_unix_ms: record.finished_unix_ms,
                fixed_paths: done.itemized,
                ok: record.ok,
            });
            if record.ok {
                tracing::info!(target = %t.target, repaired = done.itemized, "verify pass done");
            } else {
                tracing::warn!(target = %t.target, "verify pass failed: {}", done.detail);
            }
            return;
        }
        t.last_sync = Some(record);
        let mut class = done.class;
        if class == ExitClass::Fatal {
            // rsync also reports a source path that changed shape mid-transfer as a protocol
            // error (code 2, "invalid path from sender"): only a repeated one is final.
            t.fatal_streak += 1;
            if t.fatal_streak < FATAL_AFTER {
                class = ExitClass::Transient;
            }
        } else {
            t.fatal_streak = 0;
        }
        if class == ExitClass::SourceRace {
            t.race_streak += 1;
        } else {
            t.race_streak = 0;
        }
        match class {
            ExitClass::Success => {
                t.failures = 0;
                if let (Some(j), Some(seq)) = (
                    t.journal.as_mut(),
                    flight.as_ref().and_then(|f| f.journal_seq),
                ) && let Err(e) = j.confirmed(seq)
                {
                    tracing::error!(target = %t.target, error = %e, "journal write failed; continuing without it");
                    t.journal = None;
                }
                if done.batch.covers_root() && !t.in_step {
                    t.in_step = true;
                    tracing::info!(target = %t.target, elapsed_ms = done.elapsed.as_millis() as u64, "initial sync done");
                }
            }
            ExitClass::Transient => {
                let oldest = flight.map(|f| f.oldest).unwrap_or(now);
                // rsync killed by a signal (the OOM killer, an admin) leaves its temporary
                // files behind: sync the directories it was working in.
                t.put_back(done.batch, oldest, done.killed);
                if shutting_down {
                    tracing::error!(target = %t.target, paths = t.dirty.len(),
                        "{}; exiting with changes not synced", done.detail);
                    t.fatal = Some(done.detail);
                    *exit_code = 1;
                } else {
                    t.failures += 1;
                    t.retries_total += 1;
                    // A partial transfer under churn is usually a path that changed shape
                    // while rsync read it: retry soon, and back off only if it persists.
                    let wait = match done.code {
                        Some(23) if t.failures <= PARTIAL_RETRIES => FIRST_BACKOFF,
                        Some(23) => backoff(t.failures - PARTIAL_RETRIES),
                        _ => backoff(t.failures),
                    };
                    tracing::warn!(target = %t.target, retry_in_ms = wait.as_millis() as u64,
                        paths = t.dirty.len(), "{}", done.detail);
                    t.retry_at = Some(now + wait);
                }
            }
            ExitClass::SourceRace => {
                let oldest = flight.map(|f| f.oldest).unwrap_or(now);
                // The abort may leave a temporary file where a transfer was under way.
                t.put_back(done.batch, oldest, true);
                t.retries_total += 1;
                if t.race_streak >= RACES_BEFORE_WHOLE_TREE {
                    // Listed runs keep losing to the churn: a recursive run of the whole
                    // root has no list for a vanished directory to break.
                    t.race_streak = 0;
                    t.mark(Path::new(""), Scope::Subtree, now);
                    tracing::warn!(target = %t.target, "rsync lost {RACES_BEFORE_WHOLE_TREE} \
                        runs in a row to directories changing under it; syncing the whole tree");
                } else {
                    tracing::info!(target = %t.target, retry_in_ms = FIRST_BACKOFF.as_millis() as u64,
                        "a listed directory changed while rsync read it; retrying");
                    tracing::debug!(target = %t.target, "{}", done.detail);
                }
                if shutting_down {
                    // A race is no reason to stop before the last flush.
                    t.retry_at = None;
                } else {
                    t.retry_at = Some(now + FIRST_BACKOFF);
                }
            }
            ExitClass::Fatal => {
                t.dirty.merge(done.batch);
                tracing::error!(target = %t.target, paths = t.dirty.len(),
                    "{}; this target is no longer synced", done.detail);
                t.fatal = Some(done.detail);
                *exit_code = 1;
            }
        }
    }
}

/// Whether `path` is a directory now (not following a symlink).
fn is_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
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

/// First signal: stop reading, flush what is dirty, exit. Second: exit now.
fn begin_shutdown(shutting_down: &mut bool, stop: &AtomicBool, signal: &str) -> anyhow::Result<()> {
    if *shutting_down {
        bail!("{signal} again: exiting without flushing");
    }
    tracing::info!(signal, "flushing pending changes, then exiting");
    notify(&[sd_notify::NotifyState::Stopping]);
    *shutting_down = true;
    stop.store(true, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flush::FlushConfig;

    fn target(group: GroupId) -> TargetState {
        TargetState {
            group,
            group_name: "g".into(),
            name: "t".into(),
            target: Target::Remote("host::m".into()),
            root: "/srv/data".into(),
            rsync: RsyncOptions::default(),
            dirty: DirtySet::new(),
            dirty_since: None,
            policy: FlushPolicy::new(FlushConfig::default()),
            max_backlog: 1_000,
            in_flight: None,
            retry_at: None,
            failures: 0,
            retries_total: 0,
            fatal: None,
            in_step: true,
            runs: 0,
            journal: None,
            verify_interval: None,
            verify_due: None,
            last_sync: None,
            last_verify: None,
            touched: false,
            fatal_streak: 0,
            race_streak: 0,
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
                assert_eq!(&t.dirty.take(), want, "{event:?}");
            }
        }
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
