//! End-to-end tests of `watcher sync`: the real binary, a real fanotify mark, real rsync.
//!
//! Each test makes its own source and replica under the system temp dir, changes the
//! source while the daemon runs, and waits until the replica equals the source exactly
//! (paths, types, contents, permissions, owners, nanosecond mtimes of files,
//! directories including the root, and symlinks, symlink targets). See `tree.rs`.
//!
//! The `*_over_ssh` and `ssh_*` tests write the replica through a real OpenSSH server on
//! 127.0.0.1 that they start themselves (`sshd.rs`; `cargo xtask setup` installs it).
//!
//! They need root (filesystem-wide fanotify marks). Run with
//! `cargo test -p watcher-user --test e2e -- --test-threads=2`. Seeded tests print
//! their seed; `WATCHER_E2E_SEED=N` replays one.

mod churn;
mod filesystems;
mod hardlinks;
mod harness;
mod mounts;
mod operations;
mod renames;
mod rsyncd;
mod ssh_target;
mod sshd;
mod tree;
mod watch;

use std::ffi::{OsStr, OsString};
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use churn::{Churn, Pace};
use harness::{Daemon, QUEUE_LIMIT_LOCK, READY_TIMEOUT, Scratch, SysctlGuard, args};
use tree::{assert_equal_now, skip_nothing, wait_converged};

