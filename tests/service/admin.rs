//! The daemon as systemd runs it: logging to the journal (`JOURNAL_STREAM`), readiness and
//! status (`NOTIFY_SOCKET`), a prompt stop during a verify pass, and the unit file itself
//! (`systemd-analyze verify` and `security`).
//!
//! No systemd is needed: each test plays its part. The journal's stream is a file whose
//! device and inode the test puts in `JOURNAL_STREAM`; journald's native socket is a
//! datagram socket the test binds and mounts at `/run/systemd/journal/` inside a private
//! mount namespace (`unshare --mount`), so the daemon uses the real path; the notify
//! socket is one the test listens on.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::harness::{self, READY_TIMEOUT, STOP_TIMEOUT, Scratch, WATCHER, die_with_parent};
use crate::service::{self, READY, Service, free_port, toml_str, write_config_text};
use crate::{UNCLEAN, count_files, mkdir_p, populate, write};

// ---------------------------------------------------------------------------------------
// A daemon started the way systemd would

/// A `watcher` process with its stderr in a file (the journal's stream), killed with its
/// process group when dropped.
struct Unit {
    child: std::process::Child,
    stderr: PathBuf,
    exited: Option<ExitStatus>,
}

impl Unit {
    /// Runs `program args` with `env`, stderr appended to `stderr` (created by the caller).
    fn spawn(program: &OsStr, args: &[&OsStr], env: &[(&str, &OsStr)], stderr: &Path) -> Unit {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(stderr)
            .unwrap_or_else(|e| panic!("open {}: {e}", stderr.display()));
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program:?}: {e}"));
        Unit {
            child,
            stderr: stderr.to_path_buf(),
            exited: None,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the log holds `needle`.
    fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "exited ({status}) while waiting for {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).expect("kill");
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "did not exit within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// `JOURNAL_STREAM` for a file: its `DEVICE:INODE`, as systemd sets it for a stream.
fn journal_stream(file: &Path) -> String {
    let meta = std::fs::metadata(file).unwrap_or_else(|e| panic!("stat {}: {e}", file.display()));
    format!("{}:{}", meta.dev(), meta.ino())
}

/// `watcher ARGS` inside a private mount namespace with a fresh, empty /run, and, when
/// `journal_dir` is given, that directory mounted as /run/systemd/journal.
fn spawn_in_namespace(
    args: &[&OsStr],
    env: &[(&str, &OsStr)],
    journal_dir: Option<&Path>,
    stderr: &Path,
) -> Unit {
    let script = "mount -t tmpfs tmpfs /run && \
        if [ -n \"$J\" ]; then mkdir -p /run/systemd/journal && mount --bind \"$J\" /run/systemd/journal; fi && \
        exec \"$0\" \"$@\"";
    let mut all: Vec<&OsStr> = vec![
        OsStr::new("--mount"),
        OsStr::new("--propagation"),
        OsStr::new("private"),
        OsStr::new("sh"),
        OsStr::new("-c"),
        OsStr::new(script),
        OsStr::new(WATCHER),
    ];
    all.extend_from_slice(args);
    let mut env = env.to_vec();
    env.push(("J", journal_dir.map_or(OsStr::new(""), |d| d.as_os_str())));
    Unit::spawn(OsStr::new("unshare"), &all, &env, stderr)
}

/// Whether `line` holds an ISO-8601 timestamp (`2024-05-01T12:00:00`), as tracing's
/// format writes.
fn has_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.windows(16).any(|w| {
        let digits = |r: std::ops::Range<usize>| w[r].iter().all(u8::is_ascii_digit);
        digits(0..4)
            && w[4] == b'-'
            && digits(5..7)
            && w[7] == b'-'
            && digits(8..10)
            && w[10] == b'T'
            && digits(11..13)
            && w[13] == b':'
            && digits(14..16)
    })
}

/// A target that refuses connections: its rsync error spans several lines.
fn unreachable_target() -> String {
    format!("rsync://127.0.0.1:{}/m", free_port())
}

// ---------------------------------------------------------------------------------------
// Logging

/// Under systemd, with no journal socket to talk to, every line carries a syslog priority
/// prefix and no timestamp of ours, and rsync's multi-line error stays one line (one
/// journal entry, one priority).
#[test]
fn journal_stream_lines_have_priorities_and_no_timestamps() {
    let Some(_timer) = harness::begin("journal_stream_lines_have_priorities_and_no_timestamps")
    else {
        return;
    };
    let s = Scratch::new("svc-journal-prefix");
    write(&s.src.join("a"), "a");
    let stderr = s.path().join("stderr");
    write(&stderr, "");
    let stream = journal_stream(&stderr);
    let target = unreachable_target();
    let mut unit = spawn_in_namespace(
        &[OsStr::new("sync"), s.src.as_os_str(), OsStr::new(&target)],
        &[("JOURNAL_STREAM", OsStr::new(&stream))],
        None,
        &stderr,
    );
    unit.wait_for("ready targets=1", READY_TIMEOUT);
    unit.wait_for("rsync error", READY_TIMEOUT);
    unit.signal(Signal::SIGTERM);
    unit.wait_exit(STOP_TIMEOUT);
    let log = unit.log();
    for line in log.lines() {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| line.starts_with(p)),
            "a line without a priority prefix: {line:?}\n{log}"
        );
        assert!(!has_timestamp(line), "a timestamp of our own: {line:?}");
    }
    assert!(
        log.lines()
            .any(|l| l.starts_with("<6>") && l.contains("ready targets=1")),
        "{log}"
    );
    // rsync's error: a warning, its lines kept on one line (written as \n).
    let failure = log
        .lines()
        .find(|l| l.contains("rsync error"))
        .expect("the rsync failure");
    assert!(failure.starts_with("<4>"), "{failure}");
    assert!(failure.contains("\\n"), "{failure}");
    assert!(
        log.lines().any(|l| l.starts_with("<3>")),
        "the exit with changes not synced is an error:\n{log}"
    );
}

