//! End-to-end tests of the service mode, `watcher run --config FILE`: crashes (`kill -9`)
//! and restarts with the journal, an rsync daemon outage next to a healthy target, the
//! periodic verify pass, `watcher status` and the metrics endpoint, reload on SIGHUP, and
//! `watcher config check`.
//!
//! They reuse the end-to-end suite's fixtures (`tests/e2e/`): scratch directories, the
//! exact tree comparison, the seeded churn and the rsync daemon. Every test changes a
//! real source tree under a real fanotify mark and waits until each replica equals the
//! source exactly, so a lost change fails it.
//!
//! They need root (filesystem-wide fanotify marks). Run with
//! `cargo test -p watcher-user --test service -- --test-threads=1`. As in the end-to-end
//! suite, `WATCHER_E2E_BACKEND=fanotify|inotify` picks the backend (default: the daemon's
//! choice), `WATCHER_E2E_SEED=N` replays the churn of the outage test, and
//! `WATCHER_E2E_KEEP=1` keeps the trees of a failed test.

mod admin;
#[allow(dead_code)]
#[path = "../e2e/churn.rs"]
mod churn;
mod hardening;
#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;
mod hooks;
#[allow(dead_code)]
#[path = "../e2e/rsyncd.rs"]
mod rsyncd;
mod service;
#[allow(dead_code)]
#[path = "../e2e/tree.rs"]
mod tree;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use churn::{Churn, Pace};
use harness::{READY_TIMEOUT, Scratch, poll_until};
use service::{
    ConfigSpec, GroupSpec, Log, READY, Service, TargetSpec, run_watcher, write_config_text,
};
use tree::{assert_equal_now, skip_nothing, wait_converged};

/// How long a replica may take to catch up once the source stopped changing (includes
/// a full pass over the biggest tree here, and a retry backoff of up to 30 s).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Start-up of a daemon that has a whole large tree to sync first.
const BIG_READY_TIMEOUT: Duration = Duration::from_secs(180);
const UNCLEAN: &str = "previous run did not shut down cleanly";

// ---------------------------------------------------------------------------------------
// Helpers

fn mkdir_p(path: &Path) {
    std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", path.display()));
}

fn write(path: &Path, data: impl AsRef<[u8]>) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn set_mtime(path: &Path, secs: i64, nsec: i64) {
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::UTIME_OMIT,
        &TimeSpec::new(secs, nsec),
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap_or_else(|e| panic!("set mtime of {}: {e}", path.display()));
}

fn rename(from: &Path, to: &Path) {
    std::fs::rename(from, to)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", from.display(), to.display()));
}

/// Source root attributes a fresh replica root does not have, so the root itself must be
/// carried over.
fn mark_root(src: &Path) {
    chmod(src, 0o750);
    set_mtime(src, 1_500_000_000, 123_456_789);
}

/// Content of generated file `f` of directory `d`: a few bytes to a few KiB.
fn content(tag: &str, d: usize, f: usize) -> Vec<u8> {
    let line = format!("{tag} {d}/{f}\n");
    line.repeat((d * 7 + f * 13) % 97 + 1).into_bytes()
}

/// `dirs` directories of `files` files each under `root`; returns the file count.
fn populate(root: &Path, dirs: usize, files: usize, tag: &str) -> usize {
    for d in 0..dirs {
        let dir = root.join(format!("d{d:03}"));
        mkdir_p(&dir);
        for f in 0..files {
            write(&dir.join(format!("f{f:03}")), content(tag, d, f));
        }
    }
    dirs * files
}

/// Regular files below `root` (0 when it does not exist).
fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => n += 1,
                _ => {}
            }
        }
    }
    n
}

/// The `repaired=N` of each `verify pass done` line, in order.
fn verify_repairs(log: &Log) -> Vec<u64> {
    log.lines()
        .iter()
        .filter(|l| l.contains("verify pass done"))
        .map(|l| {
            let at = l
                .find("repaired=")
                .unwrap_or_else(|| panic!("`verify pass done` without repaired=: {l}"));
            l[at + "repaired=".len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or_else(|e| panic!("repaired= is not a number in {l:?}: {e}"))
        })
        .collect()
}

/// The log as records: a line with a timestamp and the lines after it that have none (a
/// message with rsync's stderr spans several lines, its fields come on the last one).
fn log_records(log: &Log) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in log.lines() {
        // `2026-01-02T03:04:05.678901Z  INFO ...`
        let stamped = line.len() > 20
            && line.as_bytes()[..4].iter().all(u8::is_ascii_digit)
            && line.as_bytes()[4] == b'-'
            && line.as_bytes()[10] == b'T';
        match out.last_mut() {
            Some(last) if !stamped => {
                last.push('\n');
                last.push_str(&line);
            }
            _ => out.push(line),
        }
    }
    out
}

/// Writes `dirs` x `files` new files under `root` from a thread, pausing `pace` after
/// each directory. Once `hold_at` files are written it waits for [`Burst::release`], so
/// the burst is certainly still under way at whatever the test does meanwhile.
struct Burst {
    written: Arc<AtomicUsize>,
    released: Arc<AtomicBool>,
    /// Set when the test fails: the thread stops early.
    abandoned: Arc<AtomicBool>,
    handle: Option<JoinHandle<usize>>,
}

impl Burst {
    fn spawn(root: PathBuf, dirs: usize, files: usize, pace: Duration, hold_at: usize) -> Burst {
        let written = Arc::new(AtomicUsize::new(0));
        let released = Arc::new(AtomicBool::new(false));
        let abandoned = Arc::new(AtomicBool::new(false));
        let (w, r, a) = (written.clone(), released.clone(), abandoned.clone());
        let handle = std::thread::Builder::new()
            .name("burst".into())
            .spawn(move || {
                mkdir_p(&root);
                let mut n = 0;
                for d in 0..dirs {
                    if a.load(Ordering::SeqCst) {
                        break;
                    }
                    let dir = root.join(format!("b{d:03}"));
                    mkdir_p(&dir);
                    for f in 0..files {
                        if n == hold_at {
                            let held = poll_until(
                                Duration::from_secs(120),
                                Duration::from_millis(5),
                                || r.load(Ordering::SeqCst),
                            );
                            assert!(held, "burst: not released within 120 s");
                        }
                        write(&dir.join(format!("f{f:03}")), content("burst", d, f));
                        n += 1;
                        w.store(n, Ordering::SeqCst);
                    }
                    std::thread::sleep(pace);
                }
                n
            })
            .expect("spawn burst thread");
        Burst {
            written,
            released,
            abandoned,
            handle: Some(handle),
        }
    }

    fn written(&self) -> usize {
        self.written.load(Ordering::SeqCst)
    }

    fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }

    fn join(mut self) -> usize {
        self.release();
        self.handle
            .take()
            .expect("joined once")
            .join()
            .expect("burst thread panicked")
    }
}