/// How long a replica may take to catch up after the source stopped changing.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(90);
/// Operations per churn.
const CHURN_OPS: usize = 2500;
/// Operations of the churn that includes hard links.
const HARD_LINK_CHURN_OPS: usize = 5000;

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

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn write(path: &Path, data: impl AsRef<[u8]>) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Rewrites `path` in place (same inode, so every name of it sees the new bytes).
fn write_in_place(path: &Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    std::io::Write::write_all(&mut f, data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn mkdir_p(path: &Path) {
    std::fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", path.display()));
}

fn rename(from: &Path, to: &Path) {
    std::fs::rename(from, to)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", from.display(), to.display()));
}

/// Gives the source root attributes the fresh replica root does not have, so the
/// initial sync must carry the root directory's own attributes over.
fn mark_root(src: &Path) {
    chmod(src, 0o750);
    set_mtime(src, 1_500_000_000, 123_456_789);
}

/// Random churn against a running daemon, then: converged, no feedback loop, still
/// converged, clean stop, and still converged after the stop.
fn churn_against(
    test: &str,
    scratch: &Scratch,
    dst: &OsStr,
    extra: &[OsString],
    contained_links: bool,
) {
    churn_with(
        test,
        scratch,
        dst,
        extra,
        contained_links,
        CHURN_OPS,
        false,
        None,
    );
}

/// [`churn_against`] with `ops` operations; `hard_links` adds hard-link operations to the
/// mix. When the daemon runs with `--hard-links`, the replica's links are compared too.
/// `nested` makes a directory inside the source (a btrfs subvolume, say) once the main
/// churn's tree is in place, unknown to it; that directory gets a churn of its own, a
/// fifth as long, after the main one.
#[allow(clippy::too_many_arguments)]
fn churn_with(
    test: &str,
    scratch: &Scratch,
    dst: &OsStr,
    extra: &[OsString],
    contained_links: bool,
    ops: usize,
    hard_links: bool,
    nested: Option<&dyn Fn(&Path) -> PathBuf>,
) {
    let seed = harness::seed(test);
    let ctx = format!("{test}, seed {seed}");
    let mut churn = Churn::new(&scratch.src, seed);
    churn.contained_links = contained_links;
    churn.hard_links = hard_links;
    let compare_links = extra.iter().any(|a| a == "--hard-links");
    churn.populate(150);
    let mut inner = nested.map(|make| {
        let dir = make(&scratch.src);
        let mut inner = Churn::new(&dir, seed ^ 0x5eed);
        inner.hard_links = hard_links;
        inner.populate(30);
        inner
    });
    mark_root(&scratch.src);

    let mut d = Daemon::start(&scratch.src, dst, extra);
    assert_equal_now(
        &scratch.src,
        &scratch.dst,
        &skip_nothing,
        &format!("{ctx}: replica right after `ready` (initial sync)"),
    );

    let t = Instant::now();
    churn.run(ops, Pace::Spread);
    if let Some(inner) = &mut inner {
        inner.run(ops / 5, Pace::Spread);
    }
    eprintln!(
        "{test}: {ops} operations in {:?}, {} entries now; {:?}",
        t.elapsed(),
        churn.len(),
        churn.stats
    );
    wait_converged(
        &scratch.src,
        &scratch.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &ctx,
    );
    if compare_links {
        tree::wait_converged_with_links(&scratch.src, &scratch.dst, CONVERGE_TIMEOUT, &ctx);
    }

    // No feedback loop: with the source unchanged, rsync runs must stop and stay stopped.
    // Convergence can be seen in the middle of a batch (a replayed rename put the data in
    // place before the batch's runs): what is left of that batch and one more batch for
    // changes already on the replica may still be due, at most four runs each (subtrees,
    // folded files, entries, the root's own attributes).
    let settling = d.wait_rsync_quiet(Duration::from_secs(2), Duration::from_secs(20));
    assert!(
        settling <= 8,
        "{ctx}: {settling} rsync runs after the replica had converged and the source was \
         left alone"
    );
    let runs = d.count("rsync finished");
    harness::poll_until(Duration::from_secs(2), Duration::from_millis(100), || {
        d.count("rsync finished") != runs
    });
    assert_eq!(
        d.count("rsync finished"),
        runs,
        "{ctx}: rsync ran again with no change in the source (feedback loop?)"
    );
    assert_equal_now(
        &scratch.src,
        &scratch.dst,
        &skip_nothing,
        &format!("{ctx}: after settling"),
    );

    d.stop();
    assert_equal_now(
        &scratch.src,
        &scratch.dst,
        &skip_nothing,
        &format!("{ctx}: after stop"),
    );
    if compare_links {
        let diff = tree::link_diff(&scratch.src, &scratch.dst).expect("walk the trees");
        assert!(
            diff.is_empty(),
            "{ctx}: hard links differ after stop:\n{}",
            tree::summarize(&diff, 40)
        );
    }
}

/// Known to fail now and then: after rsync -H hangs on a changing tree and the run is
/// killed, a later run can leave two names of one file unlinked on the replica (content
/// right, sharing lost). Run it with `cargo test --test e2e -- --ignored churn_with_hard`.
#[test]
#[ignore = "intermittent: two names can end unlinked after a stuck -H run was killed"]
fn churn_with_hard_links_local_target() {
    let Some(_timer) = harness::begin("churn_with_hard_links_local_target") else {
        return;
    };
    let s = Scratch::new("churn-hardlinks");
    churn_with(
        "churn_with_hard_links_local_target",
        &s,
        s.dst.as_os_str(),
        &args(&["--hard-links"]),
        false,
        HARD_LINK_CHURN_OPS,
        true,
        None,
    );
}

/// Without `--hard-links` every name still gets every change (the replica holds copies).
#[test]
fn churn_with_hard_links_no_dash_h() {
    let Some(_timer) = harness::begin("churn_with_hard_links_no_dash_h") else {
        return;
    };
    let s = Scratch::new("churn-hardlinks-copies");
    churn_with(
        "churn_with_hard_links_no_dash_h",
        &s,
        s.dst.as_os_str(),
        &[],
        false,
        HARD_LINK_CHURN_OPS,
        true,
        None,
    );
}

#[test]
fn churn_local_target() {
    let Some(_timer) = harness::begin("churn_local_target") else {
        return;
    };
    let s = Scratch::new("churn-local");
    churn_against("churn_local_target", &s, s.dst.as_os_str(), &[], false);
}

#[test]
fn churn_rsync_daemon_target() {
    let Some(_timer) = harness::begin("churn_rsync_daemon_target") else {
        return;
    };
    let s = Scratch::new("churn-rsyncd");
    let rsyncd = rsyncd::RsyncDaemon::start(s.path(), &s.dst);
    let url = rsyncd.url();
    let extra = vec![OsString::from(format!(
        "--rsync-arg=--password-file={}",
        rsyncd.password_file.display()
    ))];
    // The daemon (no chroot) clips symlink targets that climb out of the module.
    churn_against(
        "churn_rsync_daemon_target",
        &s,
        OsStr::new(&url),
        &extra,
        true,
    );
    rsyncd.stop();
}

/// Where a test's replica is written: its `dst` directory itself, or the same directory
/// over ssh, through a real sshd on 127.0.0.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Local,
    Ssh,
}

/// The target argument and extra arguments for a test's daemon; holds the sshd.
struct Dest {
    spec: OsString,
    args: Vec<OsString>,
    sshd: Option<sshd::Sshd>,
}

impl Dest {
    fn new(via: Via, s: &Scratch) -> Dest {
        match via {
            Via::Local => Dest {
                spec: s.dst.clone().into_os_string(),
                args: Vec::new(),
                sshd: None,
            },
            Via::Ssh => {
                let server = sshd::Sshd::start(&s.path().join("sshd"));
                Dest {
                    spec: server.dest(&s.dst).into(),
                    args: vec![server.rsh_arg().into()],
                    sshd: Some(server),
                }
            }
        }
    }

    /// The daemon's arguments with `extra` after this destination's own.
    fn args(&self, extra: &[OsString]) -> Vec<OsString> {
        let mut all = self.args.clone();
        all.extend(extra.iter().cloned());
        all
    }

    /// Over ssh: every run rode the one connection the start-up check made.
    fn assert_one_connection(&self, ctx: &str) {
        if let Some(server) = &self.sshd {
            assert_eq!(
                server.accepted(),
                1,
                "{ctx}: sshd accepted more than one authentication (runs did not share the \
                 connection)"
            );
        }
    }
}

/// The name of a test's variant, for its scratch directory and messages.
fn named(test: &str, via: Via) -> String {
    match via {
        Via::Local => test.to_owned(),
        Via::Ssh => format!("{test}_over_ssh"),
    }
}

#[test]
fn churn_ssh_target() {
    let Some(_timer) = harness::begin("churn_ssh_target") else {
        return;
    };
    if !sshd::available_or_skip("churn_ssh_target") {
        return;
    }
    let s = Scratch::new("churn-ssh");
    let dest = Dest::new(Via::Ssh, &s);
    churn_against("churn_ssh_target", &s, &dest.spec, &dest.args, false);
    dest.assert_one_connection("churn_ssh_target");
}

/// A big tree (`dirs` x `files`) changed by simple, cheap operations: the churn model
/// is meant for small trees.
struct BigTree {
    root: PathBuf,
    rng: StdRng,
    seed: u64,
    /// Directory name -> file names in it.
    dirs: Vec<(String, Vec<String>)>,
    counter: u64,
}

impl BigTree {
    fn create(root: &Path, dirs: usize, files: usize, seed: u64) -> BigTree {
        let mut t = BigTree {
            root: root.to_path_buf(),
            rng: StdRng::seed_from_u64(seed),
            seed,
            dirs: Vec::new(),
            counter: 0,
        };
        for d in 0..dirs {
            let dname = format!("dir{d:03}");
            let dir = root.join(&dname);
            mkdir_p(&dir);
            let mut names = Vec::with_capacity(files);
            for f in 0..files {
                let fname = format!("file{f:03}");
                write(&dir.join(&fname), format!("{dname}/{fname}\n"));
                names.push(fname);
            }
            t.dirs.push((dname, names));
        }
        t
    }

    fn path(&self, d: usize, f: usize) -> PathBuf {
        self.root.join(&self.dirs[d].0).join(&self.dirs[d].1[f])
    }

    fn check<T>(&self, r: std::io::Result<T>, what: &str) -> T {
        r.unwrap_or_else(|e| panic!("big tree (seed {}): {what}: {e}", self.seed))
    }

    /// `n` random changes: overwrite, create, delete, move between directories, chmod,
    /// set mtime, now and then a directory rename or a new directory.
    fn mutate(&mut self, n: usize) {
        for _ in 0..n {
            self.counter += 1;
            let c = self.counter;
            let d = self.rng.random_range(0..self.dirs.len());
            let op = if self.dirs[d].1.is_empty() {
                8
            } else {
                self.rng.random_range(0..40)
            };
            match op {
                0..8 => {
                    let f = self.rng.random_range(0..self.dirs[d].1.len());
                    let p = self.path(d, f);
                    let r =
                        std::fs::write(&p, format!("overwritten {c}\n").repeat(c as usize % 7 + 1));
                    self.check(r, "overwrite");
                }
                8..16 => {
                    let name = format!("new{c}");
                    let p = self.root.join(&self.dirs[d].0).join(&name);
                    self.check(std::fs::write(&p, format!("new {c}\n")), "create");
                    self.dirs[d].1.push(name);
                }
                16..22 => {
                    let f = self.rng.random_range(0..self.dirs[d].1.len());
                    let p = self.path(d, f);
                    self.check(std::fs::remove_file(&p), "delete");
                    self.dirs[d].1.swap_remove(f);
                }
                22..28 => {
                    let f = self.rng.random_range(0..self.dirs[d].1.len());
                    let to_d = self.rng.random_range(0..self.dirs.len());
                    let name = format!("moved{c}");
                    let from = self.path(d, f);
                    let to = self.root.join(&self.dirs[to_d].0).join(&name);
                    self.check(std::fs::rename(&from, &to), "move");
                    self.dirs[d].1.swap_remove(f);
                    self.dirs[to_d].1.push(name);
                }
                28..32 => {
                    let f = self.rng.random_range(0..self.dirs[d].1.len());
                    let mode = [0o600, 0o640, 0o755, 0o444][self.rng.random_range(0..4)];
                    let r = std::fs::set_permissions(
                        self.path(d, f),
                        std::fs::Permissions::from_mode(mode),
                    );
                    self.check(r, "chmod");
                }
                32..36 => {
                    let f = self.rng.random_range(0..self.dirs[d].1.len());
                    let secs = self.rng.random_range(1_000_000_000..2_000_000_000);
                    let nsec = self.rng.random_range(0..1_000_000_000);
                    set_mtime(&self.path(d, f), secs, nsec);
                }
                36..38 => {
                    let name = format!("{}-renamed{c}", self.dirs[d].0);
                    let from = self.root.join(&self.dirs[d].0);
                    let to = self.root.join(&name);
                    self.check(std::fs::rename(&from, &to), "rename dir");
                    self.dirs[d].0 = name;
                }
                _ => {
                    let name = format!("newdir{c}");
                    let dir = self.root.join(&name);
                    self.check(std::fs::create_dir(&dir), "mkdir");
                    let mut files = Vec::new();
                    for i in 0..5 {
                        let f = format!("f{i}");
                        self.check(
                            std::fs::write(dir.join(&f), format!("{name}/{f}\n")),
                            "create",
                        );
                        files.push(f);
                    }
                    self.dirs.push((name, files));
                }
            }
        }
    }
}

#[test]
fn changes_during_initial_sync_reach_replica() {
    let Some(_timer) = harness::begin("changes_during_initial_sync_reach_replica") else {
        return;
    };
    changes_during_initial_sync(Via::Local);
}

#[test]
fn changes_during_initial_sync_reach_replica_over_ssh() {
    let test = "changes_during_initial_sync_reach_replica_over_ssh";
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    if sshd::available_or_skip(test) {
        changes_during_initial_sync(Via::Ssh);
    }
}

fn changes_during_initial_sync(via: Via) {
    let test = named("changes_during_initial_sync_reach_replica", via);
    let seed = harness::seed(&test);
    let ctx = format!("{test}, seed {seed}");
    let s = Scratch::new("initial-sync");
    let dest = Dest::new(via, &s);
    let t = Instant::now();
    let mut tree = BigTree::create(&s.src, 500, 100, seed);
    eprintln!("created 50,000 files in {:?}", t.elapsed());

    // Change the tree from right after the spawn until `ready`: before the marks are
    // set, during the initial sync, and (one more round) after it.
    let d = {
        let _start = QUEUE_LIMIT_LOCK.read().unwrap_or_else(|e| e.into_inner());
        let mut d = Daemon::spawn(&s.src, &dest.spec, &dest.args(&[]));
        let t = Instant::now();
        let mut rounds_before_ready = 0;
        let mut ready_seen_after_first_round = None;
        while !d.log.contains("ready")
            && t.elapsed() < Duration::from_secs(120)
            && rounds_before_ready < 2000
        {
            tree.mutate(25);
            rounds_before_ready += 1;
            if ready_seen_after_first_round.is_none() {
                ready_seen_after_first_round = Some(d.log.contains("ready"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        d.wait_for_line("ready", Duration::from_secs(120));
        eprintln!(
            "{rounds_before_ready} rounds of 25 changes before `ready` ({:?} after spawn)",
            t.elapsed()
        );
        assert_eq!(
            ready_seen_after_first_round,
            Some(false),
            "{ctx}: `ready` came before the first 25 changes were made, right after the \
             spawn: too early for an initial sync of 50,000 files"
        );
        d
    };
    tree.mutate(200);
    let took = wait_converged(
        &s.src,
        &s.dst,
        Duration::from_secs(120),
        &skip_nothing,
        &ctx,
    );
    eprintln!("converged {took:?} after the last change");
    d.stop();
    assert_equal_now(&s.src, &s.dst, &skip_nothing, &format!("{ctx}: after stop"));
    dest.assert_one_connection(&ctx);
}

#[test]
fn overflow_burst_converges() {
    let Some(_timer) = harness::begin("overflow_burst_converges") else {
        return;
    };
    overflow_burst(Via::Local);
}

#[test]
fn overflow_burst_converges_over_ssh() {
    let Some(_timer) = harness::begin("overflow_burst_converges_over_ssh") else {
        return;
    };
    if sshd::available_or_skip("overflow_burst_converges_over_ssh") {
        overflow_burst(Via::Ssh);
    }
}

fn overflow_burst(via: Via) {
    let test = named("overflow_burst_converges", via);
    let seed = harness::seed(&test);
    let ctx = format!("{test}, seed {seed}");
    let s = Scratch::new("overflow");
    let dest = Dest::new(via, &s);
    let mut churn = Churn::new(&s.src, seed);
    churn.populate(150);
    mark_root(&s.src);

    // A fanotify group or an inotify instance takes the queue limit at creation: lower it
    // for this daemon's start only, with no other daemon starting meanwhile.
    // The ebpf backend's queue is its ring buffer: the smallest allowed (16 KiB) holds a few
    // records.
    let (queue_limit, extra) = match harness::backend().as_deref() {
        Some("inotify") => ("/proc/sys/fs/inotify/max_queued_events", vec![]),
        Some("ebpf") => (
            "/proc/sys/fs/fanotify/max_queued_events",
            args(&["--ebpf-ringbuf-bytes", "16384"]),
        ),
        _ => ("/proc/sys/fs/fanotify/max_queued_events", vec![]),
    };
    let mut d = {
        let _no_other_start = QUEUE_LIMIT_LOCK.write().unwrap_or_else(|e| e.into_inner());
        let _limit = SysctlGuard::set(queue_limit, "64");
        let mut d = Daemon::spawn(&s.src, &dest.spec, &dest.args(&extra));
        d.wait_for_line("ready", READY_TIMEOUT);
        d
    };
    assert_equal_now(
        &s.src,
        &s.dst,
        &skip_nothing,
        &format!("{ctx}: right after `ready`"),
    );

    // While the daemon is stopped nothing reads the queue: a burst overflows it.
    d.signal(Signal::SIGSTOP);
    churn.run(3000, Pace::Burst);
    let burst = s.src.join("burst");
    mkdir_p(&burst);
    for i in 0..2000 {
        write(&burst.join(format!("b{i}")), format!("burst {i}\n"));
    }
    for i in (0..2000).step_by(4) {
        rename(
            &burst.join(format!("b{i}")),
            &burst.join(format!("renamed{i}")),
        );
    }
    for i in (1..2000).step_by(4) {
        std::fs::remove_file(burst.join(format!("b{i}"))).expect("delete burst file");
    }
    rename(&burst, &s.src.join("burst-moved"));
    d.signal(Signal::SIGCONT);

    d.wait_for_line("queue overflow", Duration::from_secs(60));
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, &ctx);

    // Still live after the rescan.
    churn.run(300, Pace::Spread);
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &format!("{ctx}: after the rescan"),
    );
    d.stop();
    dest.assert_one_connection(&ctx);
}

/// File names that break naive quoting, option parsing, line-based lists or UTF-8.
fn odd_names() -> Vec<OsString> {
    let mut v: Vec<OsString> = [
        "with space",
        " leading space",
        "trailing space ",
        "new\nline",
        "\nleading newline",
        "tab\tname",
        "carriage\rreturn",
        "-leading-dash",
        "--double-dash",
        "--delete",
        "-",
        "*",
        "glob*?[ab]{c,d}",
        "back\\slash",
        "\\",
        "single'quote",
        "double\"quote",
        "`backtick`",
        "$HOME",
        "semi;colon",
        "colon:name",
        "host::module",
        "percent%s%n",
        "#hash",
        ";semicolon first",
        "~tilde",
        ".hidden",
        "...",
        "ünïcödé",
        "日本語",
        "emoji 🎉",
        "\u{1}control",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    v.push(OsStr::from_bytes(b"caf\xe9").to_os_string());
    v.push(OsStr::from_bytes(b"\xff\xfe invalid").to_os_string());
    v.push(OsString::from("a".repeat(255)));
    v.push(OsString::from("é".repeat(127))); // 254 bytes
    v
}

/// The same name, changed: another odd name of at most 255 bytes.
fn renamed(name: &OsStr) -> OsString {
    let mut b = name.as_bytes().to_vec();
    if b.len() >= 250 {
        b.truncate(250);
    }
    b.extend_from_slice(b" \nr");
    OsStr::from_bytes(&b).to_os_string()
}

/// `levels` directories of 100-byte names under `base`, returning the deepest.
fn deep_chain(base: &Path, tag: &str, levels: usize) -> PathBuf {
    let mut p = base.to_path_buf();
    for i in 0..levels {
        let mut name = format!("{tag}-{i:02}-");
        while name.len() < 100 {
            name.push('x');
        }
        p.push(name);
    }
    mkdir_p(&p);
    p
}

#[test]
fn odd_file_names_replicate() {
    let Some(_timer) = harness::begin("odd_file_names_replicate") else {
        return;
    };
    odd_file_names(Via::Local);
}

#[test]
fn odd_file_names_replicate_over_ssh() {
    let Some(_timer) = harness::begin("odd_file_names_replicate_over_ssh") else {
        return;
    };
    if sshd::available_or_skip("odd_file_names_replicate_over_ssh") {
        odd_file_names(Via::Ssh);
    }
}

fn odd_file_names(via: Via) {
    let test = named("odd_file_names_replicate", via);
    let ctx = test.as_str();
    let s = Scratch::new("odd-names");
    let dest = Dest::new(via, &s);
    let names = odd_names();

    // Before the start: files and directories (with a file inside) of every odd name.
    let dirs = s.src.join("dirs");
    mkdir_p(&dirs);
    for n in &names {
        write(&s.src.join(n), n.as_bytes());
        mkdir_p(&dirs.join(n));
        write(&dirs.join(n).join("inner"), n.as_bytes());
    }
    let deep = deep_chain(&s.src, "deep", 30);
    write(&deep.join("leaf"), "deep leaf\n");
    let deep_len = deep.as_os_str().len();
    eprintln!("deepest source path: {deep_len} bytes");
    mark_root(&s.src);

    let d = Daemon::start(&s.src, &dest.spec, &dest.args(&[]));
    assert_equal_now(
        &s.src,
        &s.dst,
        &skip_nothing,
        &format!("{ctx}: right after `ready`"),
    );

    // Live: create them again elsewhere, change the existing ones, a second deep chain.
    let live = s.src.join("live");
    mkdir_p(&live);
    for n in &names {
        write(&live.join(n), n.as_bytes());
        let sub = live.join(format!(
            "d{}",
            names.iter().position(|x| x == n).unwrap_or(0)
        ));
        mkdir_p(&sub.join(n));
        write(&sub.join(n).join(n), "nested\n");
        std::fs::OpenOptions::new()
            .append(true)
            .open(s.src.join(n))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b" appended"))
            .expect("append");
        std::os::unix::fs::symlink(n, live.join(renamed(n))).expect("symlink to odd name");
    }
    let deep2 = deep_chain(&s.src, "deeper", 30);
    write(&deep2.join("leaf2"), "second deep leaf\n");
    write(&deep.join("leaf"), "deep leaf, changed\n");
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &format!("{ctx}: created"),
    );

    // Live: rename and delete them.
    let moved = s.src.join("moved");
    mkdir_p(&moved);
    for (i, n) in names.iter().enumerate() {
        if i % 2 == 0 {
            std::fs::remove_file(s.src.join(n)).expect("delete odd file");
        } else {
            rename(&s.src.join(n), &s.src.join(renamed(n)));
        }
        rename(&live.join(n), &moved.join(n));
        rename(&dirs.join(n), &dirs.join(renamed(n)));
    }
    // Move a middle level of the deep chain: the whole subtree below moves with it.
    let mut mid = deep.clone();
    for _ in 0..15 {
        mid.pop();
    }
    let mid_to = mid.with_file_name(format!("{:-<100}", "moved-level"));
    rename(&mid, &mid_to);
    std::fs::remove_dir_all(
        s.src.join(
            deep2
                .strip_prefix(&s.src)
                .expect("prefix")
                .iter()
                .next()
                .expect("first level"),
        ),
    )
    .expect("rm -rf deep2");
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &format!("{ctx}: renamed and deleted"),
    );

    // One change at a time, so no batch is big enough to be widened to a whole-tree
    // sync: names at the top that a list reader could take for comments or options.
    let late = ["#late", ";late", "-late", "--late", " late", "\nlate"];
    for n in late {
        write(&s.src.join(n), n);
    }
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &format!("{ctx}: late names created"),
    );
    for n in late {
        let to = format!("{n}-renamed");
        rename(&s.src.join(n), &s.src.join(&to));
        wait_converged(
            &s.src,
            &s.dst,
            Duration::from_secs(30),
            &skip_nothing,
            &format!("{ctx}: renamed {n:?} alone"),
        );
        std::fs::remove_file(s.src.join(&to)).expect("delete late name");
        wait_converged(
            &s.src,
            &s.dst,
            Duration::from_secs(30),
            &skip_nothing,
            &format!("{ctx}: deleted {to:?} alone"),
        );
    }
    d.stop();
    dest.assert_one_connection(ctx);
}

