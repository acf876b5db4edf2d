//! ssh targets against a real sshd: an outage in the middle of churn, and the start-up
//! checks' messages for the failures a new setup meets first.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::churn::{Churn, Pace};
use crate::harness::{self, Daemon, QUEUE_LIMIT_LOCK, READY_TIMEOUT, Scratch, WATCHER, args};
use crate::sshd::{self, Sshd};
use crate::tree::{assert_equal_now, skip_nothing, wait_converged};
use crate::{CONVERGE_TIMEOUT, mark_root};

/// A TOML string (basic string, escapes as TOML wants them).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("json string")
}

/// `watcher run` syncing `src` to the target `offsite`, `dst` on `server`, and to the local
/// target `local` when given, with its state and `status.sock` in `dir`; once ready.
fn start_offsite(
    dir: &Path,
    src: &Path,
    dst: &Path,
    server: &Sshd,
    local: Option<&Path>,
) -> Daemon {
    let ssh: Vec<String> = server.ssh_command().iter().map(|a| toml_str(a)).collect();
    let backend = harness::backend()
        .map(|b| format!("backend = {}\n", toml_str(&b)))
        .unwrap_or_default();
    let local = local
        .map(|l| {
            format!(
                "\n[[sync.target]]\nname = \"local\"\ndest = {}\n",
                toml_str(&l.display().to_string())
            )
        })
        .unwrap_or_default();
    let config = format!(
        "[daemon]\n{backend}state_dir = {state}\nstatus_socket = {socket}\n\n\
         [[sync]]\nname = \"data\"\nsource = {src}\n\n\
         [[sync.target]]\nname = \"offsite\"\ndest = {dest}\nssh = [{ssh}]\n{local}",
        state = toml_str(&dir.join("state").display().to_string()),
        socket = toml_str(&dir.join("status.sock").display().to_string()),
        src = toml_str(&src.display().to_string()),
        dest = toml_str(&server.dest(dst)),
        ssh = ssh.join(", "),
    );
    let config_path = dir.join("watcher.toml");
    std::fs::write(&config_path, config).expect("write config");
    let _start = QUEUE_LIMIT_LOCK.read().unwrap_or_else(|e| e.into_inner());
    let mut d = Daemon::spawn_with(&[OsString::from("run"), "--config".into(), config_path.into()]);
    d.wait_for_line("ready", READY_TIMEOUT);
    d
}

/// The `ssh` target of group `data`, as the status socket reports it.
fn ssh_status(socket: &Path) -> Option<serde_json::Value> {
    let out = Command::new(WATCHER)
        .args(["status", "--json", "--socket"])
        .arg(socket)
        .output()
        .ok()?;
    let snapshot: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    snapshot["groups"][0]["targets"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == "offsite")
        .map(|t| t["ssh"].clone())
}

/// sshd (and every connection it serves) killed in the middle of churn, started again:
/// the ssh replica is exact afterwards, the local target never waited for it, and the
/// connection was made again once (status and the server's log agree).
#[test]
fn ssh_outage_mid_churn_recovers() {
    let test = "ssh_outage_mid_churn_recovers";
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    if !sshd::available_or_skip(test) {
        return;
    }
    let seed = harness::seed(test);
    let ctx = format!("{test}, seed {seed}");
    let s = Scratch::new("ssh-outage");
    let local = s.path().join("local");
    std::fs::create_dir(&local).expect("mkdir local");
    let mut server = Sshd::start(&s.path().join("sshd"));
    let mut churn = Churn::new(&s.src, seed);
    churn.populate(150);
    mark_root(&s.src);

    let socket = s.path().join("status.sock");
    let mut d = start_offsite(s.path(), &s.src, &s.dst, &server, Some(&local));
    for dst in [&s.dst, &local] {
        assert_equal_now(&s.src, dst, &skip_nothing, &format!("{ctx}: after `ready`"));
    }

    churn.run(600, Pace::Spread);
    server.stop();
    churn.run(600, Pace::Spread);
    // The local target does not wait for the one that is down.
    wait_converged(
        &s.src,
        &local,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        &format!("{ctx}: local target during the outage"),
    );
    let down = harness::poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        ssh_status(&socket).is_some_and(|c| c["up"] == false)
    });
    assert!(down, "{ctx}: status never showed the ssh connection down");
    d.wait_for_line("cannot reach the host", Duration::from_secs(60));

    server.start_again();
    churn.run(600, Pace::Spread);
    for dst in [&s.dst, &local] {
        wait_converged(&s.src, dst, CONVERGE_TIMEOUT, &skip_nothing, &ctx);
    }
    let up = harness::poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
        ssh_status(&socket).is_some_and(|c| c["up"] == true)
    });
    let status = ssh_status(&socket).expect("status of the ssh target");
    assert!(
        up,
        "{ctx}: status never showed the connection up again: {status}"
    );
    let reconnects = status["reconnects"].as_u64().expect("reconnects");
    assert!(reconnects >= 1, "{ctx}: no reconnect counted: {status}");
    assert_eq!(
        server.accepted() as u64,
        1 + reconnects,
        "{ctx}: one authentication per connection made ({status})"
    );
    d.stop();
    for dst in [&s.dst, &local] {
        assert_equal_now(&s.src, dst, &skip_nothing, &format!("{ctx}: after stop"));
    }
}

/// `watcher sync` to `server` with `rsh` as the ssh command: the daemon exits at start-up
/// with a message holding each of `want`.
fn refused_at_start(test: &str, s: &Scratch, server: &Sshd, rsh: &[String], want: &[&str]) {
    let out = Command::new(WATCHER)
        .arg("sync")
        .arg(&s.src)
        .arg(server.dest(&s.dst))
        .arg(format!("--rsync-arg=--rsh={}", rsh.join(" ")))
        .env("RUST_LOG", "info")
        .output()
        .expect("run watcher");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{test}: started anyway:\n{stderr}");
    for w in want {
        assert!(stderr.contains(w), "{test}: {w:?} missing from:\n{stderr}");
    }
    assert!(!stderr.contains("ready"), "{test}: became ready:\n{stderr}");
}

