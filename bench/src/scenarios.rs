//! The three scenarios: `ready`, `burst` and `latency`, each run against the watcher
//! daemon and, where `inotifywait` exists, against the classic inotifywait script.
//! `ready` also compares the set-up of the daemon's two backends and of `inotifywait -r`
//! on a tree with a given number of directories.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::proc::{self, Guard, LogTail, Wait};
use crate::report::{self, Report, Table, dur, goal, mib, mib_abs, ratio, size_ratio, thousands};
use crate::tree::{self, DirTree, SUBDIRS, Tree};

/// The inotify events both competitors listen to.
const INOTIFY_EVENTS: &str = "create,delete,moved_to,close_write";
const MAX_USER_WATCHES: &str = "/proc/sys/fs/inotify/max_user_watches";
/// How long the daemon may take to print `ready` before the run is given up.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `inotifywait -r` may take to set its watches.
const WATCHES_TIMEOUT: Duration = Duration::from_secs(600);
/// Wait before the `Slab` reading after `ready` (see [`slab_after_ready`]).
const SLAB_LAG: Duration = Duration::from_millis(1500);
/// How long a burst may take to reach the replica.
const BURST_TIMEOUT: Duration = Duration::from_secs(600);
/// Per-sample timeout of the latency scenario.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Busy-poll period of the latency scenario.
const SAMPLE_POLL: Duration = Duration::from_micros(500);
/// Quiet time before each latency sample, so that each sample is a lone change.
const SAMPLE_GAP: Duration = Duration::from_millis(300);
/// Longest wait for that quiet time; a sample then starts anyway.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The change-capture backend the daemon is started with (`watcher sync --backend`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Backend {
    /// A filesystem-wide fanotify mark.
    Fanotify,
    /// The recursive-inotify fallback: one watch per directory.
    Inotify,
    /// The daemon's own choice.
    Auto,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Fanotify => "fanotify",
            Backend::Inotify => "inotify",
            Backend::Auto => "auto",
        }
    }
}

/// Sizes of one scale.
#[derive(Clone, Copy)]
pub struct Sizes {
    /// Files of the `ready` tree.
    pub ready_files: usize,
    /// Directories (the root included) of the tree on which `ready` compares the watch
    /// set-up of both backends and of `inotifywait -r`.
    pub setup_dirs: usize,
    /// Files of the `burst` and `latency` trees.
    pub tree_files: usize,
    /// New files written by `burst`, and the new directories they go in.
    pub burst_files: usize,
    pub burst_dirs: usize,
    pub latency_samples: usize,
}

impl Sizes {
    pub const LARGE: Self = Self {
        ready_files: 1_000_000,
        setup_dirs: 100_000,
        tree_files: 100_000,
        burst_files: 100_000,
        burst_dirs: 1_000,
        latency_samples: 50,
    };
    pub const SMALL: Self = Self {
        ready_files: 100_000,
        setup_dirs: 10_000,
        tree_files: 10_000,
        burst_files: 10_000,
        burst_dirs: 1_000,
        latency_samples: 30,
    };
}

pub struct Ctx {
    pub watcher: PathBuf,
    pub watcher_args: Vec<String>,
    /// Scratch directory, removed at exit.
    pub workdir: PathBuf,
    pub sizes: Sizes,
    /// Echo the children's output on stderr.
    pub echo: bool,
    pub inotifywait: bool,
    /// Drop the kernel's caches before each `ready` measurement.
    pub cold: bool,
    /// Backends `burst` and `latency` run the daemon with, one run each.
    pub backends: Vec<Backend>,
    /// `fs.inotify.max_user_watches` to set for `ready` (restored afterwards).
    pub max_user_watches: Option<usize>,
    pub report: Report,
}

/// A running `watcher sync` that has printed `ready`.
struct Daemon {
    guard: Guard,
    log: LogTail,
    /// From spawn to the `ready` line.
    ready_after: Duration,
    ready_line: usize,
}

fn is_rsync_finished(line: &str) -> bool {
    line.contains("rsync finished")
}

impl Daemon {
    fn pid(&self) -> i32 {
        self.guard.pid()
    }

    /// `rsync finished` lines since `ready`.
    fn rsync_runs(&self) -> usize {
        self.log.count(self.ready_line + 1, is_rsync_finished)
    }

    /// SIGTERM, then checks that the daemon flushed and exited 0 with `stopped`.
    fn stop(mut self, report: &mut Report, what: &str) -> Result<()> {
        let status = self.guard.stop(Signal::SIGTERM, Duration::from_secs(60))?;
        // The log thread may still be draining the pipe.
        let stopped = matches!(
            self.log
                .wait_for(self.ready_line, Duration::from_secs(2), |l| proc::has_word(
                    l, "stopped"
                ))?,
            Wait::Found(..)
        );
        match status {
            Some(s) if s.success() && stopped => {}
            Some(s) => report.note(format!(
                "{what}: watcher exited with {s} after SIGTERM{}; last lines:\n{}",
                if stopped {
                    ""
                } else {
                    " without a `stopped` line"
                },
                self.log.tail(10)
            )),
            None => report.note(format!(
                "{what}: watcher did not exit within 60 s of SIGTERM and was killed"
            )),
        }
        Ok(())
    }
}

/// A running inotifywait script whose watches are all set.
struct Script {
    guard: Guard,
    _log: LogTail,
}