/// An entry replaced by one of another type under the same name: the replica must
/// follow, whatever the old entry held (a directory's children are gone, and the same
/// names may now resolve through a symlink to something else).
#[test]
fn type_changes_replicate() {
    let Some(_timer) = harness::begin("type_changes_replicate") else {
        return;
    };
    let ctx = "type_changes_replicate";
    let s = Scratch::new("type-changes");
    let a = s.src.join("a");
    let with_children = |d: &Path| {
        mkdir_p(&d.join("sub"));
        write(&d.join("f"), "child\n");
        write(&d.join("sub/g"), "grandchild\n");
    };
    mkdir_p(&a);
    with_children(&a.join("tdir"));
    write(&a.join("t"), "target file\n");
    for d in [
        "dir-to-file-link",
        "dir-to-dir-link",
        "dir-to-file",
        "dir-to-dangling-link",
    ] {
        with_children(&a.join(d));
    }
    write(&a.join("file-to-dir"), "file\n");
    std::os::unix::fs::symlink("t", a.join("link-to-dir")).expect("symlink");
    std::os::unix::fs::symlink("tdir", a.join("link-to-file")).expect("symlink");
    let d = Daemon::start(&s.src, &s.dst, &[]);
    assert_equal_now(
        &s.src,
        &s.dst,
        &skip_nothing,
        &format!("{ctx}: right after `ready`"),
    );

    let rm_rf = |p: &Path| std::fs::remove_dir_all(p).expect("rm -rf");
    rm_rf(&a.join("dir-to-file-link"));
    std::os::unix::fs::symlink("t", a.join("dir-to-file-link")).expect("symlink");
    rm_rf(&a.join("dir-to-dir-link"));
    std::os::unix::fs::symlink("tdir", a.join("dir-to-dir-link")).expect("symlink");
    rm_rf(&a.join("dir-to-dangling-link"));
    std::os::unix::fs::symlink("nowhere/f", a.join("dir-to-dangling-link")).expect("symlink");
    rm_rf(&a.join("dir-to-file"));
    write(&a.join("dir-to-file"), "now a file\n");
    std::fs::remove_file(a.join("file-to-dir")).expect("rm");
    with_children(&a.join("file-to-dir"));
    std::fs::remove_file(a.join("link-to-dir")).expect("rm");
    with_children(&a.join("link-to-dir"));
    std::fs::remove_file(a.join("link-to-file")).expect("rm");
    write(&a.join("link-to-file"), "now a file\n");
    wait_converged(&s.src, &s.dst, Duration::from_secs(60), &skip_nothing, ctx);
    d.stop();
}

