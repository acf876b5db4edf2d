//! The `kernel` scenario: the ebpf backend against the fanotify backend, on the same
//! writes, one after the other. First 100,000 new files inside the watched root (events
//! or records delivered per second, CPU per 100,000 creates, time to a complete replica);
//! then a busy filesystem with a small root, the writes outside it, on the same
//! filesystem and on another one, with the ebpf backend's in-kernel filter on and off;
//! last a read/write-heavy process beside the small root (existing files opened, read
//! and now and then rewritten in place, outside the root): what the listener costs that
//! process, against no listener at all. The ebpf rows also give the ring buffer space a
//! record takes on average.

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::comp::{Comp, Running, Summary};
use crate::proc;
use crate::report::{Section, Unit, dur, thousands};
use crate::scen::{self, Ctx};
use crate::tree::{self, Tree};

/// Files per directory of the writes.
const PER_DIR: usize = 100;
/// Files of the small root of the busy phases.
const SMALL_ROOT_FILES: usize = 100;
/// The figures are given per this many creates (or operations).
const PER: f64 = 100_000.0;
/// Longest wait for the one change in the root during a busy phase to reach the replica.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the daemon to finish what it read (its CPU time to stop growing).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the final `rsync -anic` comparison of a busy phase to show no
/// difference.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(20);
/// Existing files outside the root that the read/write-heavy process works on.
const RW_FILES: usize = 2_000;
/// Size of each of them, and of each write.
const RW_SIZE: usize = 4096;
/// Operations of the read/write phase per file written in the other phases.
const RW_OPS_PER_FILE: usize = 4;
/// Every this many operations of the read/write-heavy process, one also writes.
const RW_WRITE_EVERY: usize = 4;

/// Ratios shown under every table.
const RATIOS: [(Comp, Comp); 3] = [
    (Comp::Ebpf, Comp::Fanotify),
    (Comp::EbpfUnfiltered, Comp::Fanotify),
    (Comp::EbpfUnfiltered, Comp::Ebpf),
];
/// What the ring buffer column means.
const RING_NOTE: &str = "Ring buffer bytes per record: `ring_bytes` / `records` of the `ebpf backend stopped` line, the space a record takes in the ring buffer on average (its size rounded up to 8 bytes, plus an 8-byte header).";
const RATIO_NOTE: &str = "Ratios a / b of the medians (per-run range in brackets); `watcher (ebpf, kernel filter off)` / `watcher (ebpf)` is what the in-kernel filter saves (above 1: the filter lowers it):";

/// What the writer threads did.
struct Written {
    /// First operation to the end of the last thread.
    wall: Duration,
    /// CPU time of the writer threads (user + system): the system calls, and what the
    /// kernel does for a listener on them (fanotify events, eBPF probes), on this side.
    cpu: Duration,
    /// Files created, or operations done.
    count: usize,
}

/// Progress of the writer threads, for what runs beside them.
struct Progress {
    /// Files created, or operations done, so far.
    count: AtomicUsize,
    finished: AtomicUsize,
    threads: usize,
}

impl Progress {
    fn done(&self) -> bool {
        self.finished.load(Ordering::Relaxed) >= self.threads
    }
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value; getrusage only writes into it.
    let mut ru: nix::libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { nix::libc::getrusage(nix::libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: nix::libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs `work(thread, progress)` on `threads` threads of their own, and `beside` on the
/// calling thread meanwhile. The wall time runs from the start to the end of the last
/// thread; the CPU time is the threads' own (`getrusage(RUSAGE_THREAD)`).
fn run_threads<T>(
    threads: usize,
    work: &(dyn Fn(usize, &Progress) -> Result<()> + Sync),
    beside: impl FnOnce(&Progress) -> Result<T>,
) -> Result<(Written, T)> {
    let progress = Progress {
        count: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        threads,
    };
    let start = Instant::now();
    let (results, other) = thread::scope(|s| {
        let p = &progress;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<(Duration, Instant)> {
                    let cpu0 = thread_cpu();
                    let r = work(t, p);
                    let end = Instant::now();
                    p.finished.fetch_add(1, Ordering::Relaxed);
                    r.map(|()| (thread_cpu().saturating_sub(cpu0), end))
                })
            })
            .collect();
        let other = beside(p);
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a writer thread panicked")))
            })
            .collect();
        (results, other)
    });
    let mut cpu = Duration::ZERO;
    let mut end = start;
    for r in results {
        let (c, e) = r?;
        cpu += c;
        end = end.max(e);
    }
    Ok((
        Written {
            wall: end - start,
            cpu,
            count: progress.count.load(Ordering::Relaxed),
        },
        other?,
    ))
}