impl Ctx {
    /// Runs `watcher sync SRC DST --no-initial-sync --backend B` and waits for `ready`.
    fn start_daemon(
        &mut self,
        src: &Path,
        dst: &Path,
        backend: Backend,
        what: &str,
    ) -> Result<Daemon> {
        match self.try_start_daemon(src, dst, backend, what)? {
            Started::Ready(d) => Ok(d),
            Started::Exited { status, tail, .. } => bail!(
                "{what}: watcher --backend {} exited ({status}) before `ready`; last lines:\n{tail}",
                backend.name()
            ),
        }
    }

    /// Like [`Ctx::start_daemon`], but a daemon that exits before `ready` (refusing to
    /// start, say) is an outcome, not an error.
    fn try_start_daemon(
        &mut self,
        src: &Path,
        dst: &Path,
        backend: Backend,
        what: &str,
    ) -> Result<Started> {
        let mut args: Vec<String> = vec![
            "sync".into(),
            path_str(src)?.into(),
            path_str(dst)?.into(),
            "--no-initial-sync".into(),
            "--backend".into(),
            backend.name().into(),
        ];
        args.extend(self.watcher_args.iter().cloned());
        self.report.command(
            &format!("{what}: watcher (environment `RUST_LOG=info`)"),
            report::command_line("watcher", &args, &self.workdir),
        );
        let mut cmd = Command::new(&self.watcher);
        cmd.args(&args).env("RUST_LOG", "info").env("NO_COLOR", "1");
        let spawned = Instant::now();
        let (mut guard, log) = proc::spawn_logged("watcher", cmd, self.echo)?;
        let found = log.wait_for(0, READY_TIMEOUT, |l| proc::has_word(l, "ready"))?;
        let (ready_line, at) = match found {
            Wait::Found(i, at) => (i, at),
            Wait::Eof => {
                let after = spawned.elapsed();
                let st = guard.stop(Signal::SIGKILL, Duration::from_secs(5))?;
                let error = log
                    .last_matching(|l| l.contains("ERROR"))
                    .map(|l| {
                        l[l.find("ERROR").unwrap_or(0) + "ERROR".len()..]
                            .trim()
                            .to_owned()
                    })
                    .unwrap_or_else(|| log.tail(1).trim().to_owned());
                return Ok(Started::Exited {
                    status: status_str(st),
                    error: report::hide_workdir(&error, &self.workdir),
                    tail: log.tail(15),
                    after,
                });
            }
            Wait::Timeout => bail!(
                "{what}: no `ready` from watcher --backend {} within {READY_TIMEOUT:?}; last lines:\n{}",
                backend.name(),
                log.tail(15)
            ),
        };
        Ok(Started::Ready(Daemon {
            guard,
            log,
            ready_after: at - spawned,
            ready_line,
        }))
    }