/// What the exclusions `*.swp` and `.cache/` take out (rsync semantics): any entry
/// named `*.swp`, any directory named `.cache`, and everything below them.
fn excluded(rel: &Path, md: &Metadata) -> bool {
    let name = rel.file_name().map(OsStr::as_bytes).unwrap_or_default();
    name.ends_with(b".swp") || (name == b".cache" && md.is_dir())
}

/// Excluded entries of a tree (not descending into them).
fn count_excluded(root: &Path) -> usize {
    let all = tree::snapshot(root, &skip_nothing).expect("walk");
    let kept = tree::snapshot(root, &excluded).expect("walk");
    all.len() - kept.len()
}

/// `--delete WHEN` against real rsync: `startup` deletes in the initial sync only,
/// `running` only for changes seen while running, `false` never.
#[test]
fn delete_modes_decide_which_runs_delete() {
    let Some(_timer) = harness::begin("delete_modes_decide_which_runs_delete") else {
        return;
    };
    for (mode, at_startup, while_running) in [
        ("startup", true, false),
        ("running", false, true),
        ("false", false, false),
    ] {
        let s = Scratch::new(&format!("delete-{mode}"));
        write(&s.src.join("keep"), "k\n");
        write(&s.src.join("gone"), "g\n");
        write(&s.dst.join("extra"), "only on the replica\n");
        let mut d = Daemon::start(&s.src, &s.dst, &args(&["--delete", mode]));
        assert!(s.dst.join("gone").exists(), "{mode}: initial sync");
        assert_eq!(
            !s.dst.join("extra").exists(),
            at_startup,
            "{mode}: initial sync deleted the replica's extra file"
        );
        std::fs::remove_file(s.src.join("gone")).expect("rm gone");
        write(&s.src.join("marker"), "m\n");
        assert!(
            harness::poll_until(CONVERGE_TIMEOUT, Duration::from_millis(50), || s
                .dst
                .join("marker")
                .exists()),
            "{mode}: marker never reached the replica"
        );
        d.wait_rsync_quiet(Duration::from_secs(1), CONVERGE_TIMEOUT);
        assert_eq!(
            !s.dst.join("gone").exists(),
            while_running,
            "{mode}: a file deleted while running was deleted on the replica"
        );
        assert!(s.dst.join("keep").exists(), "{mode}: keep");
        assert_eq!(d.count("rsync failed"), 0, "{mode}: no rsync failure");
        d.stop();
    }
}