impl Drop for Burst {
    /// A failed test: stop the writer before the scratch directory goes away.
    fn drop(&mut self) {
        self.abandoned.store(true, Ordering::SeqCst);
        self.release();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A one-group configuration with a local target `local` at `scratch.dst`, written to
/// `watcher.toml` in the scratch directory.
fn one_group_config(s: &Scratch) -> (PathBuf, ConfigSpec) {
    let path = s.path().join("watcher.toml");
    let mut spec = ConfigSpec::in_dir(s.path());
    spec.groups.push(GroupSpec::new(
        "data",
        &s.src,
        vec![TargetSpec::local("local", &s.dst)],
    ));
    spec.write(&path);
    (path, spec)
}

// ---------------------------------------------------------------------------------------
// Crash and restart

const BURST_DIRS: usize = 200;
const BURST_FILES: usize = 100;

/// SIGKILL (daemon and its rsync runs) in the middle of a 20,000-file burst: the next
/// run must see that the last one crashed, resync, and end with an exact replica,
/// including what was written while no daemon ran.
#[test]
fn kill_9_mid_burst_then_restart_converges() {
    let Some(_timer) = harness::begin("kill_9_mid_burst_then_restart_converges") else {
        return;
    };
    let ctx = "kill_9_mid_burst_then_restart_converges";
    let s = Scratch::new("svc-kill9-burst");
    populate(&s.src.join("base"), 10, 20, "base");
    mark_root(&s.src);
    let (config, _) = one_group_config(&s);

    let mut d = Service::start_run(&config, READY_TIMEOUT);
    assert_equal_now(
        &s.src,
        &s.dst,
        &skip_nothing,
        &format!("{ctx}: after ready"),
    );
    let runs_at_ready = d.count("rsync finished");

    let total = BURST_DIRS * BURST_FILES;
    let burst = Burst::spawn(
        s.src.join("burst"),
        BURST_DIRS,
        BURST_FILES,
        Duration::from_millis(20),
        total * 6 / 10,
    );
    d.wait_for(
        "three rsync runs for the burst and 2,000 files written",
        Duration::from_secs(90),
        |log| log.count("rsync finished") >= runs_at_ready + 3 && burst.written() >= 2_000,
    );
    assert!(!burst.finished(), "{ctx}: the burst ended before the kill");
    let written_at_kill = burst.written();
    let on_replica = count_files(&s.dst.join("burst"));
    d.kill9();
    eprintln!(
        "{ctx}: killed after {} rsync runs for the burst, {written_at_kill} of {total} files \
         written, {on_replica} on the replica",
        d.count("rsync finished") - runs_at_ready
    );
    assert!(
        on_replica < total,
        "{ctx}: the replica already held the whole burst"
    );
    assert_eq!(burst.join(), total);

    // While no daemon runs: change what the first one had already replicated.
    std::fs::remove_dir_all(s.src.join("base/d000")).expect("rm -rf base/d000");
    rename(&s.src.join("base/d001"), &s.src.join("base/d001-moved"));
    write(&s.src.join("base/d002/f000"), "changed while down\n");
    chmod(&s.src.join("base/d002/f001"), 0o600);
    std::fs::remove_file(s.src.join("burst/b000/f000")).expect("rm");

    let mut d2 = Service::spawn_run(&config);
    d2.wait_for_line(READY, BIG_READY_TIMEOUT);
    let resumed = d2.count("resuming unsynced changes from the journal");
    eprintln!(
        "{ctx}: restarted daemon: unclean-shutdown line {}, journal-resume lines {resumed}",
        d2.count(UNCLEAN)
    );
    assert!(
        d2.log.contains(UNCLEAN),
        "{ctx}: the restarted daemon did not notice the crash (no {UNCLEAN:?} line)"
    );
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);

    // Live again after the recovery.
    write(&s.src.join("burst/b001/after-restart"), "live\n");
    std::fs::remove_dir_all(s.src.join("burst/b002")).expect("rm -rf");
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &format!("{ctx}: after restart"),
    );
    d2.stop();

    // A clean stop is recorded as such: the next start claims no crash.
    let d3 = Service::start_run(&config, BIG_READY_TIMEOUT);
    assert!(
        !d3.log.contains(UNCLEAN),
        "{ctx}: a start after a clean stop reported an unclean shutdown"
    );
    d3.stop();
    assert_equal_now(&s.src, &s.dst, &skip_nothing, &format!("{ctx}: at the end"));
}

/// SIGKILL while the initial full sync of a 30,000-file tree is copying: the restart
/// must finish the job exactly (partial files and rsync temporaries on the replica
/// included), with what changed during the initial sync and while down.
#[test]
fn kill_9_during_initial_sync_then_restart_converges() {
    let Some(_timer) = harness::begin("kill_9_during_initial_sync_then_restart_converges") else {
        return;
    };
    let ctx = "kill_9_during_initial_sync_then_restart_converges";
    let s = Scratch::new("svc-kill9-initial");
    let t = Instant::now();
    let total = populate(&s.src.join("tree"), 300, 100, "tree");
    mark_root(&s.src);
    eprintln!("{ctx}: {total} files written in {:?}", t.elapsed());
    let (config, _) = one_group_config(&s);

    let mut d = Service::spawn_run(&config);
    d.wait_for_line("initial sync started", READY_TIMEOUT);
    let replica_tree = s.dst.join("tree");
    d.wait_for(
        "the initial sync copying files",
        Duration::from_secs(60),
        |_| count_files(&replica_tree) >= 50,
    );
    // Changes while the initial sync runs (the marks are set before it starts).
    mkdir_p(&s.src.join("during"));
    write(
        &s.src.join("during/new"),
        "written during the initial sync\n",
    );
    write(
        &s.src.join("tree/d299/f099"),
        "changed during the initial sync\n",
    );
    std::fs::remove_file(s.src.join("tree/d000/f000")).expect("rm");
    d.kill9();
    let copied = count_files(&replica_tree);
    eprintln!("{ctx}: killed with {copied} of {total} files on the replica");
    assert!(
        !d.log.contains("initial sync done") && !d.log.contains(READY),
        "{ctx}: the initial sync had finished before the kill: the test hit no window"
    );

    // While down.
    rename(&s.src.join("tree/d001"), &s.src.join("tree/d001-moved"));
    write(&s.src.join("tree/d002/f000"), "changed while down\n");

    let mut d2 = Service::spawn_run(&config);
    d2.wait_for_line(READY, BIG_READY_TIMEOUT);
    assert!(
        d2.log.contains(UNCLEAN),
        "{ctx}: the restarted daemon did not notice the crash (no {UNCLEAN:?} line)"
    );
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);
    write(&s.src.join("during/after"), "after the restart\n");
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &format!("{ctx}: after restart"),
    );
    d2.stop();
}

// ---------------------------------------------------------------------------------------
// A target that goes away

const OUTAGE: Duration = Duration::from_secs(30);
const MAX_LOCAL_LAG: Duration = Duration::from_secs(5);

/// The longest a lag sample waits for its marker.
const LAG_CAP: Duration = Duration::from_secs(30);