/// Two threads, each on half of `dirs`: create the directory, write `PER_DIR` small files
/// (`content(dir, file)`) into it as fast as they can, and with `delete` unlink them and
/// remove the directory again. `beside` runs on the calling thread meanwhile.
fn write<T>(
    dirs: &[PathBuf],
    delete: bool,
    content: &(dyn Fn(usize, usize) -> String + Sync),
    beside: impl FnOnce(&Progress) -> Result<T>,
) -> Result<(Written, T)> {
    let threads = 2;
    let chunk = dirs.len().div_ceil(threads).max(1);
    let work = |t: usize, p: &Progress| -> Result<()> {
        let part = dirs.chunks(chunk).nth(t).unwrap_or_default();
        for (k, dir) in part.iter().enumerate() {
            proc::check_interrupted()?;
            let d = t * chunk + k;
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for f in 0..PER_DIR {
                let path = dir.join(tree::file_name(f));
                fs::write(&path, content(d, f))
                    .with_context(|| format!("writing {}", path.display()))?;
                p.count.fetch_add(1, Ordering::Relaxed);
            }
            if delete {
                for f in 0..PER_DIR {
                    fs::remove_file(dir.join(tree::file_name(f)))?;
                }
                fs::remove_dir(dir)?;
            }
        }
        Ok(())
    };
    run_threads(threads, &work, beside)
}

/// Two threads, `ops` operations in all (half each) on `files`, existing files of
/// [`RW_SIZE`] bytes taken in turn: open one read-only by its path, read it to the end,
/// close it, `stat` it; every [`RW_WRITE_EVERY`]th operation then also opens it
/// write-only (no `O_CREAT`, no `O_TRUNC`), writes [`RW_SIZE`] bytes at offset 0
/// (`pwrite`) and closes it. `beside` runs on the calling thread meanwhile.
fn read_write<T>(
    files: &[PathBuf],
    ops: usize,
    beside: impl FnOnce(&Progress) -> Result<T>,
) -> Result<(Written, T)> {
    let threads = 2;
    let each = ops.div_ceil(threads);
    let block = [b'w'; RW_SIZE];
    let work = |t: usize, p: &Progress| -> Result<()> {
        let mut buf = [0u8; RW_SIZE];
        for i in 0..each {
            proc::check_interrupted()?;
            let path = &files[(t * each + i) % files.len()];
            fs::File::open(path)
                .and_then(|mut f| {
                    while f.read(&mut buf)? > 0 {}
                    Ok(())
                })
                .and_then(|()| fs::metadata(path))
                .with_context(|| format!("reading {}", path.display()))?;
            if i % RW_WRITE_EVERY == RW_WRITE_EVERY - 1 {
                fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.write_all_at(&block, 0))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            p.count.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    };
    run_threads(threads, &work, beside)
}

/// Waits until the daemon's own CPU time stops growing (it has processed what it read):
/// unchanged over 5 samples 100 ms apart (the counter ticks every 10 ms), at most
/// [`DRAIN_TIMEOUT`]. Returns false on timeout.
fn drain(r: &Running) -> Result<bool> {
    let end = Instant::now() + DRAIN_TIMEOUT;
    let mut last = r.own_cpu();
    let mut same = 0;
    while Instant::now() < end {
        proc::sleep(Duration::from_millis(100))?;
        let now = r.own_cpu();
        if now == last {
            same += 1;
            if same >= 5 {
                return Ok(true);
            }
        } else {
            same = 0;
            last = now;
        }
    }
    Ok(false)
}

/// A tmpfs of its own, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    fn mount(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut me = Self {
            dir: dir.to_owned(),
            mounted: false,
        };
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4g,mode=0755", "watcher-bench"])
            .arg(dir)
            .status()
            .context("running mount")?;
        if !st.success() {
            bail!("mounting a tmpfs on {} failed: {st}", dir.display());
        }
        me.mounted = true;
        Ok(me)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        for _ in 0..20 {
            if Command::new("umount")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success())
            {
                let _ = fs::remove_dir(&self.dir);
                return;
            }
            thread::sleep(Duration::from_millis(250));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// `n` directories `kNN/kNN` (100 per top directory) under `base`.
fn dirs_under(base: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|d| {
            base.join(format!("k{:03}", d / 100))
                .join(format!("k{:02}", d % 100))
        })
        .collect()
}

/// Per [`PER`] creates (or operations), of `n`.
fn per(v: f64, n: usize) -> f64 {
    v * PER / n.max(1) as f64
}

fn secs(d: Duration) -> Option<f64> {
    Some(d.as_secs_f64())
}

/// Daemon and rsync CPU of a run: (own, everything else in its cgroup or process tree).
fn cpu_split(r: &Running, total0: Duration, own0: Duration) -> (Duration, Duration) {
    let own = r.own_cpu().saturating_sub(own0);
    let total = r.cpu().saturating_sub(total0);
    (own, total.saturating_sub(own))
}

impl Ctx {
    pub fn kernel(&mut self) -> Result<()> {
        let base = self.workdir.join("kernel");
        let r = self.kernel_in(&base);
        let removed = tree::remove(&base);
        r?;
        removed
    }

    /// The competitors of the scenario: no watcher, then fanotify and ebpf when chosen.
    fn kernel_comps(&self) -> Vec<Comp> {
        let mut v = vec![Comp::Baseline];
        v.extend(
            [Comp::Fanotify, Comp::Ebpf]
                .into_iter()
                .filter(|c| self.comps.contains(c)),
        );
        v
    }