/// `--exclude-from FILE` takes the same patterns as `--exclude`, one per line, with
/// comments: left out of the initial sync and of later changes alike.
#[test]
fn exclude_from_file_is_honoured() {
    let Some(_timer) = harness::begin("exclude_from_file_is_honoured") else {
        return;
    };
    let s = Scratch::new("exclude-from");
    let src = &s.src;
    let patterns = s.path().join("excludes");
    write(
        &patterns,
        "# editor droppings\n*.swp\n\n; caches\n.cache/\n",
    );
    write(&src.join("a.txt"), "kept\n");
    write(&src.join("b.swp"), "left out\n");
    mkdir_p(&src.join("d/.cache"));
    write(&src.join("d/.cache/x"), "left out\n");
    mark_root(src);

    let extra = args(&["--exclude-from", patterns.to_str().expect("UTF-8 temp dir")]);
    let d = Daemon::start(src, &s.dst, &extra);
    assert_equal_now(src, &s.dst, &excluded, "exclude_from: right after `ready`");
    write(&src.join("d/c.swp"), "left out\n");
    write(&src.join("d/c.txt"), "kept\n");
    wait_converged(
        src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &excluded,
        "exclude_from: changes",
    );
    assert_eq!(count_excluded(&s.dst), 0, "excluded entries on the replica");
    assert!(s.dst.join("d/c.txt").exists() && s.dst.join("a.txt").exists());
    d.stop();
}

/// `--include` before the excludes, as rsync reads them: `--include '*/' --include '*.txt'
/// --exclude '*'` replicates the directories and the .txt files only, at start-up and
/// for later changes, and the daemon does not even schedule runs for the rest.
#[test]
fn includes_keep_what_the_excludes_would_leave_out() {
    let Some(_timer) = harness::begin("includes_keep_what_the_excludes_would_leave_out") else {
        return;
    };
    let ctx = "includes_keep_what_the_excludes_would_leave_out";
    let s = Scratch::new("includes");
    let src = &s.src;
    write(&src.join("a.txt"), "kept\n");
    write(&src.join("a.bin"), "left out\n");
    mkdir_p(&src.join("d/e"));
    write(&src.join("d/e/b.txt"), "kept\n");
    write(&src.join("d/e/b.bin"), "left out\n");
    mark_root(src);
    let extra = args(&["--include", "*/", "--include", "*.txt", "--exclude", "*"]);
    let d = Daemon::start(src, &s.dst, &extra);
    let only_txt =
        |rel: &Path, md: &Metadata| !md.is_dir() && rel.extension().is_none_or(|e| e != "txt");
    assert_equal_now(
        src,
        &s.dst,
        &only_txt,
        &format!("{ctx}: right after `ready`"),
    );
    let runs = d.count("rsync finished");
    // Writes to left-out files (a name coming or going would change its directory's
    // mtime, which is synced).
    for i in 0..20 {
        write(&src.join("a.bin"), format!("left out {i}\n"));
        write(&src.join("d/e/b.bin"), format!("left out {i}\n"));
    }
    std::thread::sleep(Duration::from_millis(500));
    if harness::backend().as_deref() == Some("ebpf") {
        // Documented: the ebpf probes see an open with O_CREAT of an existing file as a
        // creation, which touches its (synced) directory.
        eprintln!("{ctx}: ebpf reports these writes as creations; only the replica checked");
    } else {
        assert_eq!(
            d.count("rsync finished"),
            runs,
            "{ctx}: writes only to left-out files started rsync runs"
        );
    }
    mkdir_p(&src.join("new"));
    write(&src.join("new/c.txt"), "kept\n");
    write(&src.join("new/c.bin"), "left out\n");
    wait_converged(src, &s.dst, CONVERGE_TIMEOUT, &only_txt, ctx);
    assert!(s.dst.join("new/c.txt").exists() && !s.dst.join("new/c.bin").exists());
    assert!(!s.dst.join("a.bin").exists() && !s.dst.join("d/e/b.bin").exists());
    d.stop();
}