/// Without `JOURNAL_STREAM` naming stderr (another stream's, inherited by a child whose
/// stderr went elsewhere), the log keeps tracing's format with timestamps.
#[test]
fn journal_stream_of_another_file_is_ignored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let other = dir.path().join("other");
    write(&other, "");
    let stderr = dir.path().join("stderr");
    write(&stderr, "");
    let missing = dir.path().join("missing");
    let mut unit = Unit::spawn(
        OsStr::new(WATCHER),
        &[
            OsStr::new("sync"),
            missing.as_os_str(),
            dir.path().join("dst").as_os_str(),
        ],
        &[("JOURNAL_STREAM", OsStr::new(&journal_stream(&other)))],
        &stderr,
    );
    assert!(!unit.wait_exit(STOP_TIMEOUT).success());
    let log = unit.log();
    let line = log.lines().next().expect("an error line");
    assert!(has_timestamp(line) && line.contains("ERROR"), "{log}");
}

/// One journal entry, parsed from the native protocol.
type Entry = Vec<(String, Vec<u8>)>;

/// Parses a native-protocol datagram: `NAME=value\n`, or `NAME\n` + 64-bit LE length +
/// value + `\n`.
fn parse_entry(mut d: &[u8]) -> Entry {
    let mut fields = Vec::new();
    while !d.is_empty() {
        let end = d
            .iter()
            .position(|b| *b == b'=' || *b == b'\n')
            .expect("field name ends");
        let name = String::from_utf8(d[..end].to_vec()).expect("ASCII field name");
        if d[end] == b'=' {
            let rest = &d[end + 1..];
            let nl = rest.iter().position(|b| *b == b'\n').expect("value ends");
            fields.push((name, rest[..nl].to_vec()));
            d = &rest[nl + 1..];
        } else {
            let rest = &d[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().expect("length")) as usize;
            fields.push((name, rest[8..8 + len].to_vec()));
            assert_eq!(rest[8 + len], b'\n', "length-encoded value ends with \\n");
            d = &rest[8 + len + 1..];
        }
    }
    fields
}