    fn kernel_in(&mut self, base: &Path) -> Result<()> {
        if !self.comps.contains(&Comp::Ebpf) {
            self.report.note(
                "kernel: watcher (ebpf) is not among the competitors (not built in, or left out with --only): fanotify alone",
            );
        }
        let tmpfs = Tmpfs::mount(&base.join("tmpfs"))?;
        self.kernel_inside(&base.join("inside"), &tmpfs.dir)?;
        self.kernel_busy(&base.join("busy"), &tmpfs.dir)?;
        drop(tmpfs);
        self.kernel_rw(&base.join("readwrite"))
    }

    // -------------------------------------------------------------- inside the root

    fn kernel_inside(&mut self, base: &Path, other_fs: &Path) -> Result<()> {
        let (tree, _) = Tree::generate(&base.join("src"), self.sizes.tree_files)?;
        let replicas = [
            (
                "replica on another filesystem (tmpfs)",
                other_fs.join("inside-dst"),
            ),
            ("replica on the watched filesystem", base.join("dst")),
        ];
        for (_, dst) in &replicas {
            scen::seed(&tree.root, dst)?;
        }
        let ndirs = self.sizes.kernel_files.div_ceil(PER_DIR);
        let total = ndirs * PER_DIR;
        let timeout = self.sizes.kernel_timeout;
        let rel: Vec<PathBuf> = dirs_under(Path::new("kernel"), ndirs);
        let src_dirs: Vec<PathBuf> = rel.iter().map(|r| tree.root.join(r)).collect();
        let scaled = scaled_note(
            total,
            "files",
            "the CPU figures are scaled to 100,000 creates",
        );
        let mut sec = Section::new(
            "kernel: new files inside the root, ebpf vs fanotify",
            vec![
                format!(
                    "{} new files ({} new directories of {PER_DIR} small files) written by 2 threads of the harness as fast as they can into a {}-file tree the daemon watches (ready first; the same writes were made and removed once before the first run, unmeasured). First create until the replica has every file (polled; given up after {}); the contents are checked afterwards. Events/s: the events the daemon read (its `stopped` line) per second of write time; records/s: the records the ebpf probes put in the ring buffer (`ebpf backend stopped` line), per second of write time; both count from start to stop. {RING_NOTE}{scaled}",
                    thousands(total),
                    thousands(ndirs),
                    thousands(tree.files()),
                    dur(timeout)
                ),
                "The replica first on another filesystem (a tmpfs the harness mounts), so that only the new files are changes on the watched filesystem, then beside the source on the watched filesystem, as in the other scenarios: there fanotify, one mark for the whole filesystem, also reports every write of the daemon's own rsync processes, which the daemon drops in user space, while the ebpf probes drop the records of the daemon and its children in the kernel.".to_owned(),
                format!(
                    "CPU per 100,000 creates: the daemon's own process (`/proc/PID/stat` utime + stime, all its threads), its rsync processes ({}, minus the daemon), and the writer threads of the harness (`getrusage(RUSAGE_THREAD)`): their system time holds what the kernel does for the listener on every write, fanotify's event queueing or the eBPF probes, which run in the writer's context. CPU counts from the first create until the replica is complete and the daemon's CPU time stopped growing. `no watcher`: the same writes with nothing listening.",
                    if self.cgroups {
                        "the competitor's cgroup v2 `cpu.stat` `usage_usec`"
                    } else {
                        "`/proc/PID/stat` cutime + cstime of the daemon, a lower bound"
                    }
                ),
            ],
            &[
                ("first create to replica complete", Unit::Secs, true),
                ("writing the files", Unit::Secs, true),
                ("events read/s", Unit::Num, false),
                ("ebpf records/s", Unit::Num, false),
                ("ring buffer bytes per record", Unit::Num, false),
                ("daemon CPU per 100,000", Unit::Secs, true),
                ("rsync CPU per 100,000", Unit::Secs, true),
                ("rsync runs", Unit::Count, false),
                ("writer CPU per 100,000", Unit::Secs, true),
                ("overflows", Unit::Count, false),
            ],
        )
        .with_ratios(&RATIOS[..1], RATIO_NOTE);
        let comps = self.kernel_comps();
        // Once unmeasured: the first writes on a fresh filesystem (and right after the
        // tree was generated) are slower than the later ones, which would favour whoever
        // runs second.
        eprintln!("kernel inside: warm-up writes");
        write(&src_dirs, false, &scen::burst_content, |_| Ok(()))?;
        tree::remove(&tree.root.join("kernel"))?;
        nix::unistd::sync();
        let mut given_up: Vec<(usize, Comp)> = Vec::new();
        for rep in 0..self.repeat {
            for (g, (group, dst)) in replicas.iter().enumerate() {
                let group = *group;
                let dst_dirs: Vec<PathBuf> = rel.iter().map(|r| dst.join(r)).collect();
                for &c in &comps {
                    // The writes alone do not depend on where the replica is.
                    if given_up.contains(&(g, c)) || (c == Comp::Baseline && g > 0) {
                        continue;
                    }
                    proc::check_interrupted()?;
                    tree::remove(&tree.root.join("kernel"))?;
                    tree::remove(&dst.join("kernel"))?;
                    nix::unistd::sync();
                    let content = scen::burst_content;
                    if c == Comp::Baseline {
                        let (w, ()) = write(&src_dirs, false, &content, |_| Ok(()))?;
                        eprintln!(
                            "kernel inside: run {}: {group}: {}: {} files written in {}, writer CPU {}",
                            rep + 1,
                            c.name(),
                            thousands(w.count),
                            dur(w.wall),
                            dur(w.cpu)
                        );
                        sec.push(group, c, 1, secs(w.wall));
                        sec.push(group, c, 8, Some(per(w.cpu.as_secs_f64(), w.count)));
                        continue;
                    }
                    let r = match self.start("kernel (inside the root)", c, &tree, dst) {
                        Ok(r) => r,
                        Err(e) => {
                            proc::check_interrupted()?;
                            self.report
                                .note(format!("kernel inside ({group}, {}): {e:#}", c.name()));
                            given_up.push((g, c));
                            continue;
                        }
                    };
                    let (total0, own0) = (r.cpu(), r.own_cpu());
                    let start = Instant::now();
                    let (w, ()) = write(&src_dirs, false, &content, |_| Ok(()))?;
                    let (at, left) = tree::wait_complete(
                        &dst_dirs,
                        PER_DIR,
                        timeout.saturating_sub(start.elapsed()),
                    )?;
                    let complete = (left == 0).then(|| at - start);
                    drain(&r)?;
                    let (own, rsync) = cpu_split(&r, total0, own0);
                    let summary = r.stop_summary()?;
                    let bad = if complete.is_some() {
                        scen::verify(&dst_dirs, PER_DIR)?
                    } else {
                        0
                    };
                    if complete.is_none() {
                        given_up.push((g, c));
                        self.report.note(format!(
                        "kernel inside ({group}, {}): {left} of {ndirs} directories incomplete in the replica after {}; {}",
                        c.name(),
                        dur(timeout),
                        if rep + 1 < self.repeat { "not repeated" } else { "given up" }
                    ));
                    }
                    if bad > 0 {
                        self.report.note(format!(
                            "kernel inside ({group}, {}): {bad} replica files with wrong contents",
                            c.name()
                        ));
                    }
                    let wall = w.wall.as_secs_f64();
                    let events = summary.field("backend_events");
                    let records = summary.backend.as_ref().and(summary.field("records"));
                    eprintln!(
                        "kernel inside: run {}: {group}: {}: {} files in {}, complete {}, events {:?}, records {:?}, daemon CPU {}, rsync CPU {}, writer CPU {}",
                        rep + 1,
                        c.name(),
                        thousands(w.count),
                        dur(w.wall),
                        complete.map_or_else(|| "never".to_owned(), dur),
                        events,
                        records,
                        dur(own),
                        dur(rsync),
                        dur(w.cpu)
                    );
                    sec.push(group, c, 0, complete.map(|d| d.as_secs_f64()));
                    sec.push(group, c, 1, Some(wall));
                    sec.push(group, c, 2, events.map(|e| e / wall));
                    if c == Comp::Ebpf {
                        sec.push(group, c, 3, records.map(|e| e / wall));
                        sec.push(group, c, 4, ring_bytes_per_record(&summary));
                    }
                    sec.push(group, c, 5, Some(per(own.as_secs_f64(), w.count)));
                    sec.push(group, c, 6, Some(per(rsync.as_secs_f64(), w.count)));
                    sec.push(group, c, 7, summary.field("rsync_runs"));
                    sec.push(group, c, 8, Some(per(w.cpu.as_secs_f64(), w.count)));
                    sec.push(group, c, 9, summary.field("overflows"));
                    check_summary(
                        self,
                        &format!("kernel inside ({group}, {})", c.name()),
                        c,
                        &summary,
                    );
                }
            }
        }
        self.report.sections.push(sec);
        tree::remove(&tree.root)?;
        for (_, dst) in &replicas {
            tree::remove(dst)?;
        }
        Ok(())
    }