/// Writes marker `i` and measures how long it takes to appear, with its content, on the
/// replica; `None` when it did not within [`LAG_CAP`].
fn marker_lag(src: &Path, dst: &Path, i: usize) -> Option<Duration> {
    let rel = format!("markers/m{i:03}");
    let body = format!("marker {i}\n");
    let start = Instant::now();
    write(&src.join(&rel), &body);
    let replica = dst.join(&rel);
    let arrived = poll_until(LAG_CAP, Duration::from_millis(5), || {
        std::fs::read(&replica).is_ok_and(|b| b == body.as_bytes())
    });
    arrived.then(|| start.elapsed())
}

fn show_lags(v: &[Option<Duration>]) -> String {
    v.iter()
        .map(|d| match d {
            Some(d) => format!("{:.0}ms", d.as_secs_f64() * 1000.0),
            None => format!(">{LAG_CAP:?}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Churn in a thread until [`BackgroundChurn::finish`]; stopped and joined on drop too,
/// so a failed test does not leave it writing into a removed directory.
struct BackgroundChurn {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Churn>>,
}

impl BackgroundChurn {
    fn start(mut churn: Churn) -> BackgroundChurn {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("churn".into())
            .spawn(move || {
                let start = Instant::now();
                while !flag.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(180) {
                    churn.run(40, Pace::Spread);
                    std::thread::sleep(Duration::from_millis(20));
                }
                churn
            })
            .expect("spawn churn thread");
        BackgroundChurn {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Churn {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .expect("churn thread panicked")
    }
}

impl Drop for BackgroundChurn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// An rsync daemon target is down for 30 s under churn: the local target of the same
/// group keeps its lag low meanwhile, the daemon retries with backoff, and once the rsync
/// daemon is back on the same port both replicas converge exactly.
#[test]
fn rsync_daemon_outage_does_not_hold_back_other_target() {
    let Some(_timer) = harness::begin("rsync_daemon_outage_does_not_hold_back_other_target") else {
        return;
    };
    let test = "rsync_daemon_outage_does_not_hold_back_other_target";
    let seed = harness::seed(test);
    let ctx = format!("{test}, seed {seed}");
    let s = Scratch::new("svc-outage");
    let remote = s.path().join("remote");
    let rsyncd_dir = s.path().join("rsyncd");
    mkdir_p(&remote);
    mkdir_p(&rsyncd_dir);
    let rsyncd = rsyncd::RsyncDaemon::start(&rsyncd_dir, &remote);
    let port = rsyncd.port;

    let mut churn = Churn::new(&s.src, seed);
    // The rsync daemon (no chroot) clips symlink targets that climb out of the module.
    churn.contained_links = true;
    churn.populate(150);
    mkdir_p(&s.src.join("markers"));
    mark_root(&s.src);

    let config = s.path().join("watcher.toml");
    let mut spec = ConfigSpec::in_dir(s.path());
    spec.groups.push(GroupSpec::new(
        "data",
        &s.src,
        vec![
            TargetSpec {
                name: "remote".into(),
                dest: rsyncd.url(),
                password_file: Some(rsyncd.password_file.clone()),
                post_sync: Vec::new(),
            },
            TargetSpec::local("local", &s.dst),
        ],
    ));
    spec.write(&config);

    let d = Service::start_run(&config, READY_TIMEOUT);
    assert_equal_now(
        &s.src,
        &s.dst,
        &skip_nothing,
        &format!("{ctx}: local after ready"),
    );
    assert_equal_now(
        &s.src,
        &remote,
        &skip_nothing,
        &format!("{ctx}: remote after ready"),
    );

    // Churn for a while with both targets up.
    let churner = BackgroundChurn::start(churn);
    let mut lags_up = Vec::new();
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        lags_up.push(marker_lag(&s.src, &s.dst, i));
    }

    // Outage: the rsync daemon and its connections die; nothing listens on the port.
    let url = rsyncd.url();
    let retry_warnings = |log: &Log| {
        log_records(log)
            .iter()
            .filter(|r| {
                r.contains(" WARN ") && r.contains("retry_in_ms=") && r.contains(url.as_str())
            })
            .count()
    };
    let warnings_before = retry_warnings(&d.log);
    drop(rsyncd);
    let down_at = Instant::now();
    eprintln!("{ctx}: rsync daemon on port {port} killed");
    let mut lags_down = Vec::new();
    let mut i = 100;
    while down_at.elapsed() < OUTAGE {
        lags_down.push(marker_lag(&s.src, &s.dst, i));
        i += 1;
        let pause = Duration::from_millis(2500).min(OUTAGE.saturating_sub(down_at.elapsed()));
        std::thread::sleep(pause);
    }
    let retries_during = retry_warnings(&d.log) - warnings_before;
    let back = rsyncd::RsyncDaemon::start_again(&rsyncd_dir, port);
    eprintln!(
        "{ctx}: rsync daemon back on port {port} after {:?}",
        down_at.elapsed()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let churn = churner.finish();
    eprintln!("{ctx}: churn: {} entries, {:?}", churn.len(), churn.stats);

    let summary = format!(
        "{test}: local target lag, both targets up: [{}]; rsync daemon down ({} samples): \
         [{}]; retry warnings during the outage: {retries_during}",
        show_lags(&lags_up),
        lags_down.len(),
        show_lags(&lags_down),
    );
    println!("{summary}");
    for (n, lag) in lags_down.iter().enumerate() {
        assert!(
            lag.is_some_and(|l| l < MAX_LOCAL_LAG),
            "{ctx}: local target lag sample {n} during the outage was {} (limit \
             {MAX_LOCAL_LAG:?}); all samples: [{}]",
            show_lags(&lags_down[n..=n]),
            show_lags(&lags_down)
        );
    }
    assert!(
        lags_down.len() >= 5,
        "{ctx}: only {} lag samples during the outage",
        lags_down.len()
    );
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &format!("{ctx}: local"),
    );
    wait_converged(
        &s.src,
        &remote,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &format!("{ctx}: remote, after the outage"),
    );
    d.stop();
    assert_equal_now(
        &s.src,
        &s.dst,
        &skip_nothing,
        &format!("{ctx}: local after stop"),
    );
    assert_equal_now(
        &s.src,
        &remote,
        &skip_nothing,
        &format!("{ctx}: remote after stop"),
    );
    assert!(
        retries_during > 0,
        "{ctx}: no warning with retry_in_ms for the rsync daemon target while it was down"
    );
    drop(back);
}

// ---------------------------------------------------------------------------------------
// Verify pass

/// Drift made on the replica behind the daemon's back (a deleted file, a stray file, a
/// changed mode) is found and repaired by the periodic verify pass, and counted.
#[test]
fn verify_pass_repairs_drift_on_target() {
    let Some(_timer) = harness::begin("verify_pass_repairs_drift_on_target") else {
        return;
    };
    let ctx = "verify_pass_repairs_drift_on_target";
    let s = Scratch::new("svc-verify");
    populate(&s.src, 5, 20, "verify");
    mark_root(&s.src);
    let config = s.path().join("watcher.toml");
    let mut spec = ConfigSpec::in_dir(s.path());
    let mut group = GroupSpec::new("data", &s.src, vec![TargetSpec::local("local", &s.dst)]);
    group.verify_interval = Some("2s".into());
    spec.groups.push(group);
    spec.write(&config);

    let mut d = Service::start_run(&config, READY_TIMEOUT);
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);

    // A pass that started after convergence has nothing to repair.
    let before = d.count("verify pass done");
    d.wait_for_count("verify pass done", before + 2, Duration::from_secs(30));
    let clean = *verify_repairs(&d.log).last().expect("a verify pass");
    assert_eq!(
        clean, 0,
        "{ctx}: a verify pass over a replica in step repaired {clean} paths"
    );

    // Drift on the replica.
    std::fs::remove_file(s.dst.join("d001/f005")).expect("delete a file on the replica");
    write(&s.dst.join("d002/stray"), "not in the source\n");
    chmod(&s.dst.join("d003/f007"), 0o600);
    assert!(
        !tree::compare(&s.src, &s.dst, &skip_nothing)
            .expect("walk")
            .is_empty(),
        "{ctx}: the drift made no difference"
    );
    let passes_before = verify_repairs(&d.log).len();
    d.wait_for(
        "a verify pass with repaired > 0 after the drift",
        Duration::from_secs(30),
        |log| verify_repairs(log)[passes_before..].iter().any(|n| *n > 0),
    );
    let repairs = verify_repairs(&d.log)[passes_before..].to_vec();
    eprintln!("{ctx}: repaired= of the passes after the drift: {repairs:?}");
    // Each repair is named, with what rsync changed.
    for (path, change) in [
        ("d001/f005", ">f"),
        ("d002/stray", "*deleting"),
        ("d003/f007", ".f...p"),
    ] {
        let named = log_records(&d.log).iter().any(|r| {
            r.contains("verify repaired")
                && r.contains(&format!("path={path}"))
                && r.contains(change)
        });
        assert!(
            named,
            "{ctx}: the verify pass did not name {path} ({change})\n{}",
            d.log.tail(30)
        );
    }
    wait_converged(
        &s.src,
        &s.dst,
        Duration::from_secs(30),
        &skip_nothing,
        &format!("{ctx}: after the drift"),
    );
    assert!(
        !s.dst.join("d002/stray").exists(),
        "{ctx}: stray file survived"
    );
    eprintln!(
        "{ctx}: {} rsync runs, {} verify passes",
        d.count("rsync finished"),
        d.count("verify pass done")
    );
    d.stop();
}

// ---------------------------------------------------------------------------------------
// Status and metrics

/// `watcher status` (human and JSON) names both groups and their targets, in step; the
/// metrics endpoint serves per-target gauges.
#[test]
fn status_socket_reports_groups_and_targets() {
    let Some(_timer) = harness::begin("status_socket_reports_groups_and_targets") else {
        return;
    };
    let ctx = "status_socket_reports_groups_and_targets";
    let s = Scratch::new("svc-status");
    let (src_b, dst_b) = (s.path().join("src-b"), s.path().join("dst-b"));
    mkdir_p(&src_b);
    populate(&s.src, 3, 10, "alpha");
    populate(&src_b, 2, 10, "beta");
    let port = service::free_port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let config = s.path().join("watcher.toml");
    let mut spec = ConfigSpec::in_dir(s.path());
    spec.metrics = Some(metrics);
    spec.groups.push(GroupSpec::new(
        "alpha",
        &s.src,
        vec![TargetSpec::local("alpha-mirror", &s.dst)],
    ));
    spec.groups.push(GroupSpec::new(
        "beta",
        &src_b,
        vec![TargetSpec::local("beta-mirror", &dst_b)],
    ));
    spec.write(&config);
    let socket = spec.status_socket.clone();

    let d = Service::start_run(&config, READY_TIMEOUT);
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);
    wait_converged(&src_b, &dst_b, CONVERGE_TIMEOUT, &skip_nothing, ctx);

    let status_json = |what: &str| -> serde_json::Value {
        let out = run_watcher(
            &[
                OsStr::new("status"),
                OsStr::new("--socket"),
                socket.as_os_str(),
                OsStr::new("--json"),
            ],
            Duration::from_secs(20),
        );
        assert!(
            out.status.success(),
            "{ctx}: watcher status --json ({what}) exited {}: {}",
            out.status,
            out.stderr
        );
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{ctx}: watcher status --json output is not JSON: {e}\n{}",
                out.stdout
            )
        })
    };
    let states = |v: &serde_json::Value| -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for g in v["groups"].as_array().into_iter().flatten() {
            for t in g["targets"].as_array().into_iter().flatten() {
                out.push((
                    g["name"].as_str().unwrap_or("").to_owned(),
                    t["name"].as_str().unwrap_or("").to_owned(),
                    t["state"].as_str().unwrap_or("").to_owned(),
                ));
            }
        }
        out
    };
    // The snapshot is refreshed every 200 ms: wait (bounded) until both targets are in step.
    let deadline = Instant::now() + Duration::from_secs(30);
    let json = loop {
        let v = status_json("waiting for in_step");
        let st = states(&v);
        if st.len() == 2 && st.iter().all(|(_, _, state)| state == "in_step") {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "{ctx}: targets not in_step within 30 s: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        states(&json),
        vec![
            ("alpha".into(), "alpha-mirror".into(), "in_step".into()),
            ("beta".into(), "beta-mirror".into(), "in_step".into()),
        ],
        "{ctx}: groups and targets in status --json"
    );
    assert_eq!(
        json["pid"].as_u64(),
        Some(u64::from(d.pid().as_raw() as u32)),
        "{ctx}: status pid"
    );

    let out = run_watcher(
        &[
            OsStr::new("status"),
            OsStr::new("--socket"),
            socket.as_os_str(),
        ],
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{ctx}: watcher status exited {}: {}",
        out.status,
        out.stderr
    );
    println!("{ctx}: `watcher status` output:\n{}", out.stdout);
    for needle in [
        format!("alpha: {}", s.src.display()),
        format!("beta: {}", src_b.display()),
        "alpha-mirror".into(),
        "beta-mirror".into(),
        s.dst.display().to_string(),
        dst_b.display().to_string(),
        "in step".into(),
        "STATE".into(),
    ] {
        assert!(
            out.stdout.contains(&needle),
            "{ctx}: status output lacks {needle:?}:\n{}",
            out.stdout
        );
    }
    let in_step_rows = out
        .stdout
        .lines()
        .filter(|l| l.contains("-mirror") && l.contains("in step"))
        .count();
    assert_eq!(
        in_step_rows, 2,
        "{ctx}: expected two target rows `in step`:\n{}",
        out.stdout
    );

    let response = service::http_get_metrics(metrics);
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "{ctx}: metrics response: {response}"
    );
    for needle in [
        "watcher_dirty_paths{group=",
        "watcher_dirty_paths{group=\"alpha\",target=\"alpha-mirror\"} 0",
        "watcher_dirty_paths{group=\"beta\",target=\"beta-mirror\"} 0",
        "watcher_target_state{group=\"alpha\",target=\"alpha-mirror\",state=\"in_step\"} 1",
    ] {
        assert!(
            response.contains(needle),
            "{ctx}: metrics lack {needle:?}:\n{response}"
        );
    }
    // Still live, and the status follows.
    write(&s.src.join("late"), "late\n");
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);
    d.stop();
    assert!(
        !socket.exists(),
        "{ctx}: status socket {} left behind after a clean stop",
        socket.display()
    );
}