fn field(entry: &Entry, name: &str) -> Option<String> {
    entry
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// Under systemd with journald's socket there, each event is one native entry: priority,
/// the message with its fields, and each field as WATCHER_<NAME>; a multi-line rsync error
/// is one entry. Nothing goes to stderr.
#[test]
fn journald_native_entries_carry_priority_and_fields() {
    let Some(_timer) = harness::begin("journald_native_entries_carry_priority_and_fields") else {
        return;
    };
    let s = Scratch::new("svc-journal-native");
    write(&s.src.join("a"), "a");
    let journal = s.path().join("journal");
    mkdir_p(&journal);
    let socket = UnixDatagram::bind(journal.join("socket")).expect("bind the journal socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let stderr = s.path().join("stderr");
    write(&stderr, "");
    let stream = journal_stream(&stderr);
    let target = unreachable_target();
    let mut unit = spawn_in_namespace(
        &[OsStr::new("sync"), s.src.as_os_str(), OsStr::new(&target)],
        &[("JOURNAL_STREAM", OsStr::new(&stream))],
        Some(&journal),
        &stderr,
    );
    let mut entries: Vec<Entry> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let has = |entries: &[Entry], prio: &str, needle: &str| {
        entries.iter().any(|e| {
            field(e, "PRIORITY").as_deref() == Some(prio)
                && field(e, "MESSAGE").is_some_and(|m| m.contains(needle))
        })
    };
    while !(has(&entries, "6", "ready targets=1") && has(&entries, "4", "rsync error")) {
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "entries so far: {entries:?}\nstderr: {}",
            unit.log()
        );
        if let Ok(n) = socket.recv(&mut buf)
            && n > 0
        {
            entries.push(parse_entry(&buf[..n]));
        }
    }
    unit.signal(Signal::SIGTERM);
    unit.wait_exit(STOP_TIMEOUT);
    while let Ok(n) = socket.recv(&mut buf) {
        if n > 0 {
            entries.push(parse_entry(&buf[..n]));
        }
    }
    for e in &entries {
        assert_eq!(field(e, "SYSLOG_IDENTIFIER").as_deref(), Some("watcher"));
        assert!(field(e, "CODE_FILE").is_some(), "{e:?}");
    }
    let watching = entries
        .iter()
        .find(|e| field(e, "MESSAGE").is_some_and(|m| m.starts_with("watching")))
        .expect("the `watching` entry");
    assert_eq!(field(watching, "PRIORITY").as_deref(), Some("6"));
    assert_eq!(field(watching, "WATCHER_GROUP").as_deref(), Some("sync"));
    assert!(
        field(watching, "MESSAGE").is_some_and(|m| m.contains("group=sync")),
        "the message text carries the fields too: {watching:?}"
    );
    let failure = entries
        .iter()
        .find(|e| field(e, "MESSAGE").is_some_and(|m| m.contains("rsync error")))
        .expect("the rsync failure");
    let message = field(failure, "MESSAGE").expect("MESSAGE");
    assert!(message.contains('\n'), "one entry, lines kept: {message:?}");
    assert_eq!(field(failure, "PRIORITY").as_deref(), Some("4"));
    assert_eq!(
        field(failure, "WATCHER_TARGET").as_deref(),
        Some(target.as_str())
    );
    assert!(
        entries
            .iter()
            .any(|e| field(e, "PRIORITY").as_deref() == Some("3")),
        "the exit with changes not synced is an error"
    );
    assert_eq!(
        unit.log(),
        "",
        "nothing on stderr when journald takes the entries"
    );
}

/// The same against the machine's own journald, when it runs: entries of this process
/// with a priority, found by `journalctl`.
#[test]
fn journald_on_this_machine_takes_native_entries() {
    if !Path::new(watcher::logging::JOURNAL_SOCKET).exists() {
        // Under CI too: a machine without journald has nothing to test against (the
        // protocol itself is tested against a socket of the test's own above).
        eprintln!(
            "skipping journald_on_this_machine_takes_native_entries: no {} (journald is not \
             running on this machine)",
            watcher::logging::JOURNAL_SOCKET
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let stderr = dir.path().join("stderr");
    write(&stderr, "");
    let stream = journal_stream(&stderr);
    let missing = dir.path().join("missing");
    let mut unit = Unit::spawn(
        OsStr::new(WATCHER),
        &[
            OsStr::new("sync"),
            missing.as_os_str(),
            dir.path().join("dst").as_os_str(),
        ],
        &[("JOURNAL_STREAM", OsStr::new(&stream))],
        &stderr,
    );
    assert!(!unit.wait_exit(STOP_TIMEOUT).success());
    assert_eq!(unit.log(), "", "the error went to journald, not stderr");
    let pid = unit.child.id().to_string();
    let found = harness::poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let out = Command::new("journalctl")
            .args(["--no-pager", "-o", "export", &format!("_PID={pid}")])
            .output()
            .expect("journalctl");
        let text = String::from_utf8_lossy(&out.stdout);
        text.contains("PRIORITY=3") && text.contains("SYSLOG_IDENTIFIER=watcher")
    });
    assert!(
        found,
        "no entry of pid {pid} with PRIORITY=3 in the journal"
    );
}

// ---------------------------------------------------------------------------------------
// Readiness and status

/// Everything the daemon sent to the notify socket, each with when it arrived.
fn receive(
    socket: &UnixDatagram,
    until: Duration,
    mut done: impl FnMut(&str) -> bool,
) -> Vec<(Instant, String)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    while start.elapsed() < until {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let stop = done(&text);
            got.push((Instant::now(), text));
            if stop {
                break;
            }
        }
    }
    got
}