    // -------------------------------------------------------- busy filesystem, small root

    /// The competitors of the busy phases: those of [`Ctx::kernel_comps`], and with ebpf
    /// also ebpf with its in-kernel filter off.
    fn busy_comps(&self) -> Vec<Comp> {
        let mut comps = self.kernel_comps();
        if comps.contains(&Comp::Ebpf) {
            comps.push(Comp::EbpfUnfiltered);
        }
        comps
    }

    fn kernel_busy(&mut self, base: &Path, other_fs: &Path) -> Result<()> {
        let mut small = SmallRoot::create(base, "kernel (busy filesystem)")?;
        let ndirs = self.sizes.kernel_files.div_ceil(PER_DIR);
        let total = ndirs * PER_DIR;
        let scaled = scaled_note(total, "files", "the figures per 100,000 creates are scaled");
        let mut sec = Section::new(
            "kernel: busy filesystem, small root",
            vec![
                format!(
                    "The daemon watches a small root ({SMALL_ROOT_FILES} files); 2 threads of the harness create {} small files ({} directories of {PER_DIR}; each directory's files are unlinked and the directory removed right after it is full) outside it: in a sibling directory on the same filesystem, then on another filesystem (a tmpfs the harness mounts); the same writes are made once in each place before the first run, unmeasured. Half-way through, one new file is written into the root: `root change in replica` is the time until the replica has it (given up after {}). At the end the replica is compared with `rsync -anic --delete` (differences are listed in the notes).{scaled}",
                    thousands(total),
                    thousands(ndirs),
                    dur(CHANGE_TIMEOUT)
                ),
                format!(
                    "Delivered to user space: the events the fanotify backend read, the records the ebpf probes put in the ring buffer (per 100,000 creates; counted from start to stop of the daemon, so a few hundred are not from these writes: the root change and its replication, the final comparison, and for ebpf every other process of the machine). Dropped in the kernel: the `outside_roots_dropped_in_kernel` count of the ebpf backend (absent from daemons without the in-kernel filter). {RING_NOTE} Daemon CPU: its own process, from the first create until its CPU time stopped growing after the writes. Writer CPU: the harness's writer threads (`getrusage(RUSAGE_THREAD)`), which pay for the probes and fanotify's queueing in the kernel. `watcher (ebpf, kernel filter off)` runs with `--ebpf-kernel-filter off`: every change goes to user space, which drops what is outside the root."
                ),
            ],
            &busy_columns("writing (creates + deletes)"),
        )
        .with_ratios(&RATIOS, RATIO_NOTE);
        let comps = self.busy_comps();
        let places = [
            ("same filesystem, outside the root", base.join("outside")),
            ("another filesystem (tmpfs)", other_fs.join("outside")),
        ];
        eprintln!("kernel busy: warm-up writes");
        for (_, area) in &places {
            write(
                &dirs_under(area, ndirs),
                true,
                &|_, _| String::new(),
                |_| Ok(()),
            )?;
            tree::remove(area)?;
        }
        let content = |d: usize, f: usize| format!("busy {d} {f}\n");
        let mut failed: Vec<(usize, Comp)> = Vec::new();
        for rep in 0..self.repeat {
            for (g, (group, area)) in places.iter().enumerate() {
                let dirs = dirs_under(area, ndirs);
                for &c in &comps {
                    if failed.contains(&(g, c)) {
                        continue;
                    }
                    proc::check_interrupted()?;
                    tree::remove(area)?;
                    let what = format!("kernel busy ({group}, {})", c.name());
                    match self.busy_run(&mut small, &what, c, total / 2, |beside| {
                        write(&dirs, true, &content, beside)
                    })? {
                        Some(run) => run.record(&mut sec, group, c, rep, &what),
                        None => failed.push((g, c)),
                    }
                }
                tree::remove(area)?;
            }
        }
        self.report.sections.push(sec);
        small.remove()
    }

