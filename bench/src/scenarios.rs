//! The three scenarios: `ready`, `burst` and `latency`, each run against the watcher
//! daemon and, where `inotifywait` exists, against the classic inotifywait script.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::proc::{self, Guard, LogTail, Wait};
use crate::report::{self, Report, dur, goal, mib, mib_abs, ratio, thousands};
use crate::tree::{self, SUBDIRS, Tree};

/// The inotify events both competitors listen to.
const INOTIFY_EVENTS: &str = "create,delete,moved_to,close_write";
const MAX_USER_WATCHES: &str = "/proc/sys/fs/inotify/max_user_watches";
/// How long the daemon may take to print `ready` before the run is given up.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `inotifywait -r` may take to set its watches.
const WATCHES_TIMEOUT: Duration = Duration::from_secs(600);
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

/// Sizes of one scale.
#[derive(Clone, Copy)]
pub struct Sizes {
    /// Files of the `ready` tree.
    pub ready_files: usize,
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
        tree_files: 100_000,
        burst_files: 100_000,
        burst_dirs: 1_000,
        latency_samples: 50,
    };
    pub const SMALL: Self = Self {
        ready_files: 100_000,
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
    /// Runs `watcher sync SRC DST --no-initial-sync` and waits for `ready`.
    fn start_daemon(&mut self, src: &Path, dst: &Path, what: &str) -> Result<Daemon> {
        let mut args: Vec<String> = vec![
            "sync".into(),
            path_str(src)?.into(),
            path_str(dst)?.into(),
            "--no-initial-sync".into(),
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
                let st = guard.stop(Signal::SIGKILL, Duration::from_secs(5))?;
                bail!(
                    "{what}: watcher exited ({}) before `ready`; last lines:\n{}",
                    status_str(st),
                    log.tail(15)
                )
            }
            Wait::Timeout => bail!(
                "{what}: no `ready` from watcher within {READY_TIMEOUT:?}; last lines:\n{}",
                log.tail(15)
            ),
        };
        Ok(Daemon {
            guard,
            log,
            ready_after: at - spawned,
            ready_line,
        })
    }

    /// Runs the classic script and waits until its inotifywait watches every directory
    /// of `tree` and no rsync is running.
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
        let base = self.workdir.join("ready");
        let result = self.ready_in(&base);
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
        settle(self.cold)?;

        let slab0 = proc::slab_kib()?;
        let daemon = self.start_daemon(&tree.root, &dst, "ready")?;
        let slab1 = proc::slab_kib()?;
        let rss = proc::rss_kib(daemon.pid())?;
        let ready_after = daemon.ready_after;
        eprintln!("ready: watcher ready after {}", dur(ready_after));
        daemon.stop(&mut self.report, "ready")?;
        let w_slab = slab1 as i64 - slab0 as i64;

        let size = format!(
            "{} files / {} dirs",
            thousands(tree.files()),
            thousands(tree.dirs())
        );
        let met = ready_after < Duration::from_secs(1);
        let slab_goal = goal("< 1 MiB", w_slab < 1024);
        let metric = format!("ready: spawn to ready ({size})");
        if !self.inotifywait {
            self.report
                .note("inotifywait is not on PATH: its part of `ready` was skipped");
            self.report
                .row(metric, dur(ready_after), "skipped", goal("< 1 s", met), "");
            self.report.row(
                "ready: kernel slab growth",
                mib(w_slab),
                "skipped",
                slab_goal.clone(),
                "",
            );
            self.report
                .row("ready: RSS at ready", mib_abs(rss), "skipped", "", "");
            return Ok(());
        }

        self.report.command(
            "ready: inotifywait -r (timed to `Watches established.` on stderr)",
            report::command_line(
                "inotifywait",
                inotifywait_ready_args(&tree.root)?,
                &self.workdir,
            ),
        );
        let limit: usize = read_trimmed(MAX_USER_WATCHES)?
            .parse()
            .context("parsing max_user_watches")?;
        let mut outcome = self.inotifywait_ready(&tree)?;
        if let InotifyReady::Failed { ref msg, after } = outcome {
            self.report.row(
                format!(
                    "ready: inotifywait -r with max_user_watches = {}",
                    thousands(limit)
                ),
                "",
                format!("failed after {}: {msg}", dur(after)),
                "",
                "",
            );
            // Other inotify users of the same user count against the same limit.
            let raised = limit + 2 * tree.dirs();
            if limit < tree.dirs() || msg.contains("upper limit") {
                let _restore = RaisedSysctl::set(MAX_USER_WATCHES, &raised.to_string())?;
                self.report.note(format!(
                    "ready: max_user_watches was raised from {} to {} for a second inotifywait run, then restored",
                    thousands(limit),
                    thousands(raised)
                ));
                outcome = self.inotifywait_ready(&tree)?;
            }
        } else {
            self.report.note(format!(
                "ready: inotifywait ran with the machine's max_user_watches = {} (the tree needs {})",
                thousands(limit),
                thousands(tree.dirs())
            ));
        }
        match outcome {
            InotifyReady::Ok {
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
                self.report.row(
                    "ready: kernel slab growth",
                    mib(w_slab),
                    mib(slab_kib),
                    slab_goal.clone(),
                    "",
                );
                self.report.row(
                    "ready: RSS at ready",
                    mib_abs(rss),
                    mib_abs(rss_kib),
                    "",
                    "",
                );
                self.report.note(format!(
                    "ready: inotifywait held {} watches; RSS of the script column is inotifywait's",
                    thousands(watches)
                ));
            }
            InotifyReady::Failed { msg, after } => {
                self.report.row(
                    metric,
                    dur(ready_after),
                    format!("failed after {}: {msg}", dur(after)),
                    goal("< 1 s", met),
                    "",
                );
                self.report.row(
                    "ready: kernel slab growth",
                    mib(w_slab),
                    "",
                    slab_goal.clone(),
                    "",
                );
                self.report
                    .row("ready: RSS at ready", mib_abs(rss), "", "", "");
            }
        }
        Ok(())
    }

    fn inotifywait_ready(&mut self, tree: &Tree) -> Result<InotifyReady> {
        settle(self.cold)?;
        let slab0 = proc::slab_kib()?;
        let mut cmd = Command::new("inotifywait");
        cmd.args(inotifywait_ready_args(&tree.root)?);
        let spawned = Instant::now();
        let (mut guard, log) = proc::spawn_logged("inotifywait", cmd, self.echo)?;
        let found = log.wait_for(0, WATCHES_TIMEOUT, |l| l.contains("Watches established"))?;
        let outcome = match found {
            Wait::Found(_, at) => {
                let slab1 = proc::slab_kib()?;
                InotifyReady::Ok {
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
                InotifyReady::Failed {
                    msg: format!(
                        "exited ({}): {}",
                        status_str(st),
                        report::hide_workdir(&why, &self.workdir)
                    ),
                    after,
                }
            }
            Wait::Timeout => InotifyReady::Failed {
                msg: format!("no `Watches established.` within {WATCHES_TIMEOUT:?}"),
                after: spawned.elapsed(),
            },
        };
        guard.stop(Signal::SIGTERM, Duration::from_secs(5))?;
        eprintln!(
            "ready: inotifywait {}",
            match &outcome {
                InotifyReady::Ok { after, .. } =>
                    format!("established watches after {}", dur(*after)),
                InotifyReady::Failed { msg, .. } => format!("failed: {msg}"),
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

        // watcher
        let daemon = self.start_daemon(&tree.root, &dst, "burst")?;
        let runs0 = daemon.rsync_runs();
        let cpu0 = proc::cpu_time(daemon.pid())?;
        eprintln!("burst: watcher ready; writing {what}");
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
            self.report
                .note("burst: watcher still ran rsync 30 s after the replica was complete");
        }
        let w_ok = match &complete {
            Ok(t) => {
                let bad = verify(&dst_dirs, per_dir)?;
                if bad > 0 {
                    self.report.note(format!(
                        "burst: {bad} replica files had wrong contents after the watcher run"
                    ));
                }
                eprintln!("burst: watcher replica complete after {}", dur(*t));
                true
            }
            Err(e) => {
                self.report.note(format!("burst (watcher): {e}"));
                false
            }
        };
        self.report.note(format!(
            "burst: the watcher's own CPU time during the burst: {}",
            dur(cpu)
        ));
        let w = BurstTimes { written, complete };

        // inotifywait script, on the same tree without the burst directories
        let script = if self.inotifywait {
            for d in src_dirs.iter().chain(&dst_dirs) {
                tree::remove(d)?;
            }
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

        let rows: [(String, BurstMetric); 3] = [
            (
                format!("burst: first write to replica complete ({what})"),
                |b| b.complete.as_ref().ok().copied(),
            ),
            ("burst: writing the files".to_owned(), |b| Some(b.written)),
            ("burst: last write to replica complete".to_owned(), |b| {
                b.complete
                    .as_ref()
                    .ok()
                    .map(|c| c.saturating_sub(b.written))
            }),
        ];
        for (metric, get) in rows {
            let cell = |b: &BurstTimes| get(b).map_or_else(|| "incomplete".to_owned(), dur);
            let r = match (script.as_ref().and_then(get), get(&w)) {
                (Some(s), Some(w)) => ratio(s, w),
                _ => String::new(),
            };
            self.report.row(
                metric,
                cell(&w),
                script.as_ref().map_or_else(|| "skipped".to_owned(), cell),
                "",
                r,
            );
        }
        self.report.row(
            "burst: rsync runs",
            runs.to_string(),
            "",
            goal("<= 10", runs <= 10 && w_ok),
            "",
        );
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

        let daemon = self.start_daemon(&tree.root, &dst, "latency")?;
        eprintln!("latency: watcher ready; {n} samples");
        let (w, busy) = samples(&tree, &dst, daemon.pid(), n, "w", &mut rng)?;
        daemon.stop(&mut self.report, "latency")?;
        self.busy_note("watcher", busy);
        let w = Stats::of(&w);

        let s = if self.inotifywait {
            let script = self.start_script(&tree, &dst, "latency")?;
            eprintln!("latency: script watching; {n} samples");
            let (s, busy) = samples(&tree, &dst, script.guard.pid(), n, "s", &mut rng)?;
            drop(script);
            self.busy_note("script", busy);
            Some(Stats::of(&s))
        } else {
            self.report
                .note("inotifywait is not on PATH: its part of `latency` was skipped");
            None
        };

        let what = format!("{} samples, {}-file tree", n, thousands(tree.files()));
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
                format!("latency: {name} ({what})"),
                stat_cell(wv),
                sv.map_or_else(|| "skipped".to_owned(), stat_cell),
                g,
                r,
            );
        }
        self.report.row(
            format!(
                "latency: samples over {}",
                dur(SAMPLE_TIMEOUT).replace(".00", "")
            ),
            format!("{}/{n}", w.timeouts),
            s.as_ref()
                .map_or_else(|| "skipped".to_owned(), |s| format!("{}/{n}", s.timeouts)),
            "",
            "",
        );
        Ok(())
    }
}

enum InotifyReady {
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
struct RaisedSysctl {
    path: &'static str,
    old: String,
}

impl RaisedSysctl {
    fn set(path: &'static str, value: &str) -> Result<Self> {
        let old = read_trimmed(path)?;
        fs::write(path, value).with_context(|| format!("writing {path}"))?;
        Ok(Self { path, old })
    }
}

impl Drop for RaisedSysctl {
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