/// The value of the sample `line_start` (a metric name with its labels, exactly) in a scrape.
fn metric_value(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' '))
        .map(|v| {
            if v == "+Inf" {
                f64::INFINITY
            } else {
                v.parse()
                    .unwrap_or_else(|e| panic!("{line_start}: bad value {v:?}: {e}"))
            }
        })
}

/// The metrics endpoint as a Prometheus server sees it: scraped over HTTP with many idle
/// clients connected, every family present with its TYPE, the histogram complete, counters
/// named `_total`, no rates, and the process families.
#[test]
fn metrics_follow_prometheus_conventions() {
    let Some(_timer) = harness::begin("metrics_follow_prometheus_conventions") else {
        return;
    };
    let ctx = "metrics_follow_prometheus_conventions";
    let s = Scratch::new("svc-metrics");
    populate(&s.src, 3, 10, "metrics");
    let port = service::free_port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let config = s.path().join("watcher.toml");
    let mut spec = ConfigSpec::in_dir(s.path());
    spec.metrics = Some(metrics);
    spec.groups.push(GroupSpec::new(
        "data",
        &s.src,
        vec![TargetSpec::local("local", &s.dst)],
    ));
    spec.write(&config);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();

    let mut d = Service::start_run(&config, READY_TIMEOUT);
    let runs_at_ready = d.count("rsync finished");
    write(&s.src.join("d000/after-ready"), "x".repeat(100_000));
    d.wait_for("an rsync run after ready", CONVERGE_TIMEOUT, |log| {
        log.count("rsync finished") > runs_at_ready
    });
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);
    // The snapshot behind the endpoint is refreshed every 200 ms.
    std::thread::sleep(Duration::from_millis(500));

    // Any local user can hold connections open without sending anything.
    let idle: Vec<std::net::TcpStream> = (0..200)
        .map(|i| {
            std::net::TcpStream::connect(metrics)
                .unwrap_or_else(|e| panic!("{ctx}: idle connection {i}: {e}"))
        })
        .collect();
    let response = service::http_get_metrics(metrics);
    drop(idle);
    let (head, text) = response.split_once("\r\n\r\n").unwrap_or_else(|| {
        panic!("{ctx}: not an HTTP response behind 200 idle clients: {response:?}")
    });
    assert!(head.starts_with("HTTP/1.1 200"), "{ctx}: {head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{ctx}: {head}"
    );
    eprintln!("{ctx}: scrape:\n{text}");

    let types: std::collections::BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
        .collect();
    let want = [
        ("watcher_build_info", "gauge"),
        ("watcher_backend_info", "gauge"),
        ("watcher_events_total", "counter"),
        ("watcher_backend_events_total", "counter"),
        ("watcher_overflows_total", "counter"),
        ("watcher_rescans_total", "counter"),
        ("watcher_target_state", "gauge"),
        ("watcher_dirty_paths", "gauge"),
        ("watcher_in_flight_paths", "gauge"),
        ("watcher_oldest_unsynced_seconds", "gauge"),
        ("watcher_rsync_runs_total", "counter"),
        ("watcher_sync_retries_total", "counter"),
        ("watcher_sync_failures_consecutive", "gauge"),
        ("watcher_last_success_timestamp_seconds", "gauge"),
        ("watcher_rsync_sent_bytes_total", "counter"),
        ("watcher_rsync_received_bytes_total", "counter"),
        ("watcher_rsync_literal_data_bytes_total", "counter"),
        ("watcher_rsync_failures_total", "counter"),
        ("watcher_rsync_run_duration_seconds", "histogram"),
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ];
    for (name, kind) in want {
        assert_eq!(
            types.get(name).copied(),
            Some(kind),
            "{ctx}: family {name} (TYPE {kind})"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{ctx}: no HELP for {name}"
        );
    }
    for (name, kind) in &types {
        assert!(
            *kind != "counter" || name.ends_with("_total"),
            "{ctx}: counter {name} does not end in _total"
        );
        assert!(
            !name.contains("per_second") && !name.contains("rate"),
            "{ctx}: {name} exports a rate"
        );
    }
    for gone in [
        "watcher_target_up",
        "watcher_events_per_second",
        "watcher_info{",
    ] {
        assert!(!text.contains(gone), "{ctx}: {gone} is still exported");
    }

    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        metric_value(
            text,
            &format!("watcher_build_info{{version=\"{version}\"}}")
        ),
        Some(1.0),
        "{ctx}: build info"
    );
    let target = "group=\"data\",target=\"local\"";
    assert_eq!(
        metric_value(
            text,
            &format!("watcher_target_state{{{target},state=\"in_step\"}}")
        ),
        Some(1.0),
        "{ctx}: state"
    );
    let states: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("watcher_target_state{") && l.ends_with(" 1"))
        .collect();
    assert_eq!(states.len(), 1, "{ctx}: one state at a time: {states:?}");

    // The histogram: ascending `le` buckets ending with +Inf, cumulative, +Inf == _count.
    let hist = "watcher_rsync_run_duration_seconds";
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{hist}_bucket{{{target},le=\"")))
        .map(|rest| {
            let (le, value) = rest.split_once("\"} ").expect("bucket line");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le")
            };
            (le, value.parse().expect("count"))
        })
        .collect();
    assert!(buckets.len() >= 2, "{ctx}: buckets {buckets:?}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{ctx}: buckets not ascending and cumulative: {buckets:?}"
    );
    let count = metric_value(text, &format!("{hist}_count{{{target}}}")).expect("_count");
    let sum = metric_value(text, &format!("{hist}_sum{{{target}}}")).expect("_sum");
    assert_eq!(
        buckets.last().copied(),
        Some((f64::INFINITY, count)),
        "{ctx}"
    );
    let runs = metric_value(text, &format!("watcher_rsync_runs_total{{{target}}}")).expect("runs");
    assert!(
        count >= 2.0 && count == runs,
        "{ctx}: {count} observations, {runs} runs"
    );
    assert!(sum > 0.0, "{ctx}: _sum {sum}");

    let sent = metric_value(text, &format!("watcher_rsync_sent_bytes_total{{{target}}}"))
        .expect("sent bytes");
    let literal = metric_value(
        text,
        &format!("watcher_rsync_literal_data_bytes_total{{{target}}}"),
    )
    .expect("literal bytes");
    assert!(
        literal >= 100_000.0 && sent >= literal,
        "{ctx}: 100,000 bytes written, sent {sent}, literal {literal}"
    );
    for class in ["transient", "fatal", "source_race"] {
        assert_eq!(
            metric_value(
                text,
                &format!("watcher_rsync_failures_total{{{target},class=\"{class}\"}}")
            ),
            Some(0.0),
            "{ctx}: failures of class {class}"
        );
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let last = metric_value(
        text,
        &format!("watcher_last_success_timestamp_seconds{{{target}}}"),
    )
    .expect("last success");
    assert!(
        last >= started - 1.0 && last <= now + 1.0,
        "{ctx}: last success {last}, test ran {started}..{now}"
    );
    let start = metric_value(text, "process_start_time_seconds").expect("start time");
    assert!(
        start >= started - 2.0 && start <= now + 1.0,
        "{ctx}: process start {start}, test ran {started}..{now}"
    );
    assert!(metric_value(text, "process_open_fds").is_some_and(|n| n >= 3.0));
    assert!(metric_value(text, "process_resident_memory_bytes").is_some_and(|n| n > 0.0));
    d.stop();
}