    /// One run of `c` in a busy phase on `small`: starts the daemon on it (nothing for
    /// no watcher), runs `work` (the harness's threads) with one change written into the
    /// root once `half` operations are done, waits until the daemon is idle, compares
    /// the replica with the root and stops the daemon. `what` names the run in the
    /// notes. None: the daemon did not start (noted).
    fn busy_run(
        &mut self,
        small: &mut SmallRoot,
        what: &str,
        c: Comp,
        half: usize,
        work: impl FnOnce(Beside<'_>) -> Result<(Written, Option<Duration>)>,
    ) -> Result<Option<BusyRun>> {
        nix::unistd::sync();
        small.changes += 1;
        let change = RootChange::new(&small.root.root, &small.dst, small.changes, what);
        let running = if c == Comp::Baseline {
            None
        } else {
            match self.start(small.command, c, &small.root, &small.dst) {
                Ok(r) => Some(r),
                Err(e) => {
                    proc::check_interrupted()?;
                    self.report.note(format!("{what}: {e:#}"));
                    return Ok(None);
                }
            }
        };
        let before = running.as_ref().map(|r| (r.cpu(), r.own_cpu()));
        let watching = running.is_some();
        let (w, latency) = work(&|p| change.half_way(p, half, watching))?;
        let mut run = BusyRun {
            w,
            daemon_cpu: None,
            latency,
            summary: Summary::default(),
        };
        let (Some(r), Some((total0, own0))) = (running, before) else {
            // Nothing replicates it: take it out of the root again.
            fs::remove_file(&change.path)
                .with_context(|| format!("removing {}", change.path.display()))?;
            return Ok(Some(run));
        };
        if !drain(&r)? {
            self.report.note(format!(
                "{what}: the daemon was still busy {} after the writes",
                dur(DRAIN_TIMEOUT)
            ));
        }
        run.daemon_cpu = Some(cpu_split(&r, total0, own0).0);
        let src = &small.root.root;
        let (converged, diff, content_diff) = scen::converge(src, &small.dst, VERIFY_TIMEOUT)?;
        if converged.is_none() {
            self.report.note(format!(
                "{what}: the replica still differed from the root {} after the writes ({diff} paths, {content_diff} in content)",
                dur(VERIFY_TIMEOUT)
            ));
        }
        run.summary = r.stop_summary()?;
        check_summary(self, what, c, &run.summary);
        if latency.is_none() {
            self.report.note(format!(
                "{what}: the change in the root was not in the replica within {}",
                dur(CHANGE_TIMEOUT)
            ));
        }
        Ok(Some(run))
    }

    // ------------------------------------------------------- read/write-heavy process

    fn kernel_rw(&mut self, base: &Path) -> Result<()> {
        let mut small = SmallRoot::create(base, "kernel (read/write-heavy process)")?;
        let rw = base.join("rw");
        fs::create_dir_all(&rw).with_context(|| format!("creating {}", rw.display()))?;
        // Opened by absolute paths, also if the work directory was given as a relative one.
        let rw = fs::canonicalize(&rw).with_context(|| format!("resolving {}", rw.display()))?;
        let dirs = dirs_under(&rw, RW_FILES.div_ceil(PER_DIR));
        let fill = "x".repeat(RW_SIZE);
        tree::write_files(&dirs, PER_DIR, &|_, _| fill.clone())?;
        let files: Vec<PathBuf> = dirs
            .iter()
            .flat_map(|d| (0..PER_DIR).map(move |f| d.join(tree::file_name(f))))
            .collect();
        let threads = 2;
        // Four operations per file of the other phases: a goal of 1% needs seconds of
        // writer CPU to stand out of the noise.
        let each = (RW_OPS_PER_FILE * self.sizes.kernel_files).div_ceil(threads);
        let ops = each * threads;
        let scaled = scaled_note(
            ops,
            "operations",
            "the figures per 100,000 operations are scaled",
        );
        let mut ratios = RATIOS.to_vec();
        ratios.extend([
            (Comp::Ebpf, Comp::Baseline),
            (Comp::Fanotify, Comp::Baseline),
        ]);
        let mut sec = Section::new(
            "kernel: read/write-heavy process",
            vec![
                format!(
                    "The daemon watches a small root ({SMALL_ROOT_FILES} files); beside it, in a sibling directory on the same filesystem, are {} existing files of {} KiB. 2 threads of the harness do {} operations on them ({} each, the files in turn): open a file read-only by its absolute path, read it to the end, close it, `stat` it; every {RW_WRITE_EVERY}th operation then also opens it write-only (no `O_CREAT`, no `O_TRUNC`), writes {} KiB at offset 0 (`pwrite`) and closes it. The same operations are done once before the first run, unmeasured. Half-way through, one new file is written into the root: `root change in replica` is the time until the replica has it (given up after {}). At the end the replica is compared with `rsync -anic --delete` (differences are listed in the notes).{scaled}",
                    thousands(files.len()),
                    RW_SIZE / 1024,
                    thousands(ops),
                    thousands(each),
                    RW_SIZE / 1024,
                    dur(CHANGE_TIMEOUT)
                ),
                format!(
                    "Writer CPU: the harness's threads (`getrusage(RUSAGE_THREAD)`), which pay for the probes and fanotify's queueing in the kernel; `no watcher`: the same operations with nothing listening. The goal: the writer CPU under the ebpf backend within 1% of `no watcher`. Delivered to user space: the events the fanotify backend read (its mark covers the whole filesystem: the writes are reported, the reads are not), the records the ebpf probes put in the ring buffer (per 100,000 operations; counted from start to stop of the daemon, so some are not from these operations: the root change and its replication, the final comparison, and for ebpf every other process of the machine). Dropped in the kernel: the `outside_roots_dropped_in_kernel` count of the ebpf backend. {RING_NOTE} Daemon CPU: its own process, from the first operation until its CPU time stopped growing after them. `watcher (ebpf, kernel filter off)` runs with `--ebpf-kernel-filter off`."
                ),
            ],
            &busy_columns("read/write operations"),
        )
        .with_ratios(
            &ratios,
            "Ratios a / b of the medians (per-run range in brackets); `watcher (ebpf, kernel filter off)` / `watcher (ebpf)` is what the in-kernel filter saves (above 1: the filter lowers it); a / `no watcher` is what listening costs the process (the goal for the writer CPU of `watcher (ebpf)`: at most 1.01x):",
        );
        let comps = self.busy_comps();
        eprintln!("kernel read/write: warm-up operations");
        read_write(&files, ops, |_| Ok(()))?;
        let mut failed: Vec<Comp> = Vec::new();
        for rep in 0..self.repeat {
            for &c in &comps {
                if failed.contains(&c) {
                    continue;
                }
                proc::check_interrupted()?;
                let what = format!("kernel read/write ({})", c.name());
                match self.busy_run(&mut small, &what, c, ops / 2, |beside| {
                    read_write(&files, ops, beside)
                })? {
                    Some(run) => run.record(&mut sec, "", c, rep, &what),
                    None => failed.push(c),
                }
            }
        }
        self.report.sections.push(sec);
        tree::remove(&rw)?;
        small.remove()
    }
}

/// What the harness's threads get to run beside them in a busy phase.
type Beside<'a> = &'a dyn Fn(&Progress) -> Result<Option<Duration>>;

/// The small root of a busy phase, which the daemon watches, and its replica.
struct SmallRoot {
    root: Tree,
    dst: PathBuf,
    /// What the daemon's command line is listed as.
    command: &'static str,
    /// Changes written into the root so far.
    changes: usize,
}

impl SmallRoot {
    /// [`SMALL_ROOT_FILES`] files in `base/src`, copied to `base/dst`.
    fn create(base: &Path, command: &'static str) -> Result<Self> {
        let src = base.join("src");
        let dst = base.join("dst");
        tree::write_files(std::slice::from_ref(&src), SMALL_ROOT_FILES, &|_, f| {
            format!("small root {f}\n")
        })?;
        scen::seed(&src, &dst)?;
        Ok(Self {
            root: Tree { root: src, tops: 0 },
            dst,
            command,
            changes: 0,
        })
    }