/// The ssh command of `server` with one option replaced.
fn with(server: &Sshd, option: &str, value: String) -> Vec<String> {
    let mut cmd = server.ssh_command();
    let i = cmd
        .iter()
        .position(|a| a.starts_with(option))
        .expect(option);
    cmd[i] = value;
    cmd
}

#[test]
fn ssh_unknown_host_key_is_refused_at_start() {
    let test = "ssh_unknown_host_key_is_refused_at_start";
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    if !sshd::available_or_skip(test) {
        return;
    }
    let s = Scratch::new("ssh-hostkey");
    let server = Sshd::start(&s.path().join("sshd"));
    let empty = s.path().join("empty_known_hosts");
    std::fs::write(&empty, "").expect("empty known_hosts");
    let rsh = with(
        &server,
        "UserKnownHostsFile=",
        format!("UserKnownHostsFile={}", empty.display()),
    );
    let host = format!("ssh root@127.0.0.1 port {}", server.port);
    refused_at_start(test, &s, &server, &rsh, &[&host, "host key is not known"]);
    assert_eq!(
        server.accepted(),
        0,
        "{test}: authenticated to an unknown host"
    );
}

#[test]
fn ssh_refused_authentication_is_reported_at_start() {
    let test = "ssh_refused_authentication_is_reported_at_start";
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    if !sshd::available_or_skip(test) {
        return;
    }
    let s = Scratch::new("ssh-auth");
    let server = Sshd::start(&s.path().join("sshd"));
    let stranger = s.path().join("stranger");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&stranger)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    let rsh = with(&server, "/", stranger.display().to_string());
    let host = format!("ssh root@127.0.0.1 port {}", server.port);
    refused_at_start(test, &s, &server, &rsh, &[&host, "authentication refused"]);
}

/// A host that does not answer is no reason to refuse to start (it may come back): the
/// daemon says why in the log, keeps retrying, and each failed run names the cause.
#[test]
fn ssh_unreachable_port_is_reported_and_retried() {
    let test = "ssh_unreachable_port_is_reported_and_retried";
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    let s = Scratch::new("ssh-unreachable");
    let port = crate::rsyncd::free_port();
    let rsh = format!("--rsync-arg=--rsh=ssh -p {port} -o UserKnownHostsFile=/dev/null");
    let mut d = Daemon::spawn(
        &s.src,
        format!("root@127.0.0.1:{}", s.dst.display()),
        &args(&[&rsh]),
    );
    let host = format!("ssh root@127.0.0.1 port {port}: cannot reach the host");
    d.wait_for_line(&host, Duration::from_secs(60));
    d.wait_for_line("Connection refused", Duration::from_secs(5));
    // Not given up: retried (the first run fails at once, the next after the backoff).
    d.wait_for_count(&host, 3, Duration::from_secs(60));
    d.wait_for_line("ready", Duration::from_secs(5));
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(60));
    // Exiting with the initial sync not done is a failure.
    assert!(
        !status.success(),
        "{test}: exit {status} with nothing synced"
    );
}

/// Renames in the source are renames on the ssh replica too, done over the target's
/// connection before rsync runs, with names no remote shell may read as anything but
/// names: the replica's files keep their inode numbers (the replica is on this machine).
#[test]
fn ssh_renames_are_replayed_with_hostile_names() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let test = "ssh_renames_are_replayed_with_hostile_names";
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    if !sshd::available_or_skip(test) {
        return;
    }
    let s = Scratch::new("ssh-renames");
    let server = Sshd::start(&s.path().join("sshd"));
    let src = &s.src;
    let old = src.join("dir 'a' $(touch pwned)");
    std::fs::create_dir(&old).expect("mkdir");
    for i in 0..50 {
        std::fs::write(old.join(format!("f{i:02}")), format!("{i}\n").repeat(1000)).expect("write");
    }
    std::fs::write(src.join("-file\n`touch pwned`"), "x".repeat(1 << 16)).expect("write");
    let mut d = start_offsite(s.path(), src, &s.dst, &server, None);
    wait_converged(src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, test);
    let ino = |p: &Path| std::fs::symlink_metadata(p).expect("stat").ino();
    let dst_old = s.dst.join(old.file_name().expect("name"));
    let before = (
        ino(&dst_old.join("f07")),
        ino(&s.dst.join("-file\n`touch pwned`")),
    );

    let new_dir = std::ffi::OsStr::from_bytes(b"renamed \"$HOME\" \\ \xff\n");
    std::fs::rename(&old, src.join(new_dir)).expect("mv dir");
    std::fs::rename(
        src.join("-file\n`touch pwned`"),
        src.join("-file; rm -rf x"),
    )
    .expect("mv file");
    wait_converged(src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, test);
    assert!(!s.dst.join("pwned").exists() && !src.join("pwned").exists());
    if std::env::var("WATCHER_E2E_EBPF_PROBES").as_deref() == Ok("vfs") {
        eprintln!("{test}: the ebpf VFS probes report renames as two halves: exactness checked");
        d.stop();
        return;
    }
    let after = (
        ino(&s.dst.join(new_dir).join("f07")),
        ino(&s.dst.join("-file; rm -rf x")),
    );
    assert_eq!(
        after, before,
        "{test}: the ssh replica's files were copied, not renamed"
    );
    d.wait_for_line("renames replayed on the replica", Duration::from_secs(5));
    d.stop();
}