    fn start_script(&mut self, tree: &Tree, dst: &Path, what: &str) -> Result<Script> {
        let src = report::sh_quote(path_str(&tree.root)?);
        let dst = report::sh_quote(path_str(dst)?);
        let script = format!(
            "inotifywait -mrq --format '%w%f' -e {INOTIFY_EVENTS} {src} \
             | while read f; do rsync -a --delete {src}/ {dst}/; done"
        );
        self.report.command(
            &format!("{what}: inotifywait script"),
            report::bash_c_line(&script, &self.workdir),
        );
        let mut cmd = Command::new("bash");
        cmd.arg("-c").arg(&script);
        let (mut guard, log) = proc::spawn_logged("script", cmd, self.echo)?;
        let deadline = Instant::now() + WATCHES_TIMEOUT;
        let mut watching = 0;
        loop {
            proc::check_interrupted()?;
            if let Some(st) = guard.try_wait()? {
                bail!(
                    "the inotifywait script exited ({st}) while setting up watches; last lines:\n{}",
                    log.tail(10)
                );
            }
            if let Some(p) = proc::descendants(guard.pid())
                .iter()
                .find(|p| p.comm == "inotifywait")
            {
                watching = proc::inotify_watches(p.pid);
                if watching >= tree.dirs() {
                    break;
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the inotifywait script watched only {watching} of {} directories after {WATCHES_TIMEOUT:?}",
                    tree.dirs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        proc::wait_rsync_idle(
            guard.pid(),
            Duration::from_millis(500),
            Duration::from_secs(60),
        )?;
        Ok(Script { guard, _log: log })
    }

    fn rsync_seed(&mut self, src: &Path, dst: &Path, what: &str) -> Result<()> {
        let args = [
            "-a".to_owned(),
            format!("{}/", path_str(src)?),
            format!("{}/", path_str(dst)?),
        ];
        self.report.command(
            &format!("{what}: replica seeding, before the watcher starts"),
            report::command_line("rsync", &args, &self.workdir),
        );
        let st = Command::new("rsync")
            .args(&args)
            .status()
            .context("running rsync")?;
        if !st.success() {
            bail!("seeding the replica with rsync failed: {st}");
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------------

    pub fn ready(&mut self) -> Result<()> {
        let _forced = match self.max_user_watches {
            Some(n) => {
                let old = read_trimmed(MAX_USER_WATCHES)?;
                let forced = SysctlOverride::set(MAX_USER_WATCHES, &n.to_string())?;
                self.report.note(format!(
                    "ready: fs.inotify.max_user_watches was set to {} (from {old}) with --max-user-watches, and restored afterwards",
                    thousands(n)
                ));
                Some(forced)
            }
            None => None,
        };
        let base = self.workdir.join("ready");
        let result = self.ready_in(&base);
        let removed = tree::remove(&base);
        result?;
        removed?;
        let base = self.workdir.join("watch-setup");
        let result = self.watch_setup_in(&base);
        let removed = tree::remove(&base);
        result?;
        removed
    }

    fn ready_in(&mut self, base: &Path) -> Result<()> {
        eprintln!(
            "ready: generating {} files ...",
            thousands(self.sizes.ready_files)
        );
        let (tree, took) = Tree::generate(&base.join("src"), self.sizes.ready_files)?;
        eprintln!("ready: generated in {}", dur(took));
        let dst = base.join("dst");
        fs::create_dir_all(&dst)?;

        let (ready_after, w_slab, rss) =
            match self.daemon_setup(&tree.root, &dst, Backend::Fanotify, "ready")? {
                Setup::Ok {
                    after,
                    slab_kib,
                    rss_kib,
                    ..
                } => (after, slab_kib, rss_kib),
                Setup::Failed { msg, .. } => bail!("watcher --backend fanotify: {msg}"),
            };

        let size = format!(
            "{} files / {} dirs",
            thousands(tree.files()),
            thousands(tree.dirs())
        );
        let met = ready_after < Duration::from_secs(1);
        let slab_goal = goal("< 1 MiB", w_slab < 1024);
        let metric = format!("ready, fanotify backend: spawn to ready ({size})");
        let slab_metric = "ready, fanotify backend: kernel slab growth";
        let rss_metric = "ready, fanotify backend: RSS at ready";
        if !self.inotifywait {
            self.report
                .note("inotifywait is not on PATH: its part of `ready` was skipped");
            self.report
                .row(metric, dur(ready_after), "skipped", goal("< 1 s", met), "");
            self.report
                .row(slab_metric, mib(w_slab), "skipped", slab_goal, "");
            self.report.row(rss_metric, mib_abs(rss), "skipped", "", "");
            return Ok(());
        }

        self.record_inotifywait_command("ready", &tree.root)?;
        let run = self.with_watch_limit("ready", "inotifywait -r", tree.dirs(), |me| {
            me.inotifywait_ready(&tree.root, "ready")
        })?;
        if let Some(r) = &run.refused {
            self.report.row(
                format!(
                    "ready: inotifywait -r with max_user_watches = {}",
                    thousands(r.limit)
                ),
                "",
                format!("failed after {}: {}", dur(r.after), r.msg),
                "",
                "",
            );
        } else {
            self.report.note(format!(
                "ready: inotifywait ran with max_user_watches = {} (the tree needs {})",
                thousands(run.limit),
                thousands(tree.dirs())
            ));
        }
        match run.outcome {
            Setup::Ok {
                after,
                slab_kib,
                rss_kib,
                watches,
            } => {
                self.report.row(
                    metric,
                    dur(ready_after),
                    dur(after),
                    goal("< 1 s", met),
                    ratio(after, ready_after),
                );
                self.report
                    .row(slab_metric, mib(w_slab), mib(slab_kib), slab_goal, "");
                self.report
                    .row(rss_metric, mib_abs(rss), mib_abs(rss_kib), "", "");
                self.report.note(format!(
                    "ready: inotifywait held {} watches; RSS of the script column is inotifywait's",
                    thousands(watches)
                ));
            }
            Setup::Failed { msg, after } => {
                self.report.row(
                    metric,
                    dur(ready_after),
                    format!("failed after {}: {msg}", dur(after)),
                    goal("< 1 s", met),
                    "",
                );
                self.report.row(slab_metric, mib(w_slab), "", slab_goal, "");
                self.report.row(rss_metric, mib_abs(rss), "", "", "");
            }
        }
        Ok(())
    }

    /// The watch set-up of both backends and of `inotifywait -r`, one after the other on
    /// one tree of [`Sizes::setup_dirs`] directories, in a table of its own.
    fn watch_setup_in(&mut self, base: &Path) -> Result<()> {
        const WHAT: &str = "watch set-up";
        eprintln!(
            "{WHAT}: generating {} directories ...",
            thousands(self.sizes.setup_dirs)
        );
        let (tree, took) = DirTree::generate(&base.join("src"), self.sizes.setup_dirs)?;
        eprintln!(
            "{WHAT}: generated {} files in {}",
            thousands(tree.files),
            dur(took)
        );
        let dst = base.join("dst");
        fs::create_dir_all(&dst)?;
        let root = tree.root.clone();

        let fanotify = self.daemon_setup(&root, &dst, Backend::Fanotify, WHAT)?;
        let inotify = self.with_watch_limit(WHAT, "the inotify backend", tree.dirs, |me| {
            me.daemon_setup(&root, &dst, Backend::Inotify, WHAT)
        })?;
        let script = if self.inotifywait {
            self.record_inotifywait_command(WHAT, &root)?;
            Some(
                self.with_watch_limit(WHAT, "inotifywait -r", tree.dirs, |me| {
                    me.inotifywait_ready(&root, WHAT)
                })?,
            )
        } else {
            self.report
                .note("inotifywait is not on PATH: its part of the watch set-up was skipped");
            None
        };

        if let Setup::Ok { after, .. } = fanotify {
            let met = after < Duration::from_secs(1);
            self.report.note(format!(
                "{WHAT}: the fanotify backend was ready after {}: goal < 1 s {}",
                dur(after),
                if met { "met" } else { "**missed**" }
            ));
        }
        let columns = [
            "metric",
            "fanotify",
            "inotify backend",
            "inotifywait -r",
            "inotify backend / fanotify",
            "inotifywait -r / fanotify",
            "inotifywait -r / inotify backend",
        ];
        let skipped = Limited {
            refused: None,
            outcome: Setup::Failed {
                msg: "skipped".to_owned(),
                after: Duration::ZERO,
            },
            limit: 0,
        };
        let script = script.unwrap_or(skipped);
        let outcomes = [&fanotify, &inotify.outcome, &script.outcome];
        let mut rows = vec![
            setup_row(
                "spawn to ready",
                outcomes,
                |o| match o {
                    Setup::Ok { after, .. } => dur(*after),
                    Setup::Failed { msg, after } if after.is_zero() => msg.clone(),
                    Setup::Failed { msg, after } => format!("failed after {}: {msg}", dur(*after)),
                },
                |a, b| match (a, b) {
                    (Setup::Ok { after: a, .. }, Setup::Ok { after: b, .. }) => ratio(*a, *b),
                    _ => String::new(),
                },
            ),
            setup_row(
                "kernel slab growth",
                outcomes,
                |o| match o {
                    Setup::Ok { slab_kib, .. } => mib(*slab_kib),
                    Setup::Failed { .. } => String::new(),
                },
                |a, b| match (a, b) {
                    (Setup::Ok { slab_kib: a, .. }, Setup::Ok { slab_kib: b, .. }) => {
                        size_ratio(*a, *b)
                    }
                    _ => String::new(),
                },
            ),
            setup_row(
                "RSS at ready",
                outcomes,
                |o| match o {
                    Setup::Ok { rss_kib, .. } => mib_abs(*rss_kib),
                    Setup::Failed { .. } => String::new(),
                },
                |a, b| match (a, b) {
                    (Setup::Ok { rss_kib: a, .. }, Setup::Ok { rss_kib: b, .. }) => {
                        size_ratio(*a as i64, *b as i64)
                    }
                    _ => String::new(),
                },
            ),
            setup_row(
                "inotify watches held",
                outcomes,
                |o| match o {
                    Setup::Ok { watches, .. } => thousands(*watches),
                    Setup::Failed { .. } => String::new(),
                },
                |_, _| String::new(),
            ),
        ];
        let limit_cell = |l: &Limited| {
            if l.limit == 0 {
                String::new()
            } else {
                thousands(l.limit)
            }
        };
        rows.push(vec![
            "fs.inotify.max_user_watches of the run".to_owned(),
            String::new(),
            limit_cell(&inotify),
            limit_cell(&script),
            String::new(),
            String::new(),
            String::new(),
        ]);
        let refused = |l: &Limited| {
            l.refused.as_ref().map_or_else(String::new, |r| {
                format!(
                    "with {}: failed after {}: {}",
                    thousands(r.limit),
                    dur(r.after),
                    r.msg
                )
            })
        };
        if inotify.refused.is_some() || script.refused.is_some() {
            rows.push(vec![
                "first run, refused for want of watches".to_owned(),
                String::new(),
                refused(&inotify),
                refused(&script),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        self.report.note(format!(
            "{WHAT}: {} directories, {} files in those without subdirectories; \
             `watcher sync --no-initial-sync --backend B` timed to its `ready` line, \
             `inotifywait -m -r` to `Watches established.`; each ratio is one column over another",
            thousands(tree.dirs),
            thousands(tree.files)
        ));
        self.report.table(Table {
            title: format!(
                "Watch set-up, {} directories: fanotify / inotify backend / inotifywait -r",
                thousands(tree.dirs)
            ),
            columns: columns.iter().map(|&c| c.to_owned()).collect(),
            rows,
        });
        Ok(())
    }

    /// Starts the daemon with `backend`, takes its readiness, slab growth, RSS and
    /// inotify watches, and stops it.
    fn daemon_setup(
        &mut self,
        root: &Path,
        dst: &Path,
        backend: Backend,
        what: &str,
    ) -> Result<Setup> {
        settle(self.cold)?;
        let slab0 = proc::slab_kib()?;
        match self.try_start_daemon(root, dst, backend, what)? {
            Started::Ready(daemon) => {
                let slab1 = slab_after_ready()?;
                let rss_kib = proc::rss_kib(daemon.pid())?;
                let watches = proc::inotify_watches(daemon.pid());
                let after = daemon.ready_after;
                eprintln!(
                    "{what}: watcher --backend {} ready after {}",
                    backend.name(),
                    dur(after)
                );
                daemon.stop(&mut self.report, what)?;
                Ok(Setup::Ok {
                    after,
                    slab_kib: slab1 as i64 - slab0 as i64,
                    rss_kib,
                    watches,
                })
            }
            Started::Exited {
                status,
                error,
                after,
                ..
            } => {
                eprintln!(
                    "{what}: watcher --backend {} exited ({status}): {error}",
                    backend.name()
                );
                Ok(Setup::Failed {
                    msg: format!("exited ({status}): {error}"),
                    after,
                })
            }
        }
    }

    /// Runs `run`; when it fails for want of inotify watches, raises
    /// `fs.inotify.max_user_watches` for a second run and restores it afterwards.
    fn with_watch_limit(
        &mut self,
        what: &str,
        who: &str,
        dirs: usize,
        mut run: impl FnMut(&mut Self) -> Result<Setup>,
    ) -> Result<Limited> {
        let limit: usize = read_trimmed(MAX_USER_WATCHES)?
            .parse()
            .context("parsing max_user_watches")?;
        let outcome = run(self)?;
        let Setup::Failed { msg, after } = &outcome else {
            return Ok(Limited {
                refused: None,
                outcome,
                limit,
            });
        };
        if !(limit < dirs || is_watch_limit_message(msg)) {
            return Ok(Limited {
                refused: None,
                outcome,
                limit,
            });
        }
        // Other inotify users of the same user count against the same limit.
        let raised = limit + 2 * dirs;
        let _restore = SysctlOverride::set(MAX_USER_WATCHES, &raised.to_string())?;
        self.report.note(format!(
            "{what}: {who} failed with max_user_watches = {}; it was raised to {} for a second run, then restored",
            thousands(limit),
            thousands(raised)
        ));
        let refused = Refused {
            limit,
            msg: msg.clone(),
            after: *after,
        };
        Ok(Limited {
            refused: Some(refused),
            outcome: run(self)?,
            limit: raised,
        })
    }

    fn record_inotifywait_command(&mut self, what: &str, root: &Path) -> Result<()> {
        self.report.command(
            &format!("{what}: inotifywait -r (timed to `Watches established.` on stderr)"),
            report::command_line("inotifywait", inotifywait_ready_args(root)?, &self.workdir),
        );
        Ok(())
    }

    fn inotifywait_ready(&mut self, root: &Path, what: &str) -> Result<Setup> {
        settle(self.cold)?;
        let slab0 = proc::slab_kib()?;
        let mut cmd = Command::new("inotifywait");
        cmd.args(inotifywait_ready_args(root)?);
        let spawned = Instant::now();
        let (mut guard, log) = proc::spawn_logged("inotifywait", cmd, self.echo)?;
        let found = log.wait_for(0, WATCHES_TIMEOUT, |l| l.contains("Watches established"))?;
        let outcome = match found {
            Wait::Found(_, at) => {
                let slab1 = slab_after_ready()?;
                Setup::Ok {
                    after: at - spawned,
                    slab_kib: slab1 as i64 - slab0 as i64,
                    rss_kib: proc::rss_kib(guard.pid())?,
                    watches: proc::inotify_watches(guard.pid()),
                }
            }
            Wait::Eof => {
                let after = spawned.elapsed();
                let st = guard.stop(Signal::SIGKILL, Duration::from_secs(5))?;
                let why = log
                    .last_matching(|l| l.contains("Failed") || l.contains("rror"))
                    .unwrap_or_else(|| log.tail(1).trim().to_owned());
                Setup::Failed {
                    msg: format!(
                        "exited ({}): {}",
                        status_str(st),
                        report::hide_workdir(&why, &self.workdir)
                    ),
                    after,
                }
            }
            Wait::Timeout => Setup::Failed {
                msg: format!("no `Watches established.` within {WATCHES_TIMEOUT:?}"),
                after: spawned.elapsed(),
            },
        };
        guard.stop(Signal::SIGTERM, Duration::from_secs(5))?;
        eprintln!(
            "{what}: inotifywait {}",
            match &outcome {
                Setup::Ok { after, .. } => format!("established watches after {}", dur(*after)),
                Setup::Failed { msg, .. } => format!("failed: {msg}"),
            }
        );
        Ok(outcome)
    }

    // ----------------------------------------------------------------------------------

    pub fn burst(&mut self) -> Result<()> {
        let base = self.workdir.join("burst");
        let result = self.burst_in(&base);
        let removed = tree::remove(&base);
        result?;
        removed
    }

    fn burst_in(&mut self, base: &Path) -> Result<()> {
        let s = self.sizes;
        eprintln!("burst: generating {} files ...", thousands(s.tree_files));
        let (tree, _) = Tree::generate(&base.join("src"), s.tree_files)?;
        let dst = base.join("dst");
        self.rsync_seed(&tree.root, &dst, "burst")?;
        let per_dir = s.burst_files.div_ceil(s.burst_dirs);
        let names: Vec<String> = (0..s.burst_dirs).map(|d| format!("n{d:04}")).collect();
        let src_dirs: Vec<PathBuf> = names.iter().map(|n| tree.root.join(n)).collect();
        let dst_dirs: Vec<PathBuf> = names.iter().map(|n| dst.join(n)).collect();
        let total = per_dir * s.burst_dirs;
        let what = format!(
            "{} new files in {} new dirs, on a {}-file tree",
            thousands(total),
            thousands(s.burst_dirs),
            thousands(tree.files())
        );

        // Baseline: the same writes into a sibling directory, before anything watches.
        let plain_dirs: Vec<PathBuf> = names.iter().map(|n| base.join("plain").join(n)).collect();
        let start = Instant::now();
        tree::write_files(&plain_dirs, per_dir, &burst_content)?;
        let plain = start.elapsed();
        tree::remove(&base.join("plain"))?;
        self.report.note(format!(
            "burst: writing the files took {} with nothing watching",
            dur(plain)
        ));
        let clear = |dirs: &[PathBuf]| -> Result<()> {
            for d in dirs {
                tree::remove(d)?;
            }
            Ok(())
        };

        // watcher, once per backend, each time on the tree without the burst directories
        let mut daemon_runs: Vec<(Backend, BurstTimes, usize, bool)> = Vec::new();
        for backend in self.backends.clone() {
            clear(&src_dirs)?;
            clear(&dst_dirs)?;
            let b = backend.name();
            let daemon = self.start_daemon(&tree.root, &dst, backend, "burst")?;
            let runs0 = daemon.rsync_runs();
            let cpu0 = proc::cpu_time(daemon.pid())?;
            eprintln!("burst: watcher --backend {b} ready; writing {what}");
            let (written, complete) = burst_once(&src_dirs, &dst_dirs, per_dir)?;
            let settled = proc::wait_rsync_idle(
                daemon.pid(),
                Duration::from_secs(1),
                Duration::from_secs(30),
            )?;
            let runs = daemon.rsync_runs() - runs0;
            let cpu = proc::cpu_time(daemon.pid())?.saturating_sub(cpu0);
            daemon.stop(&mut self.report, "burst")?;
            if !settled {
                self.report.note(format!(
                    "burst ({b} backend): watcher still ran rsync 30 s after the replica was complete"
                ));
            }
            let ok = match &complete {
                Ok(t) => {
                    let bad = verify(&dst_dirs, per_dir)?;
                    if bad > 0 {
                        self.report.note(format!(
                            "burst ({b} backend): {bad} replica files had wrong contents after the watcher run"
                        ));
                    }
                    eprintln!(
                        "burst: watcher --backend {b}: replica complete after {}",
                        dur(*t)
                    );
                    true
                }
                Err(e) => {
                    self.report.note(format!("burst ({b} backend): {e}"));
                    false
                }
            };
            self.report.note(format!(
                "burst ({b} backend): the watcher's own CPU time during the burst: {}",
                dur(cpu)
            ));
            daemon_runs.push((backend, BurstTimes { written, complete }, runs, ok));
        }

        // inotifywait script, on the same tree without the burst directories
        let script = if self.inotifywait {
            clear(&src_dirs)?;
            clear(&dst_dirs)?;
            let script = self.start_script(&tree, &dst, "burst")?;
            eprintln!("burst: script watching; writing {what}");
            let (written, complete) = burst_once(&src_dirs, &dst_dirs, per_dir)?;
            drop(script);
            match &complete {
                Ok(t) => eprintln!("burst: script replica complete after {}", dur(*t)),
                Err(e) => self.report.note(format!("burst (script): {e}")),
            }
            Some(BurstTimes { written, complete })
        } else {
            self.report
                .note("inotifywait is not on PATH: its part of `burst` was skipped");
            None
        };

        for (backend, w, runs, ok) in &daemon_runs {
            let b = backend.name();
            let rows: [(String, BurstMetric); 3] = [
                (
                    format!("burst, {b} backend: first write to replica complete ({what})"),
                    |b| b.complete.as_ref().ok().copied(),
                ),
                (format!("burst, {b} backend: writing the files"), |b| {
                    Some(b.written)
                }),
                (
                    format!("burst, {b} backend: last write to replica complete"),
                    |b| {
                        b.complete
                            .as_ref()
                            .ok()
                            .map(|c| c.saturating_sub(b.written))
                    },
                ),
            ];
            for (metric, get) in rows {
                let cell = |b: &BurstTimes| get(b).map_or_else(|| "incomplete".to_owned(), dur);
                let r = match (script.as_ref().and_then(get), get(w)) {
                    (Some(s), Some(w)) => ratio(s, w),
                    _ => String::new(),
                };
                self.report.row(
                    metric,
                    cell(w),
                    script.as_ref().map_or_else(|| "skipped".to_owned(), cell),
                    "",
                    r,
                );
            }
            self.report.row(
                format!("burst, {b} backend: rsync runs"),
                runs.to_string(),
                "",
                goal("<= 10", *runs <= 10 && *ok),
                "",
            );
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------------

    fn busy_note(&mut self, who: &str, busy: usize) {
        if busy > 0 {
            self.report.note(format!(
                "latency ({who}): {busy} samples started while rsync was still running {} after the previous one",
                dur(IDLE_TIMEOUT)
            ));
        }
    }

    pub fn latency(&mut self) -> Result<()> {
        let base = self.workdir.join("latency");
        let result = self.latency_in(&base);
        let removed = tree::remove(&base);
        result?;
        removed
    }

    fn latency_in(&mut self, base: &Path) -> Result<()> {
        let n = self.sizes.latency_samples;
        eprintln!(
            "latency: generating {} files ...",
            thousands(self.sizes.tree_files)
        );
        let (tree, _) = Tree::generate(&base.join("src"), self.sizes.tree_files)?;
        let dst = base.join("dst");
        self.rsync_seed(&tree.root, &dst, "latency")?;
        let mut rng = StdRng::seed_from_u64(0x5eed);

        let mut daemon_runs: Vec<(Backend, Stats)> = Vec::new();
        for backend in self.backends.clone() {
            let b = backend.name();
            let daemon = self.start_daemon(&tree.root, &dst, backend, "latency")?;
            eprintln!("latency: watcher --backend {b} ready; {n} samples");
            let (w, busy) = samples(&tree, &dst, daemon.pid(), n, b, &mut rng)?;
            daemon.stop(&mut self.report, "latency")?;
            self.busy_note(&format!("{b} backend"), busy);
            daemon_runs.push((backend, Stats::of(&w)));
        }

        let s = if self.inotifywait {
            let script = self.start_script(&tree, &dst, "latency")?;
            eprintln!("latency: script watching; {n} samples");
            let (s, busy) = samples(&tree, &dst, script.guard.pid(), n, "script", &mut rng)?;
            drop(script);
            self.busy_note("script", busy);
            Some(Stats::of(&s))
        } else {
            self.report
                .note("inotifywait is not on PATH: its part of `latency` was skipped");
            None
        };

        let what = format!("{} samples, {}-file tree", n, thousands(tree.files()));
        for (backend, w) in &daemon_runs {
            let b = backend.name();
            // (name, watcher, script, goal text, goal limit)
            let rows = [
                ("p50", w.p50, s.as_ref().map(|s| s.p50), "< 30 ms", Some(30)),
                (
                    "p95",
                    w.p95,
                    s.as_ref().map(|s| s.p95),
                    "< 100 ms",
                    Some(100),
                ),
                ("max", w.max, s.as_ref().map(|s| s.max), "", None),
            ];
            for (name, wv, sv, goal_text, limit_ms) in rows {
                let g = match limit_ms {
                    Some(l) => goal(goal_text, wv.is_some_and(|v| v < Duration::from_millis(l))),
                    None => String::new(),
                };
                let r = match (sv.flatten(), wv) {
                    (Some(sv), Some(wv)) => ratio(sv, wv),
                    _ => String::new(),
                };
                self.report.row(
                    format!("latency, {b} backend: {name} ({what})"),
                    stat_cell(wv),
                    sv.map_or_else(|| "skipped".to_owned(), stat_cell),
                    g,
                    r,
                );
            }
            self.report.row(
                format!(
                    "latency, {b} backend: samples over {}",
                    dur(SAMPLE_TIMEOUT).replace(".00", "")
                ),
                format!("{}/{n}", w.timeouts),
                s.as_ref()
                    .map_or_else(|| "skipped".to_owned(), |s| format!("{}/{n}", s.timeouts)),
                "",
                "",
            );
        }
        Ok(())
    }
}

/// How a start with a given backend (or `inotifywait -r`) ended.
enum Started {
    Ready(Daemon),
    /// The daemon exited before `ready`: its exit status, its last error line, its last
    /// lines and when it exited.
    Exited {
        status: String,
        error: String,
        tail: String,
        after: Duration,
    },
}

/// Readiness of one watcher: time from spawn, system-wide slab growth, RSS and inotify
/// watches at that point; or why it never got there.
enum Setup {
    Ok {
        after: Duration,
        slab_kib: i64,
        rss_kib: u64,
        watches: usize,
    },
    Failed {
        msg: String,
        after: Duration,
    },
}

/// A first run refused for want of inotify watches.
struct Refused {
    limit: usize,
    msg: String,
    after: Duration,
}

/// The outcome of [`Ctx::with_watch_limit`]: the last run, the `max_user_watches` it
/// ran with, and the refused first run if the limit had to be raised.
struct Limited {
    refused: Option<Refused>,
    outcome: Setup,
    limit: usize,
}

/// Whether a failure message says that inotify watches ran out (`inotifywait`:
/// `upper limit on inotify watches reached`; the daemon names the sysctl).
fn is_watch_limit_message(msg: &str) -> bool {
    msg.contains("upper limit") || msg.contains("max_user_watches")
}

/// One row of the watch set-up table: the metric, a cell per column of `outcomes`
/// (fanotify, inotify backend, inotifywait -r) and the three ratios.
fn setup_row(
    metric: &str,
    outcomes: [&Setup; 3],
    cell: impl Fn(&Setup) -> String,
    ratio: impl Fn(&Setup, &Setup) -> String,
) -> Vec<String> {
    let [f, i, s] = outcomes;
    vec![
        metric.to_owned(),
        cell(f),
        cell(i),
        cell(s),
        ratio(i, f),
        ratio(s, f),
        ratio(s, i),
    ]
}

fn inotifywait_ready_args(src: &Path) -> Result<Vec<String>> {
    Ok(vec![
        "-m".into(),
        "-r".into(),
        "-e".into(),
        INOTIFY_EVENTS.into(),
        path_str(src)?.into(),
    ])
}

/// Times of one burst run: writing, and from the first write until the replica had
/// every file (or why it did not).
struct BurstTimes {
    written: Duration,
    complete: Result<Duration, String>,
}

/// One number taken from [`BurstTimes`].
type BurstMetric = fn(&BurstTimes) -> Option<Duration>;

/// Writes the burst, then waits for the replica. Returns the write time and the time
/// from the first write until the replica had every file (or why it did not).
fn burst_once(
    src_dirs: &[PathBuf],
    dst_dirs: &[PathBuf],
    per_dir: usize,
) -> Result<(Duration, Result<Duration, String>)> {
    let start = Instant::now();
    tree::write_files(src_dirs, per_dir, &burst_content)?;
    let written = start.elapsed();
    let (at, left) = tree::wait_complete(dst_dirs, per_dir, BURST_TIMEOUT)?;
    let complete = if left == 0 {
        Ok(at - start)
    } else {
        Err(format!(
            "{left} of {} new dirs incomplete after {}",
            dst_dirs.len(),
            dur(at - start)
        ))
    };
    Ok((written, complete))
}

fn burst_content(d: usize, f: usize) -> String {
    format!("burst {d} {f}\n")
}

/// Number of replica files of the burst whose contents are wrong.
fn verify(dst_dirs: &[PathBuf], per_dir: usize) -> Result<usize> {
    let mut bad = 0;
    for (d, dir) in dst_dirs.iter().enumerate() {
        proc::check_interrupted()?;
        for f in 0..per_dir {
            let ok = fs::read(dir.join(tree::file_name(f)))
                .is_ok_and(|b| b == burst_content(d, f).as_bytes());
            bad += usize::from(!ok);
        }
    }
    Ok(bad)
}

/// `n` latency samples: each writes one new file into a random leaf directory and
/// busy-polls until the replica has it in full. `None` marks a timeout. Also returns
/// how many samples started while rsync was still running after [`IDLE_TIMEOUT`].
fn samples(
    tree: &Tree,
    dst: &Path,
    root_pid: i32,
    n: usize,
    tag: &str,
    rng: &mut StdRng,
) -> Result<(Vec<Option<Duration>>, usize)> {
    let mut out = Vec::with_capacity(n);
    let mut busy = 0;
    for i in 0..n {
        if !proc::wait_rsync_idle(root_pid, SAMPLE_GAP, IDLE_TIMEOUT)? {
            busy += 1;
        }
        let leaf = Tree::leaf(rng.random_range(0..tree.tops), rng.random_range(0..SUBDIRS));
        let rel = leaf.join(format!("lat-{tag}-{i:03}"));
        let content = format!("latency sample {tag} {i} of {n}\n");
        let (src, dst) = (tree.root.join(&rel), dst.join(&rel));
        let start = Instant::now();
        fs::write(&src, &content).with_context(|| format!("writing {}", src.display()))?;
        let deadline = start + SAMPLE_TIMEOUT;
        let sample = loop {
            if fs::read(&dst).is_ok_and(|b| b == content.as_bytes()) {
                break Some(start.elapsed());
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(SAMPLE_POLL);
        };
        proc::check_interrupted()?;
        out.push(sample);
    }
    Ok((out, busy))
}

/// Nearest-rank percentiles; a timed-out sample counts as slower than any other.
struct Stats {
    p50: Option<Duration>,
    p95: Option<Duration>,
    max: Option<Duration>,
    timeouts: usize,
}

impl Stats {
    fn of(samples: &[Option<Duration>]) -> Self {
        let mut ok: Vec<Duration> = samples.iter().flatten().copied().collect();
        ok.sort();
        let n = samples.len();
        let rank = |p: f64| -> Option<Duration> {
            if n == 0 {
                return None;
            }
            let idx = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            ok.get(idx).copied()
        };
        Self {
            p50: rank(0.50),
            p95: rank(0.95),
            max: rank(1.0),
            timeouts: n - ok.len(),
        }
    }
}

fn stat_cell(v: Option<Duration>) -> String {
    v.map_or_else(|| format!("> {}", dur(SAMPLE_TIMEOUT)), dur)
}

/// Writes back a sysctl's old value when dropped.
struct SysctlOverride {
    path: &'static str,
    old: String,
}

impl SysctlOverride {
    fn set(path: &'static str, value: &str) -> Result<Self> {
        let old = read_trimmed(path)?;
        fs::write(path, value).with_context(|| format!("writing {path}"))?;
        Ok(Self { path, old })
    }
}

impl Drop for SysctlOverride {
    fn drop(&mut self) {
        if let Err(e) = fs::write(self.path, &self.old) {
            eprintln!(
                "warning: could not restore {} to {}: {e}",
                self.path, self.old
            );
        }
    }
}

fn read_trimmed(path: &str) -> Result<String> {
    Ok(fs::read_to_string(path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_owned())
}

/// `Slab` of `/proc/meminfo` a moment after a watcher got ready: the kernel folds its
/// per-CPU counters into that figure only every `vm.stat_interval` (1 s by default), so
/// an immediate reading can miss what the set-up allocated.
fn slab_after_ready() -> Result<u64> {
    proc::sleep(SLAB_LAG)?;
    proc::slab_kib()
}

/// Flushes dirty data (and with `cold`, drops the page, dentry and inode caches) and
/// lets the kernel's caches settle before a slab reading.
fn settle(cold: bool) -> Result<()> {
    nix::unistd::sync();
    if cold {
        fs::write("/proc/sys/vm/drop_caches", "3").context("dropping caches")?;
    }
    proc::sleep(Duration::from_secs(1))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("path is not UTF-8: {}", p.display()))
}

fn status_str(st: Option<ExitStatus>) -> String {
    st.map_or_else(|| "killed".to_owned(), |s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let ms = |v: u64| Some(Duration::from_millis(v));
        let mut v: Vec<_> = (1..=20).map(ms).collect();
        let s = Stats::of(&v);
        assert_eq!(s.p50, ms(10));
        assert_eq!(s.p95, ms(19));
        assert_eq!(s.max, ms(20));
        v[0] = None;
        let s = Stats::of(&v);
        assert_eq!(s.timeouts, 1);
        assert_eq!(s.max, None);
        assert_eq!(s.p50, ms(11));
    }
}