#[test]
fn excluded_paths_are_not_replicated() {
    let Some(_timer) = harness::begin("excluded_paths_are_not_replicated") else {
        return;
    };
    let seed = harness::seed("excluded_paths_are_not_replicated");
    let ctx = format!("excluded_paths_are_not_replicated, seed {seed}");
    let s = Scratch::new("exclude");
    let src = &s.src;

    // Before the start: churn content with excluded names, and fixed cases (made after
    // the churn's model was taken, so the churn leaves them alone).
    let mut churn = Churn::new(src, seed);
    churn.excluded_names = true;
    churn.populate(150);
    mkdir_p(&src.join(".cache/deep/er"));
    write(&src.join(".cache/deep/er/blob"), "cached\n");
    mkdir_p(&src.join("a/b/.cache"));
    write(&src.join("a/b/.cache/x"), "cached\n");
    write(&src.join("a/b/file.swp"), "swap\n");
    write(&src.join("top.swp"), "swap\n");
    write(&src.join("a/notes.swp.txt"), "kept: not *.swp\n");
    write(&src.join("a/swp"), "kept\n");
    write(&src.join("a/.cache.txt"), "kept: not .cache\n");
    mkdir_p(&src.join("a/x.cache"));
    write(&src.join("a/x.cache/f"), "kept\n");
    mkdir_p(&src.join("plain/sub"));
    write(&src.join("plain/sub/a.txt"), "will become .swp\n");
    write(&src.join("plain/b.swp"), "will become .txt\n");
    mark_root(src);

    let extra = args(&["--exclude", "*.swp", "--exclude", ".cache/"]);
    let d = Daemon::start(src, &s.dst, &extra);
    assert_equal_now(
        src,
        &s.dst,
        &excluded,
        &format!("{ctx}: right after `ready`"),
    );

    churn.run(CHURN_OPS, Pace::Spread);
    mkdir_p(&src.join("cache-out/inner"));
    write(&src.join("cache-out/inner/f"), "will move into a .cache\n");
    write(&src.join("top.swp"), "swap, changed\n");
    mkdir_p(&src.join("new/.cache/sub"));
    write(&src.join("new/.cache/sub/f"), "cached\n");
    write(&src.join("new/late.swp"), "swap\n");
    let n_excluded = count_excluded(src);
    assert!(
        n_excluded >= 5,
        "{ctx}: the source has only {n_excluded} excluded entries"
    );
    eprintln!("{n_excluded} excluded entries in the source");
    wait_converged(
        src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &excluded,
        &format!("{ctx}: churn"),
    );
    assert_eq!(
        count_excluded(&s.dst),
        0,
        "{ctx}: excluded entries on the replica"
    );

    // Renames across the exclusion boundary, both ways, once the replica has both sides.
    rename(&src.join("plain/sub/a.txt"), &src.join("plain/sub/a.swp"));
    rename(&src.join("plain/b.swp"), &src.join("plain/b.txt"));
    rename(&src.join("plain/sub"), &src.join("plain/.cache"));
    rename(&src.join("cache-out"), &src.join("a/.cache"));
    rename(&src.join("a/b/.cache"), &src.join("a/b/uncached"));
    rename(&src.join("a/b/file.swp"), &src.join("a/b/file.txt"));
    write(&src.join("top.swp"), "swap, changed again\n");
    wait_converged(
        src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &excluded,
        &format!("{ctx}: renames"),
    );
    assert!(
        !s.dst.join("plain/sub").exists(),
        "{ctx}: plain/sub still on the replica"
    );
    assert!(
        s.dst.join("a/b/uncached/x").exists(),
        "{ctx}: a/b/uncached/x not on the replica"
    );
    d.stop();
    assert_equal_now(src, &s.dst, &excluded, &format!("{ctx}: after stop"));
}

/// rsync's quick check compares mtimes in whole seconds unless told otherwise
/// (`--modify-window=-1`): a file rewritten with the same size within the same second
/// (mtimes differing in nanoseconds only) must still arrive, and so must a directory's
/// mtime that differs from the replica's in nanoseconds only.
#[test]
fn rewrite_within_the_same_second_replicates() {
    let Some(_timer) = harness::begin("rewrite_within_the_same_second_replicates") else {
        return;
    };
    let ctx = "rewrite_within_the_same_second_replicates";
    let s = Scratch::new("same-second");
    let f = s.src.join("data");
    let dir = s.src.join("dir");
    mkdir_p(&dir);
    write(&f, vec![b'A'; 4096]);
    set_mtime(&f, 1_600_000_000, 100);
    set_mtime(&dir, 1_600_000_000, 100);
    let d = Daemon::start(&s.src, &s.dst, &[]);
    assert_equal_now(
        &s.src,
        &s.dst,
        &skip_nothing,
        &format!("{ctx}: right after `ready`"),
    );

    write(&f, vec![b'B'; 4096]);
    set_mtime(&f, 1_600_000_000, 200);
    set_mtime(&dir, 1_600_000_000, 200);
    wait_converged(&s.src, &s.dst, Duration::from_secs(30), &skip_nothing, ctx);
    d.stop();
}

/// A rewrite that keeps size and mtime exactly (what `cp -p`, `touch -r`, tar and rsync
/// itself do) passes rsync's quick check: the daemon knows the file changed and must
/// still send it.
#[test]
fn rewrite_with_same_size_and_mtime_replicates() {
    let Some(_timer) = harness::begin("rewrite_with_same_size_and_mtime_replicates") else {
        return;
    };
    let ctx = "rewrite_with_same_size_and_mtime_replicates";
    let s = Scratch::new("same-mtime");
    let f = s.src.join("data");
    write(&f, vec![b'A'; 4096]);
    set_mtime(&f, 1_600_000_000, 5);
    let d = Daemon::start(&s.src, &s.dst, &[]);
    assert_equal_now(
        &s.src,
        &s.dst,
        &skip_nothing,
        &format!("{ctx}: right after `ready`"),
    );

    write(&f, vec![b'B'; 4096]);
    set_mtime(&f, 1_600_000_000, 5);
    wait_converged(&s.src, &s.dst, Duration::from_secs(30), &skip_nothing, ctx);
    d.stop();
}