/// READY=1 comes as soon as the marks are set, before the initial sync of a tree has
/// copied anything; STATUS= lines follow it: the initial sync, then "in step".
#[test]
fn ready_when_capture_is_armed_then_status_lines() {
    let Some(_timer) = harness::begin("ready_when_capture_is_armed_then_status_lines") else {
        return;
    };
    let s = Scratch::new("svc-notify");
    let total = populate(&s.src, 40, 250, "notify");
    let notify = s.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let stderr = s.path().join("stderr");
    write(&stderr, "");
    let mut args: Vec<&OsStr> = vec![OsStr::new("sync"), s.src.as_os_str(), s.dst.as_os_str()];
    let backend = service::backend();
    if backend != "auto" {
        args.extend([OsStr::new("--backend"), OsStr::new(&backend)]);
    }
    let started = Instant::now();
    let mut unit = Unit::spawn(
        OsStr::new(WATCHER),
        &args,
        &[("NOTIFY_SOCKET", notify.as_os_str())],
        &stderr,
    );
    let mut at_ready: Option<(usize, bool)> = None;
    let got = receive(&socket, Duration::from_secs(180), |text| {
        if text.lines().any(|l| l == "READY=1") && at_ready.is_none() {
            at_ready = Some((
                count_files(&s.dst),
                std::fs::read_to_string(&stderr)
                    .unwrap_or_default()
                    .contains("initial sync done"),
            ));
        }
        text.lines().any(|l| l == "STATUS=in step")
    });
    let texts: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
    let ready = texts
        .iter()
        .position(|t| t.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1: {texts:?}\n{}", unit.log()));
    let initial = texts
        .iter()
        .position(|t| t.contains("STATUS=initial sync: 0 of 1 target in step"))
        .unwrap_or_else(|| panic!("no initial sync status: {texts:?}"));
    let in_step = texts
        .iter()
        .position(|t| t.contains("STATUS=in step"))
        .unwrap_or_else(|| panic!("no `in step` status: {texts:?}\n{}", unit.log()));
    assert!(ready <= initial && initial < in_step, "{texts:?}");
    let (copied, synced) = at_ready.expect("READY seen");
    assert!(
        copied < total && !synced,
        "READY=1 came after the initial sync ({copied} of {total} files copied)"
    );
    let ready_after = got[ready].0 - started;
    let in_step_after = got[in_step].0 - started;
    eprintln!("READY=1 after {ready_after:.1?}, in step after {in_step_after:.1?} ({total} files)");
    assert_eq!(count_files(&s.dst), total);
    unit.wait_for("initial sync done", READY_TIMEOUT);
    unit.wait_for(READY, READY_TIMEOUT);
    unit.signal(Signal::SIGTERM);
    let stopping = receive(&socket, STOP_TIMEOUT, |t| t.contains("STOPPING=1"));
    assert!(
        stopping.iter().any(|(_, t)| t.contains("STOPPING=1")),
        "{stopping:?}"
    );
    assert!(unit.wait_exit(STOP_TIMEOUT).success(), "{}", unit.log());
}

// ---------------------------------------------------------------------------------------
// A prompt stop

/// Files in `dir` (not below) whose name starts with `prefix`.
fn entries_starting(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|d| {
            let mut s = String::new();
            std::fs::File::open(d.path().join("cmdline"))
                .and_then(|mut f| f.read_to_string(&mut s))
                .ok()?;
            let s = s.replace('\0', " ");
            s.contains(needle).then_some(s)
        })
        .collect()
}