// ---------------------------------------------------------------------------------------
// Reload

/// How soon a SIGHUP must take effect (in-flight rsync runs are short here).
const RELOAD_LIMIT: Duration = Duration::from_secs(10);
/// How long the writer keeps going while waiting for the reload.
const RELOAD_GIVE_UP: Duration = Duration::from_secs(30);

/// A second target added on SIGHUP gets its initial sync, the first target loses
/// nothing, and changes made while the reload happens reach both.
#[test]
fn sighup_reload_adds_a_target_without_losing_changes() {
    let Some(_timer) = harness::begin("sighup_reload_adds_a_target_without_losing_changes") else {
        return;
    };
    let ctx = "sighup_reload_adds_a_target_without_losing_changes";
    let s = Scratch::new("svc-sighup");
    populate(&s.src.join("base"), 5, 20, "base");
    mark_root(&s.src);
    let (config, mut spec) = one_group_config(&s);
    let dst2 = s.path().join("dst2");

    let mut d = Service::start_run(&config, READY_TIMEOUT);
    write(&s.src.join("base/d000/new"), "after ready\n");
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);

    // A writer creates, rewrites and deletes files all through the reload.
    let live = s.src.join("live");
    mkdir_p(&live);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, count, live) = (stop.clone(), count.clone(), live.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(60) {
                write(&live.join(format!("f{i:05}")), format!("file {i}\n"));
                if i % 5 == 4 {
                    write(
                        &live.join(format!("f{:05}", i - 3)),
                        format!("rewritten {i}\n"),
                    );
                }
                if i % 7 == 6 {
                    std::fs::remove_file(live.join(format!("f{:05}", i - 6))).expect("rm");
                }
                i += 1;
                count.store(i, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let wait_written = |n: usize| {
        assert!(
            poll_until(Duration::from_secs(30), Duration::from_millis(5), || {
                count.load(Ordering::SeqCst) >= n
            }),
            "{ctx}: the writer stalled"
        );
    };
    wait_written(100);

    spec.groups[0]
        .targets
        .push(TargetSpec::local("second", &dst2));
    spec.write(&config);
    write(&s.src.join("base/d001/just-before-hup"), "x\n");
    let at_hup = count.load(Ordering::SeqCst);
    let hup_at = Instant::now();
    d.signal(Signal::SIGHUP);
    write(&s.src.join("base/d001/just-after-hup"), "y\n");
    // The writer keeps going meanwhile. Should the reload not happen while it writes, stop
    // it (bounded), so the rest of the test still runs, and fail at the end.
    d.wait_for(
        "configuration reloaded, or 30 s of writes",
        Duration::from_secs(40),
        |log| log.contains("configuration reloaded") || hup_at.elapsed() >= RELOAD_GIVE_UP,
    );
    let reload_latency = d
        .log
        .contains("configuration reloaded")
        .then(|| hup_at.elapsed());
    if reload_latency.is_some() {
        write(&s.src.join("base/d001/after-reload"), "z\n");
        wait_written(count.load(Ordering::SeqCst) + 100);
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer thread panicked");
    let written = count.load(Ordering::SeqCst);
    if reload_latency.is_none() {
        d.wait_for_line("configuration reloaded", Duration::from_secs(30));
        write(&s.src.join("base/d001/after-reload"), "z\n");
    }
    std::fs::remove_dir_all(s.src.join("base/d002")).expect("rm -rf");
    let latency = match reload_latency {
        Some(l) => format!("{l:.1?}"),
        None => format!("over {RELOAD_GIVE_UP:?}"),
    };
    eprintln!(
        "{ctx}: writer made {written} files, {at_hup} before SIGHUP; reload took {latency} \
         while the writer ran"
    );

    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &format!("{ctx}: first target"),
    );
    wait_converged(
        &s.src,
        &dst2,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &format!("{ctx}: added target"),
    );
    assert_eq!(d.count("configuration reloaded"), 1);
    assert!(
        reload_latency.is_some_and(|l| l <= RELOAD_LIMIT),
        "{ctx}: SIGHUP was applied {latency} after the signal (limit {RELOAD_LIMIT:?}) while a \
         writer created a file every few ms: the daemon logs \"reloading once in-flight syncs \
         finish\" but waits until no target has anything dirty or in flight, which a steady \
         stream of changes postpones indefinitely"
    );
    d.stop();
}

/// `watcher status --socket SOCKET --json`, parsed.
fn status_json(socket: &Path, ctx: &str) -> serde_json::Value {
    let out = run_watcher(
        &[
            OsStr::new("status"),
            OsStr::new("--socket"),
            socket.as_os_str(),
            OsStr::new("--json"),
        ],
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{ctx}: watcher status --json exited {}: {}",
        out.status,
        out.stderr
    );
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{ctx}: status --json is not JSON: {e}\n{}", out.stdout))
}

/// The status of target `target` of group `group` in a `status --json` snapshot.
fn target_json<'a>(
    v: &'a serde_json::Value,
    group: &str,
    target: &str,
) -> Option<&'a serde_json::Value> {
    v["groups"]
        .as_array()?
        .iter()
        .filter(|g| g["name"] == group)
        .flat_map(|g| g["targets"].as_array().into_iter().flatten())
        .find(|t| t["name"] == target)
}