/// A same-size rewrite restored to the old mtime (`cp -p`, `tar x`, `touch -r`) inside a
/// directory that was just created or moved in: the directory's recursive run compares by
/// size and mtime and would skip it; the daemon knows the file was written.
#[test]
fn folded_rewrite_with_same_size_and_mtime_replicates() {
    let test = "folded_rewrite_with_same_size_and_mtime_replicates";
    let Some(_timer) = harness::begin("folded_rewrite_with_same_size_and_mtime_replicates") else {
        return;
    };
    let s = Scratch::new("folded-rewrite");
    let src = &s.src;
    mkdir_p(&src.join("tarred"));
    mkdir_p(&src.join("moved/sub"));
    write(&src.join("tarred/f"), vec![b'A'; 4096]);
    write(&src.join("moved/sub/g"), vec![b'A'; 4096]);
    set_mtime(&src.join("tarred/f"), 1_600_000_000, 5);
    set_mtime(&src.join("moved/sub/g"), 1_600_000_000, 5);
    let mut d = Daemon::start(src, &s.dst, &[]);
    assert_equal_now(
        src,
        &s.dst,
        &skip_nothing,
        &format!("{test}: after `ready`"),
    );
    d.wait_rsync_quiet(Duration::from_millis(500), Duration::from_secs(20));

    // Every change lands in one batch: the daemon reads nothing until it is continued.
    d.signal(Signal::SIGSTOP);
    // `tar x` over an existing tree: the directory is made again, the file written with
    // its recorded mtime.
    std::fs::remove_dir_all(src.join("tarred")).expect("rm -rf tarred");
    mkdir_p(&src.join("tarred"));
    write(&src.join("tarred/f"), vec![b'B'; 4096]);
    set_mtime(&src.join("tarred/f"), 1_600_000_000, 5);
    // A rewrite in place, then its directory moved away and back.
    write_in_place(&src.join("moved/sub/g"), &[b'C'; 4096]);
    set_mtime(&src.join("moved/sub/g"), 1_600_000_000, 5);
    rename(&src.join("moved"), &src.join("away"));
    rename(&src.join("away"), &src.join("moved"));
    d.signal(Signal::SIGCONT);

    wait_converged(src, &s.dst, Duration::from_secs(60), &skip_nothing, test);
    d.stop();
}

/// On SIGTERM the daemon flushes what is dirty: changes made before the signal are on
/// the replica when it has exited, though the batching delay was far from over.
#[test]
fn sigterm_flushes_pending_changes() {
    let Some(_timer) = harness::begin("sigterm_flushes_pending_changes") else {
        return;
    };
    let ctx = "sigterm_flushes_pending_changes";
    let s = Scratch::new("sigterm");
    write(&s.src.join("before"), "before\n");
    let extra = args(&["--delay", "30000", "--max-delay", "60000"]);
    let mut d = Daemon::start(&s.src, &s.dst, &extra);
    assert_equal_now(
        &s.src,
        &s.dst,
        &skip_nothing,
        &format!("{ctx}: right after `ready`"),
    );

    mkdir_p(&s.src.join("new/dir"));
    write(&s.src.join("new/dir/file"), "made before SIGTERM\n");
    write(&s.src.join("before"), "changed before SIGTERM\n");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(harness::STOP_TIMEOUT);
    assert!(
        status.success(),
        "{ctx}: exit status {status} after SIGTERM"
    );
    assert!(d.log.contains("stopped"), "{ctx}: no `stopped` line");
    assert_equal_now(&s.src, &s.dst, &skip_nothing, &format!("{ctx}: after exit"));
}

/// Stands in for rsync: while `races-left` beside it holds a positive count, a run with a
/// list (`--files-from`) fails the way rsync 3.4+ does when a listed directory vanishes
/// while it builds its file list; otherwise it runs the real rsync. It decides once its
/// list came, as rsync would meet the race then: the daemon may start a run ahead of its
/// list (the standby of a lone change).
const RACING_RSYNC: &str = r#"#!/bin/sh
left="$(dirname "$0")/races-left"
for arg in "$@"; do
    if [ "$arg" = "--files-from=-" ]; then
        list="$(mktemp)"
        cat > "$list"
        if [ -s "$left" ] && [ "$(cat "$left")" -gt 0 ]; then
            echo $(( $(cat "$left") - 1 )) > "$left"
            rm -f "$list"
            echo 'ABORTING due to invalid path from sender: gone/child' >&2
            echo 'rsync error: protocol incompatibility (code 2) at generator.c(1715)' >&2
            exit 2
        fi
        rsync "$@" < "$list"
        code=$?
        rm -f "$list"
        exit "$code"
    fi
done
exec rsync "$@"
"#;

/// rsync aborting with "invalid path from sender" (code 2) is the source changing under
/// it, not a protocol problem: the daemon retries with the batch's directories as
/// subtrees, turns three such aborts in a row into one whole-tree sync (which has no list
/// to abort on), and keeps the target.
#[test]
fn source_races_are_retried_not_fatal() {
    let Some(_timer) = harness::begin("source_races_are_retried_not_fatal") else {
        return;
    };
    let ctx = "source_races_are_retried_not_fatal";
    let s = Scratch::new("source-race");
    let fake = s.path().join("racing-rsync");
    write(&fake, RACING_RSYNC);
    chmod(&fake, 0o755);
    let extra = vec![OsString::from("--rsync"), fake.into_os_string()];
    let mut d = Daemon::start(&s.src, &s.dst, &extra);
    let races_left = s.path().join("races-left");
    let read_left = || std::fs::read_to_string(&races_left).unwrap_or_default();

    // Three aborts in a row: the limit after which the next run covers the whole tree.
    write(&races_left, "3\n");
    mkdir_p(&s.src.join("dir/sub"));
    write(&s.src.join("dir/sub/file"), "after three aborted runs\n");
    d.wait_for_line("syncing the whole tree", CONVERGE_TIMEOUT);
    let finished = d.count("rsync finished");
    d.wait_for_count("rsync finished", finished + 1, CONVERGE_TIMEOUT);
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);
    assert_eq!(read_left().trim(), "0", "{ctx}: not every abort was met");
    assert!(
        !d.log.contains("no longer synced"),
        "{ctx}: the target was given up"
    );

    // One abort is retried as a recursive run of the file's directory, and the target
    // still follows changes.
    write(&races_left, "1\n");
    write(&s.src.join("dir/sub/file"), "after one more\n");
    d.wait_for("the last abort", CONVERGE_TIMEOUT, |_| {
        read_left().trim() == "0"
    });
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);
    assert_eq!(
        d.log.count("syncing the whole tree"),
        1,
        "{ctx}: a single abort widened the sync"
    );
    d.stop();
}

/// `mkdir -p a/b/c && echo x > a/b/c/f` in one burst: the file lands in a directory that
/// did not exist a moment ago (the classic inotify script's race).
#[test]
fn nested_mkdir_burst_replicates() {
    let Some(_timer) = harness::begin("nested_mkdir_burst_replicates") else {
        return;
    };
    let s = Scratch::new("nested-mkdir");
    let d = Daemon::start(&s.src, &s.dst, &[]);
    for round in 0..20 {
        let deep = s.src.join(format!("a{round}/b/c"));
        mkdir_p(&deep);
        write(&deep.join("f"), format!("x {round}\n"));
        mkdir_p(&deep.join("d/e"));
        write(&deep.join("d/e/g"), "g\n");
    }
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "nested_mkdir_burst_replicates",
    );
    d.stop();
}