/// SIGTERM during a long verify pass: the pass stops at once (its rsync gets SIGTERM and
/// removes its temporary file), the daemon exits 0 without a warning, and the next start
/// finds a clean journal.
#[test]
fn sigterm_stops_a_verify_pass_at_once() {
    let Some(_timer) = harness::begin("sigterm_stops_a_verify_pass_at_once") else {
        return;
    };
    let s = Scratch::new("svc-verify-stop");
    populate(&s.src, 2, 10, "verify-stop");
    // 48 MiB at 2 MB/s: the verify pass's copy takes about 25 s unless stopped.
    let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let big: Vec<u8> = (0..48).flat_map(|_| chunk.iter().copied()).collect();
    write(&s.src.join("big.bin"), &big);
    let config = s.path().join("watcher.toml");
    let text = format!(
        "[daemon]\nbackend = {}\nstate_dir = {}\nstatus_socket = {}\n\n\
         [[sync]]\nname = \"big\"\nsource = {}\ninitial_sync = false\nverify_interval = \"1s\"\n\
         rsync_args = [\"--bwlimit=2000\"]\n\n[[sync.target]]\nname = \"replica\"\ndest = {}\n",
        toml_str(&service::backend()),
        toml_str(s.path().join("state").to_str().expect("UTF-8")),
        toml_str(s.path().join("status.sock").to_str().expect("UTF-8")),
        toml_str(s.src.to_str().expect("UTF-8")),
        toml_str(s.dst.to_str().expect("UTF-8")),
    );
    write_config_text(&config, &text);
    let mut d = Service::start_run(&config, READY_TIMEOUT);
    // The verify pass is copying big.bin (rsync's temporary file is there).
    let copying = harness::poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        !entries_starting(&s.dst, ".big.bin.").is_empty()
    });
    assert!(
        copying,
        "no verify pass copying big.bin:\n{}",
        d.log.tail(20)
    );
    let sent = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(STOP_TIMEOUT);
    let took = sent.elapsed();
    eprintln!("exit {took:.1?} after SIGTERM during the verify pass");
    assert!(status.success(), "exit {status}:\n{}", d.log.tail(30));
    assert!(took < Duration::from_secs(5), "the stop took {took:?}");
    assert!(d.log.contains("verify pass stopped"), "{}", d.log.tail(30));
    let noisy: Vec<String> = d
        .log
        .lines()
        .into_iter()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(noisy.is_empty(), "warnings or errors: {noisy:?}");
    assert!(
        entries_starting(&s.dst, ".big.bin.").is_empty(),
        "rsync left its temporary file"
    );
    let dst = s.dst.to_str().expect("UTF-8");
    assert!(
        processes_mentioning(dst).is_empty(),
        "left running: {:?}",
        processes_mentioning(dst)
    );
    // The journal was closed cleanly: no whole-tree re-sync on the next start.
    let mut again = Service::start_run(&config, READY_TIMEOUT);
    assert!(!again.log.contains(UNCLEAN), "{}", again.log.tail(20));
    again.signal(Signal::SIGTERM);
    assert!(again.wait_exit(STOP_TIMEOUT).success());
}

// ---------------------------------------------------------------------------------------
// The unit file

/// contrib/watcher.service, with the binary's path pointed at `binary`.
fn unit_with_binary(binary: &Path) -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/watcher.service");
    std::fs::read_to_string(&unit)
        .unwrap_or_else(|e| panic!("read {}: {e}", unit.display()))
        .replace("/usr/local/bin/watcher", binary.to_str().expect("UTF-8"))
}

/// `systemd-analyze verify` accepts the unit (with a copy of the binary where it points,
/// and the man pages it names) and `systemd-analyze security` rates it at most 4.5. Neither needs a running systemd.
#[test]
fn unit_file_verifies_and_is_hardened() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        let reason =
            "unit_file_verifies_and_is_hardened: no systemd-analyze (apt-get install systemd)";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{reason}");
        }
        eprintln!("skipping {reason}");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = dir.path().join("watcher");
    std::fs::copy(WATCHER, &binary).expect("copy the binary");
    let unit = dir.path().join("watcher.service");
    write(&unit, unit_with_binary(&binary));
    // Documentation= names our man pages: verify looks them up, in the ones the binary
    // writes (and, past the trailing colon, man's default path, for rsync(1)).
    let man = dir.path().join("man");
    let out = Command::new(&binary)
        .arg("man")
        .arg("--dir")
        .arg(man.join("man1"))
        .output()
        .expect("watcher man --dir");
    assert!(out.status.success(), "{out:?}");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("MANPATH", format!("{}:", man.display()))
        .output()
        .expect("systemd-analyze verify");
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && said.trim().is_empty(),
        "verify: {said}"
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            let rest = l
                .split("Overall exposure level for watcher.service:")
                .nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
    eprintln!("systemd-analyze security: {score}");
    assert!(score <= 4.5, "exposure {score} > 4.5:\n{text}");
    for setting in ["KillMode=mixed", "NoNewPrivileges=yes", "UMask=0077"] {
        assert!(
            unit_with_binary(&binary).lines().any(|l| l == setting),
            "{setting} missing"
        );
    }
}