fn counter(v: &serde_json::Value, ctx: &str, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{ctx}: {what} is not a count: {v}"))
}

/// The event counters and each target's runs, retries and last sync are the daemon's, not
/// one configuration's: a SIGHUP keeps them. Events outside the roots (on the same
/// filesystem) count as read by the backend, never as events under the roots.
#[test]
fn counters_survive_a_reload_and_count_only_events_under_the_roots() {
    let Some(_timer) =
        harness::begin("counters_survive_a_reload_and_count_only_events_under_the_roots")
    else {
        return;
    };
    let ctx = "counters_survive_a_reload_and_count_only_events_under_the_roots";
    let s = Scratch::new("svc-counters");
    populate(&s.src, 3, 10, "base");
    let (config, mut spec) = one_group_config(&s);
    let socket = spec.status_socket.clone();
    let outside = s.path().join("outside");
    mkdir_p(&outside);

    let mut d = Service::start_run(&config, READY_TIMEOUT);
    let runs_at_ready = d.count("rsync finished");
    for i in 0..40 {
        write(&s.src.join(format!("d000/new{i:02}")), format!("new {i}\n"));
    }
    d.wait_for("an rsync run for the new files", CONVERGE_TIMEOUT, |log| {
        log.count("rsync finished") > runs_at_ready
    });
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);
    let mut before = serde_json::Value::Null;
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            before = status_json(&socket, ctx);
            target_json(&before, "data", "local").is_some_and(|t| t["state"] == "in_step")
        }),
        "{ctx}: not in step within 30 s: {before}"
    );
    let events = counter(&before["events_total"], ctx, "events_total");
    assert!(
        events >= 40,
        "{ctx}: 40 files written under the root, events_total {events}"
    );
    let local = target_json(&before, "data", "local").expect("target local");
    let runs = counter(&local["rsync_runs"], ctx, "rsync_runs");
    let last_sync = local["last_sync"]["finished_unix_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("{ctx}: no last sync after a sync: {local}"));
    assert!(runs >= 2, "{ctx}: rsync_runs {runs}");

    // Changes beside the root, on its filesystem: read by a filesystem-wide backend, but not
    // events under the roots.
    let read_before = counter(&before["backend_events_total"], ctx, "backend_events_total");
    for i in 0..300 {
        write(&outside.join(format!("f{i:03}")), "outside\n");
    }
    if before["backend"] != "inotify" {
        let mut now = serde_json::Value::Null;
        assert!(
            poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
                now = status_json(&socket, ctx);
                now["backend_events_total"]
                    .as_u64()
                    .is_some_and(|n| n >= read_before + 300)
            }),
            "{ctx}: backend {} did not count 300 changes beside the root: {} before, now {}",
            before["backend"],
            read_before,
            now["backend_events_total"]
        );
    }
    let beside = status_json(&socket, ctx);
    assert_eq!(
        counter(&beside["events_total"], ctx, "events_total"),
        events,
        "{ctx}: changes outside the root counted as events under the roots"
    );

    // Reload with a second target; wait until the new configuration's snapshot shows it.
    spec.groups[0]
        .targets
        .push(TargetSpec::local("second", &s.path().join("dst2")));
    spec.write(&config);
    d.signal(Signal::SIGHUP);
    d.wait_for_line("configuration reloaded", RELOAD_LIMIT);
    let mut after = serde_json::Value::Null;
    assert!(
        poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
            after = status_json(&socket, ctx);
            target_json(&after, "data", "second").is_some()
        }),
        "{ctx}: the reloaded configuration's target is not in the status: {after}"
    );
    let after_events = counter(&after["events_total"], ctx, "events_total");
    assert!(
        after_events >= events,
        "{ctx}: events_total went from {events} to {after_events} over a reload"
    );
    let after_read = counter(&after["backend_events_total"], ctx, "backend_events_total");
    let read_then = counter(&beside["backend_events_total"], ctx, "backend_events_total");
    assert!(
        after_read >= read_then,
        "{ctx}: backend_events_total went from {read_then} to {after_read} over a reload"
    );
    let local = target_json(&after, "data", "local").expect("target local");
    let after_runs = counter(&local["rsync_runs"], ctx, "rsync_runs");
    assert!(
        after_runs >= runs,
        "{ctx}: rsync_runs of target local went from {runs} to {after_runs} over a reload"
    );
    assert!(
        local["last_sync"]["finished_unix_ms"]
            .as_u64()
            .is_some_and(|t| t >= last_sync),
        "{ctx}: the last sync of target local was lost over a reload: {local}"
    );
    wait_converged(
        &s.src,
        &s.path().join("dst2"),
        CONVERGE_TIMEOUT,
        &skip_nothing,
        ctx,
    );
    d.stop();
}