/// The inotify backend needs one watch per directory: with too few available it must
/// refuse to start, naming the sysctl and the numbers, instead of watching part of the tree.
#[test]
fn inotify_refuses_a_tree_larger_than_the_watch_limit() {
    let Some(_timer) = harness::begin("inotify_refuses_a_tree_larger_than_the_watch_limit") else {
        return;
    };
    let s = Scratch::new("watch-limit");
    for i in 0..300 {
        mkdir_p(&s.src.join(format!("d{i}/sub")));
    }
    let mut d = {
        let _no_other_start = QUEUE_LIMIT_LOCK.write().unwrap_or_else(|e| e.into_inner());
        let in_use: usize = std::fs::read_dir("/proc")
            .map(|procs| {
                procs
                    .flatten()
                    .filter_map(|p| std::fs::read_dir(p.path().join("fdinfo")).ok())
                    .flat_map(|fds| fds.flatten())
                    .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
                    .map(|text| text.matches("inotify wd:").count())
                    .sum()
            })
            .unwrap_or(0);
        // Room for the watches already in use plus 100: the tree needs 601.
        let limit = (in_use + 100).to_string();
        let _limit = SysctlGuard::set("/proc/sys/fs/inotify/max_user_watches", &limit);
        let mut d = Daemon::spawn(&s.src, &s.dst, &args(&["--backend", "inotify"]));
        let status = d.wait_exit(Duration::from_secs(60));
        assert!(!status.success(), "started although the tree does not fit");
        d
    };
    d.wait_exit(Duration::from_secs(1));
    let log = d.log.tail(20);
    for needle in ["max_user_watches", "601", "sysctl"] {
        assert!(
            log.contains(needle),
            "refusal does not mention {needle:?}:\n{log}"
        );
    }
    assert!(
        !s.dst.join("d0").exists(),
        "nothing may be synced by a daemon that refused to start"
    );
}

/// The value of `key=N` in a log line.
fn log_field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

/// Stops the daemon and returns the line of counters its ebpf backend logs when it stops.
fn stop_for_ebpf_counters(d: Daemon) -> String {
    let log = d.log.clone();
    d.stop();
    log.lines()
        .into_iter()
        .find(|l| l.contains("ebpf backend stopped"))
        .expect("the ebpf backend logs its counters when it stops")
}

/// The ebpf backend drops the syscalls of the daemon and of the rsync runs it forks in
/// the kernel: after live syncs, the kernel counted such syscalls, and not one record of
/// them reached user space.
#[test]
fn ebpf_own_rsync_activity_is_filtered_in_the_kernel() {
    if harness::backend().as_deref() != Some("ebpf") {
        eprintln!(
            "ebpf_own_rsync_activity_is_filtered_in_the_kernel: only for WATCHER_E2E_BACKEND=ebpf"
        );
        return;
    }
    let Some(_timer) = harness::begin("ebpf_own_rsync_activity_is_filtered_in_the_kernel") else {
        return;
    };
    let s = Scratch::new("ebpf-own");
    for i in 0..20 {
        write(&s.src.join(format!("before{i}")), format!("before {i}\n"));
    }
    let d = Daemon::start(&s.src, &s.dst, &[]);
    for i in 0..20 {
        mkdir_p(&s.src.join(format!("dir{i}")));
        write(&s.src.join(format!("dir{i}/live")), format!("live {i}\n"));
        wait_converged(
            &s.src,
            &s.dst,
            CONVERGE_TIMEOUT,
            &skip_nothing,
            "ebpf_own_rsync_activity_is_filtered_in_the_kernel",
        );
    }
    let line = stop_for_ebpf_counters(d);
    let dropped = log_field(&line, "own_dropped_in_kernel").expect("own_dropped_in_kernel=N");
    let past = log_field(&line, "own_past_kernel_filter").expect("own_past_kernel_filter=N");
    assert!(
        dropped > 0,
        "the rsync runs' syscalls should have been dropped in the kernel: {line}"
    );
    assert_eq!(
        past, 0,
        "records of the daemon's own processes got past the kernel filter: {line}"
    );
}

/// Files written outside the root (beside it on the same filesystem, and on another
/// filesystem) are dropped by the probes in the kernel, never reaching user space, while
/// a change inside the root still replicates; with `--ebpf-kernel-filter off` they reach
/// user space and are dropped there.
#[test]
fn ebpf_changes_outside_the_roots_are_dropped_in_the_kernel() {
    const TEST: &str = "ebpf_changes_outside_the_roots_are_dropped_in_the_kernel";
    if harness::backend().as_deref() != Some("ebpf") {
        eprintln!("{TEST}: only for WATCHER_E2E_BACKEND=ebpf");
        return;
    }
    let Some(_timer) = harness::begin(TEST) else {
        return;
    };
    let s = Scratch::new("ebpf-outside");
    let beside = s.path().join("beside");
    mkdir_p(&beside);
    // Another filesystem, when this machine has a tmpfs at /dev/shm.
    let shm = Path::new("/dev/shm");
    use std::os::unix::fs::MetadataExt;
    let other_fs = std::fs::metadata(shm)
        .ok()
        .filter(|md| md.dev() != std::fs::metadata(s.path()).expect("scratch").dev())
        .map(|_| {
            tempfile::Builder::new()
                .prefix("watcher-e2e-")
                .tempdir_in(shm)
                .expect("tempdir in /dev/shm")
        });
    const FILES: u64 = 300;
    let dropped_with = |filter: &str, round: u32| -> u64 {
        let extra = args(&["--ebpf-kernel-filter", filter]);
        let d = Daemon::start(&s.src, &s.dst, &extra);
        for i in 0..FILES {
            write(&beside.join(format!("f{round}-{i}")), "outside\n");
            if let Some(dir) = &other_fs {
                write(&dir.path().join(format!("f{round}-{i}")), "elsewhere\n");
            }
        }
        write(
            &s.src.join(format!("inside{round}")),
            format!("inside {round}\n"),
        );
        wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, TEST);
        // Deleted by absolute path: the file is gone when the probe runs, so only the
        // path says where it was.
        for i in 0..FILES {
            std::fs::remove_file(beside.join(format!("f{round}-{i}"))).expect("unlink");
            if let Some(dir) = &other_fs {
                std::fs::remove_file(dir.path().join(format!("f{round}-{i}"))).expect("unlink");
            }
        }
        // Absolute paths into the root that only read as outside byte for byte: through
        // `..`, `.` and an empty name. They must still reach the replica.
        let dot_names = ["dotdot", "dot", "double-slash"];
        for name in dot_names {
            write(&s.src.join(format!("{name}{round}")), "to delete\n");
        }
        wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, TEST);
        let src_name = s
            .src
            .file_name()
            .expect("src name")
            .to_str()
            .expect("utf-8");
        let via = [
            beside
                .join("..")
                .join(src_name)
                .join(format!("dotdot{round}")),
            PathBuf::from(format!("{}/./{src_name}/dot{round}", s.path().display())),
            PathBuf::from(format!(
                "{}//{src_name}/double-slash{round}",
                s.path().display()
            )),
        ];
        for path in &via {
            std::fs::remove_file(path).expect("unlink through an odd path");
        }
        wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, TEST);
        for name in dot_names {
            assert!(
                !s.dst.join(format!("{name}{round}")).exists(),
                "{TEST}: {name}{round} deleted through an odd absolute path is still in the replica"
            );
        }
        let line = stop_for_ebpf_counters(d);
        log_field(&line, "outside_roots_dropped_in_kernel")
            .expect("outside_roots_dropped_in_kernel=N")
    };
    let on = dropped_with("on", 0);
    // Each file outside: its creation, and its deletion by absolute path.
    let written = if other_fs.is_some() { 2 * FILES } else { FILES };
    assert!(
        on >= 2 * written,
        "{TEST}: {on} changes dropped in the kernel for {written} files written and deleted outside the root"
    );
    let off = dropped_with("off", 1);
    assert_eq!(
        off, 0,
        "{TEST}: the filter dropped changes while turned off"
    );
}