    fn remove(self) -> Result<()> {
        tree::remove(&self.root.root)?;
        tree::remove(&self.dst)
    }
}

/// The one change written into a small root half-way through a run.
struct RootChange {
    path: PathBuf,
    replica: PathBuf,
    text: String,
}

impl RootChange {
    fn new(src: &Path, dst: &Path, no: usize, what: &str) -> Self {
        let name = format!("change-{no:03}");
        Self {
            path: src.join(&name),
            replica: dst.join(&name),
            text: format!("change {no} {what}\n"),
        }
    }

    /// Waits until `half` operations are done (or the threads finished), writes the
    /// change, and when `watching` waits until the replica has it: the time that took
    /// (None: not within [`CHANGE_TIMEOUT`], or nothing watching).
    fn half_way(&self, p: &Progress, half: usize, watching: bool) -> Result<Option<Duration>> {
        // Bounded by the threads' end.
        let end = Instant::now() + Duration::from_secs(600);
        while p.count.load(Ordering::Relaxed) < half && !p.done() && Instant::now() < end {
            proc::check_interrupted()?;
            thread::sleep(Duration::from_millis(1));
        }
        let t0 = Instant::now();
        fs::write(&self.path, &self.text)
            .with_context(|| format!("writing {}", self.path.display()))?;
        if !watching {
            return Ok(None);
        }
        while t0.elapsed() < CHANGE_TIMEOUT {
            if fs::read(&self.replica).is_ok_and(|b| b == self.text.as_bytes()) {
                return Ok(Some(t0.elapsed()));
            }
            proc::check_interrupted()?;
            thread::sleep(Duration::from_millis(1));
        }
        Ok(None)
    }
}

/// One run of a busy phase.
struct BusyRun {
    w: Written,
    /// The daemon's own CPU time, from the start until it stopped growing after the work.
    daemon_cpu: Option<Duration>,
    /// From the change in the root to its copy in the replica.
    latency: Option<Duration>,
    summary: Summary,
}

impl BusyRun {
    /// Prints the run and adds its cells (the columns of [`busy_columns`]).
    fn record(&self, sec: &mut Section, group: &str, c: Comp, rep: usize, what: &str) {
        let s = &self.summary;
        let delivered = match c {
            Comp::Fanotify => s.field("backend_events"),
            Comp::Ebpf | Comp::EbpfUnfiltered => s.backend.as_ref().and(s.field("records")),
            _ => None,
        };
        let dropped = s
            .backend
            .as_deref()
            .and_then(|l| crate::comp::field(l, "outside_roots_dropped_in_kernel"));
        let ring = ring_bytes_per_record(s);
        let n = self.w.count;
        eprintln!(
            "{what}: run {}: {} operations in {}, writer CPU {}, daemon CPU {}, delivered {delivered:?}, dropped in kernel {dropped:?}, ring bytes per record {ring:?}, change after {}",
            rep + 1,
            thousands(n),
            dur(self.w.wall),
            dur(self.w.cpu),
            self.daemon_cpu.map_or_else(|| "-".to_owned(), dur),
            self.latency.map_or_else(|| "-".to_owned(), dur)
        );
        sec.push(group, c, 0, secs(self.w.wall));
        sec.push(group, c, 1, Some(per(self.w.cpu.as_secs_f64(), n)));
        if c == Comp::Baseline {
            return;
        }
        sec.push(
            group,
            c,
            2,
            self.daemon_cpu.map(|d| per(d.as_secs_f64(), n)),
        );
        sec.push(group, c, 3, delivered.map(|v| per(v, n)));
        if let Some(v) = dropped {
            sec.push(group, c, 4, Some(per(v, n)));
        }
        if ring.is_some() {
            sec.push(group, c, 5, ring);
        }
        sec.push(group, c, 6, self.latency.map(|d| d.as_secs_f64()));
        sec.push(group, c, 7, s.field("overflows"));
        sec.push(group, c, 8, s.field("rescans"));
        sec.push(group, c, 9, s.field("rsync_runs"));
    }
}

/// The columns of a busy phase's table; `first` names the wall time of the work.
fn busy_columns(first: &str) -> [(&str, Unit, bool); 10] {
    [
        (first, Unit::Secs, true),
        ("writer CPU per 100,000", Unit::Secs, true),
        ("daemon CPU per 100,000", Unit::Secs, true),
        ("delivered to user space per 100,000", Unit::Count, true),
        ("dropped in the kernel per 100,000", Unit::Count, false),
        ("ring buffer bytes per record", Unit::Num, false),
        ("root change in replica", Unit::Secs, false),
        ("overflows", Unit::Count, false),
        ("rescans", Unit::Count, false),
        ("rsync runs", Unit::Count, false),
    ]
}

/// `ring_bytes` / `records` of the ebpf backend's `stopped` line: the ring buffer space a
/// record took on average.
fn ring_bytes_per_record(s: &Summary) -> Option<f64> {
    let line = s.backend.as_deref()?;
    let bytes = crate::comp::field(line, "ring_bytes")?;
    let records = crate::comp::field(line, "records")?;
    (records > 0.0).then(|| bytes / records)
}

/// The intro's sentence on figures scaled to [`PER`], when `n` differs from it.
fn scaled_note(n: usize, what: &str, figures: &str) -> String {
    if n == PER as usize {
        String::new()
    } else {
        format!(
            " Fewer {what} than 100,000 at this scale: {figures} (x{:.1}).",
            PER / n as f64
        )
    }
}

/// Notes a daemon that left no `stopped` line (killed, or crashed), or an ebpf daemon
/// without its backend line.
fn check_summary(ctx: &mut Ctx, what: &str, c: Comp, s: &Summary) {
    if s.daemon.is_none() {
        ctx.report.note(format!(
            "{what}: no `stopped` line from the daemon after SIGTERM",
        ));
    }
    let rescans = s
        .daemon
        .as_deref()
        .and_then(|l| crate::comp::field(l, "rescans"));
    if let Some(n) = rescans.filter(|n| *n > 0.0) {
        let unresolved = s
            .backend
            .as_deref()
            .and_then(|l| crate::comp::field(l, "unresolved"))
            .filter(|u| *u > 0.0)
            .map_or_else(String::new, |u| {
                format!(" ({u} paths the ebpf backend could not resolve)")
            });
        ctx.report
            .note(format!("{what}: {n} rescans of the root{unresolved}",));
    }
    if let Some(probes) = s.backend.as_deref().and_then(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("probes="))
            .map(|p| p.trim_matches('"').to_owned())
    }) {
        let note = format!(
            "kernel: the ebpf backend ran with its `{probes}` probe set (`--ebpf-probes auto`; the `ebpf backend stopped` line)"
        );
        if !ctx.report.notes.contains(&note) {
            ctx.report.note(note);
        }
    }
    if matches!(c, Comp::Ebpf | Comp::EbpfUnfiltered) && s.backend.is_none() {
        ctx.report
            .note(format!("{what}: no `ebpf backend stopped` line",));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_bytes_per_record_of_the_backend_line() {
        let backend =
            r#"INFO ebpf backend stopped probes="syscalls" records=4 ring_bytes=1000 unresolved=0"#;
        let line = |l: &str| Summary {
            daemon: Some("INFO stopped events=2 records=9 ring_bytes=9 rsync_runs=1".to_owned()),
            backend: Some(l.to_owned()),
        };
        // The backend's fields, not the daemon's.
        assert_eq!(ring_bytes_per_record(&line(backend)), Some(250.0));
        let none = backend.replace("records=4", "records=0");
        assert_eq!(ring_bytes_per_record(&line(&none)), None);
        // fanotify: no backend line.
        assert_eq!(ring_bytes_per_record(&Summary::default()), None);
    }

    #[test]
    fn read_write_rewrites_in_place() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let files: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("f{i}"))).collect();
        for f in &files {
            fs::write(f, vec![b'x'; RW_SIZE + 10])?;
        }
        let (w, half) = read_write(&files, 16, |p| Ok(p.threads))?;
        assert_eq!((w.count, half), (16, 2));
        // 2 threads of 8 operations, every 4th writes: files 0 and 1 (thread 0), 2 and
        // 0 (thread 1), at offset 0; nothing is truncated, nothing is created.
        for f in &files {
            let b = fs::read(f)?;
            assert_eq!(b.len(), RW_SIZE + 10);
            assert_eq!(&b[..RW_SIZE], &[b'w'; RW_SIZE]);
            assert_eq!(&b[RW_SIZE..], &[b'x'; 10]);
        }
        assert_eq!(fs::read_dir(tmp.path())?.count(), files.len());
        Ok(())
    }

    #[test]
    fn scaled_only_off_100000() {
        assert_eq!(scaled_note(100_000, "files", "scaled"), "");
        assert_eq!(
            scaled_note(50_000, "operations", "the figures are scaled"),
            " Fewer operations than 100,000 at this scale: the figures are scaled (x2.0)."
        );
    }
}