/// `watcher status --config FILE --wait-in-step` returns once the changes made before it
/// are on the replica (exit 0); with a target that cannot be reached it gives up at
/// `--timeout` (exit 3) and names that target.
#[test]
fn status_wait_in_step_waits_for_every_target() {
    let Some(_timer) = harness::begin("status_wait_in_step_waits_for_every_target") else {
        return;
    };
    let ctx = "status_wait_in_step_waits_for_every_target";
    let s = Scratch::new("svc-wait");
    populate(&s.src, 3, 10, "wait");
    let (config, mut spec) = one_group_config(&s);
    let socket = spec.status_socket.clone();
    let mut d = Service::start_run(&config, READY_TIMEOUT);

    // Written just before the call: the wait must cover them.
    let written = populate(&s.src.join("burst"), 20, 50, "burst");
    std::fs::remove_dir_all(s.src.join("d001")).expect("rm -rf d001");
    let t = Instant::now();
    let out = run_watcher(
        &[
            OsStr::new("status"),
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new("--wait-in-step"),
            OsStr::new("--timeout"),
            OsStr::new("60s"),
        ],
        Duration::from_secs(90),
    );
    eprintln!(
        "{ctx}: in step {:.1?} after {written} files were written: {}\n{}{}",
        t.elapsed(),
        out.status,
        out.stdout,
        out.stderr
    );
    assert_eq!(out.status.code(), Some(0), "{ctx}: {}", out.stderr);
    assert!(out.stdout.contains("in step"), "{ctx}: {}", out.stdout);
    assert_equal_now(
        &s.src,
        &s.dst,
        &skip_nothing,
        &format!("{ctx}: when --wait-in-step returned"),
    );

    // A target nobody listens for: never in step.
    let port = service::free_port();
    spec.groups[0].targets.push(TargetSpec {
        name: "unreachable".into(),
        dest: format!("rsync://127.0.0.1:{port}/data"),
        password_file: None,
        post_sync: Vec::new(),
    });
    spec.write(&config);
    d.signal(Signal::SIGHUP);
    d.wait_for_line("configuration reloaded", RELOAD_LIMIT);
    let t = Instant::now();
    let out = run_watcher(
        &[
            OsStr::new("status"),
            OsStr::new("--socket"),
            socket.as_os_str(),
            OsStr::new("--wait-in-step"),
            OsStr::new("--timeout"),
            OsStr::new("2s"),
        ],
        Duration::from_secs(30),
    );
    let waited = t.elapsed();
    eprintln!(
        "{ctx}: with an unreachable target, after {waited:.1?}: {}\n{}",
        out.status, out.stderr
    );
    assert_eq!(out.status.code(), Some(3), "{ctx}: {}", out.stderr);
    assert!(
        out.stderr.contains("not in step after 2s") && out.stderr.contains("data/unreachable"),
        "{ctx}: stderr does not name the target: {}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("data/local"),
        "{ctx}: the target in step is named: {}",
        out.stderr
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(15),
        "{ctx}: --timeout 2s took {waited:?}"
    );
    // The unreachable target still holds its initial sync: exit 1 says so.
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(harness::STOP_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{ctx}: exit after SIGTERM");
}

// ---------------------------------------------------------------------------------------
// Config check

/// `watcher config check` names the file, line and key of an unknown key, and of every bad
/// value in a group, and refuses a config file others may write (so does `watcher run`),
/// saying how to fix it.
#[test]
fn config_check_reports_file_line_and_key() {
    // Needs no fanotify and no root.
    let ctx = "config_check_reports_file_line_and_key";
    let s = Scratch::new("svc-config");
    let config = s.path().join("broken.toml");
    let good = s.path().join("good.toml");
    let spec = ConfigSpec::in_dir(s.path());
    let text = format!(
        "[daemon]\n\
         state_dir = {state}\n\
         status_socket = {socket}\n\
         \n\
         [[sync]]\n\
         name = \"data\"\n\
         source = {src}\n\
         delay_msec = 50\n\
         \n\
         [[sync.target]]\n\
         dest = {dst}\n",
        state = service::toml_str(&spec.state_dir.display().to_string()),
        socket = service::toml_str(&spec.status_socket.display().to_string()),
        src = service::toml_str(&s.src.display().to_string()),
        dst = service::toml_str(&s.dst.display().to_string()),
    );
    let bad_line = text
        .lines()
        .position(|l| l.starts_with("delay_msec"))
        .expect("the line")
        + 1;
    write_config_text(&config, &text);
    let out = run_watcher(
        &[
            OsStr::new("config"),
            OsStr::new("check"),
            OsStr::new("--config"),
            config.as_os_str(),
        ],
        Duration::from_secs(20),
    );
    eprintln!("{ctx}: broken config: {}\n{}", out.status, out.stderr);
    assert!(
        !out.status.success(),
        "{ctx}: config check accepted an unknown key:\n{}",
        out.stdout
    );
    let located = format!("{}:{bad_line}:", config.display());
    assert!(
        out.stderr.contains(&located),
        "{ctx}: stderr does not name {located:?}:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("delay_msec"),
        "{ctx}: stderr does not name the key delay_msec:\n{}",
        out.stderr
    );

    // The same file with the key fixed passes.
    write_config_text(&good, &text.replace("delay_msec", "delay_ms"));
    let out = run_watcher(
        &[
            OsStr::new("config"),
            OsStr::new("check"),
            OsStr::new("--config"),
            good.as_os_str(),
        ],
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{ctx}: config check refused a good config: {}",
        out.stderr
    );
    assert!(out.stdout.contains("ok"), "{ctx}: {}", out.stdout);

    // Several bad values in one group: each has its line, in file order.
    let several = s.path().join("several.toml");
    let bad = text.replace("delay_msec = 50", "delay_ms = -5\nmax_batch = 0");
    write_config_text(&several, &bad);
    let out = run_watcher(
        &[
            OsStr::new("config"),
            OsStr::new("check"),
            OsStr::new("--config"),
            several.as_os_str(),
        ],
        Duration::from_secs(20),
    );
    eprintln!("{ctx}: two bad values: {}\n{}", out.status, out.stderr);
    assert!(
        !out.status.success(),
        "{ctx}: config check accepted two bad values"
    );
    let delay = format!(
        "{}:{bad_line}: sync[0].delay_ms: expected a non-negative integer, got -5",
        several.display()
    );
    let batch = format!(
        "{}:{}: sync[0].max_batch: must be at least 1, got 0",
        several.display(),
        bad_line + 1
    );
    let at = |line: &str| out.stderr.find(line);
    assert!(
        matches!((at(&delay), at(&batch)), (Some(d), Some(b)) if d < b),
        "{ctx}: stderr does not name {delay:?} and then {batch:?}:\n{}",
        out.stderr
    );

    // World-writable: refused with a chmod hint, by `config check` and by `run`.
    chmod(&good, 0o666);
    for sub in [&["config", "check"][..], &["run"][..]] {
        let mut args: Vec<&OsStr> = sub.iter().map(OsStr::new).collect();
        args.push(OsStr::new("--config"));
        args.push(good.as_os_str());
        let out = run_watcher(&args, Duration::from_secs(20));
        eprintln!("{ctx}: mode 0666, {sub:?}: {}\n{}", out.status, out.stderr);
        assert!(
            !out.status.success(),
            "{ctx}: {sub:?} accepted a config file of mode 0666"
        );
        assert!(
            out.stderr
                .contains(&format!("chmod 600 {}", good.display())),
            "{ctx}: {sub:?}: no chmod hint for mode 0666:\n{}",
            out.stderr
        );
    }
}

/// `watcher sync` refuses the values the configuration file refuses, by the same rule:
/// the error names the option where the file's names its line and key.
#[test]
fn sync_options_are_checked_like_the_config_file() {
    // Needs no fanotify and no root: both are refused before anything starts.
    let ctx = "sync_options_are_checked_like_the_config_file";
    let s = Scratch::new("svc-sync-options");
    let config = s.path().join("same.toml");
    let cases: [(&[&str], &str, &str, &str, &str); 3] = [
        (
            &["--max-batch", "0"],
            "max_batch = 0",
            "--max-batch",
            "sync[0].max_batch",
            "must be at least 1, got 0",
        ),
        (
            &["--delay", "5000", "--max-delay", "100"],
            "delay_ms = 5000\nmax_delay_ms = 100",
            "--max-delay",
            "sync[0].max_delay_ms",
            "(100) is less than",
        ),
        (
            &["--exclude", "*.[ch"],
            "exclude = [\"*.[ch\"]",
            "--exclude",
            "sync[0].exclude[0]",
            "invalid exclude pattern \"*.[ch\"",
        ),
    ];
    for (options, keys, option, key, fragment) in cases {
        let mut args = vec![OsStr::new("sync"), s.src.as_os_str(), s.dst.as_os_str()];
        args.extend(options.iter().map(OsStr::new));
        let out = run_watcher(&args, Duration::from_secs(20));
        eprintln!("{ctx}: {options:?}: {}\n{}", out.status, out.stderr);
        assert!(!out.status.success(), "{ctx}: sync accepted {options:?}");
        assert!(
            out.stderr.contains(&format!("{option}: ")) && out.stderr.contains(fragment),
            "{ctx}: {options:?}: stderr does not name {option} with {fragment:?}:\n{}",
            out.stderr
        );

        let text = format!(
            "[[sync]]\nsource = {src}\n{keys}\n\n[[sync.target]]\ndest = {dst}\n",
            src = service::toml_str(&s.src.display().to_string()),
            dst = service::toml_str(&s.dst.display().to_string()),
        );
        write_config_text(&config, &text);
        let out = run_watcher(
            &[
                OsStr::new("config"),
                OsStr::new("check"),
                OsStr::new("--config"),
                config.as_os_str(),
            ],
            Duration::from_secs(20),
        );
        eprintln!("{ctx}: {keys:?}: {}\n{}", out.status, out.stderr);
        assert!(
            !out.status.success(),
            "{ctx}: config check accepted {keys:?}"
        );
        let place = format!("{}:", config.display());
        assert!(
            out.stderr.contains(&place)
                && out.stderr.contains(&format!("{key}: "))
                && out.stderr.contains(fragment),
            "{ctx}: {keys:?}: stderr does not name {place}LINE: {key} with {fragment:?}:\n{}",
            out.stderr
        );
    }
}
