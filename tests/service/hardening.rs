//! Regression tests of defects an outside review found: a dry run that changed things, a
//! reload that could kill the daemon, a source root swapped under the daemon, targets
//! created before the checks passed or where a mount point should be.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::harness::{self, Daemon, READY_TIMEOUT, STOP_TIMEOUT, Scratch, args};
use crate::service::{Service, TargetSpec, run_watcher};
use crate::tree::{skip_nothing, wait_converged};
use crate::{CONVERGE_TIMEOUT, UNCLEAN, mkdir_p, one_group_config, populate, write};

/// `--dry-run` creates no directory and leaves the journal alone: after a crash, a dry run
/// must not mark the journal clean, or the next real start would skip the re-sync and
/// lose what changed while no daemon ran.
#[test]
fn a_dry_run_changes_nothing() {
    let Some(_timer) = harness::begin("a_dry_run_changes_nothing") else {
        return;
    };
    let s = Scratch::new("svc-dry-run");
    populate(&s.src.join("base"), 2, 5, "base");

    // No target directory, not even its missing parents.
    let deep = s.path().join("new/a/b/c");
    let mut d = Daemon::spawn(&s.src, &deep, &args(&["--dry-run"]));
    d.wait_for_line("ready", READY_TIMEOUT);
    write(&s.src.join("base/after-ready"), "x\n");
    d.wait_for_line("dry run:", Duration::from_secs(30));
    d.stop();
    assert!(
        !s.path().join("new").exists(),
        "a dry run created the target directory"
    );

    // A crash, then a dry run of the service, then a real start: the real start must still
    // see the unclean stop.
    let (config, _) = one_group_config(&s);
    let mut d = Service::start_run(&config, READY_TIMEOUT);
    d.kill9();
    write(
        &s.src.join("base/while-down"),
        "changed while no daemon ran\n",
    );
    let mut dry = Daemon::spawn_with(&[
        "run".into(),
        "--config".into(),
        config.clone().into(),
        "--dry-run".into(),
    ]);
    dry.wait_for_line("ready", READY_TIMEOUT);
    dry.stop();
    assert!(
        !s.dst.join("base/while-down").exists(),
        "the dry run changed the replica"
    );
    let d = Service::start_run(&config, READY_TIMEOUT);
    assert!(
        d.log.contains(UNCLEAN),
        "after crash + dry run, the real start did not re-sync; last lines:\n{}",
        d.log.tail(30)
    );
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "a_dry_run_changes_nothing",
    );
    d.stop();
}

/// A reload whose new target cannot open its journal, or that moves the state directory,
/// keeps the running configuration (and says why) instead of exiting.
#[test]
fn a_failed_reload_keeps_the_daemon_running() {
    let Some(_timer) = harness::begin("a_failed_reload_keeps_the_daemon_running") else {
        return;
    };
    let ctx = "a_failed_reload_keeps_the_daemon_running";
    let s = Scratch::new("svc-reload-fail");
    populate(&s.src.join("base"), 2, 5, "base");
    let (config, mut spec) = one_group_config(&s);
    let mut d = Service::start_run(&config, READY_TIMEOUT);

    // The new target's lock file is a symlink someone planted: the journal refuses it.
    let name = watcher::journal::file_name(&watcher::journal::target_key("data", "second"));
    let victim = s.path().join("victim");
    std::os::unix::fs::symlink(&victim, spec.state_dir.join(format!("{name}.lock")))
        .expect("plant symlink");
    let dst2 = s.path().join("dst2");
    spec.groups[0]
        .targets
        .push(TargetSpec::local("second", &dst2));
    spec.write(&config);
    d.signal(Signal::SIGHUP);
    d.wait_for_line("reload failed", Duration::from_secs(30));
    assert!(!victim.exists(), "{ctx}: the planted symlink was followed");
    assert!(
        !dst2.exists(),
        "{ctx}: the refused target's directory was created"
    );

    // The old engine still syncs.
    write(&s.src.join("base/after-failed-reload"), "x\n");
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);

    // Moving the state directory is refused clearly.
    spec.groups[0].targets.pop();
    spec.state_dir = s.path().join("elsewhere");
    spec.write(&config);
    d.signal(Signal::SIGHUP);
    d.wait_for_count("reload failed", 2, Duration::from_secs(30));
    assert!(
        d.log.contains("state_dir changed"),
        "{ctx}: the refusal does not say why; last lines:\n{}",
        d.log.tail(20)
    );
    write(&s.src.join("base/after-second-reload"), "y\n");
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);
    d.stop();
}

/// A source root replaced by a symlink is not followed: files from elsewhere never reach
/// the replica, and the group stops with an error.
#[test]
fn a_source_root_swapped_for_a_symlink_is_not_followed() {
    let Some(_timer) = harness::begin("a_source_root_swapped_for_a_symlink_is_not_followed") else {
        return;
    };
    let s = Scratch::new("svc-root-swap");
    let src = s.path().join("root");
    mkdir_p(&src);
    populate(&src, 2, 5, "base");
    let mut d = Daemon::start(&src, &s.dst, &[]);
    let elsewhere = s.path().join("elsewhere");
    mkdir_p(&elsewhere);
    write(&elsewhere.join("secret"), "not part of the source\n");
    std::fs::rename(&src, s.path().join("root.old")).expect("move root away");
    std::os::unix::fs::symlink(&elsewhere, &src).expect("symlink over root");
    write(&src.join("via-link"), "written through the symlink\n");
    d.wait_for_line("no longer synced", Duration::from_secs(30));
    let status = d.wait_exit(STOP_TIMEOUT);
    assert_eq!(status.code(), Some(1), "its only target stopped: exit 1");
    for name in ["secret", "via-link"] {
        assert!(
            !s.dst.join(name).exists(),
            "{name} from outside the source reached the replica"
        );
    }
}

/// A local target whose parent is missing (an unmounted mount point?) is refused, and a
/// refused target is never created.
#[test]
fn targets_are_created_only_after_every_check() {
    let Some(_timer) = harness::begin("targets_are_created_only_after_every_check") else {
        return;
    };
    let s = Scratch::new("svc-create-late");
    let missing = s.path().join("not-mounted/replica");
    let out = run_watcher(
        &[
            OsStr::new("sync"),
            s.src.as_os_str(),
            missing.as_os_str(),
            OsStr::new("--no-initial-sync"),
        ],
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "a missing parent was accepted");
    assert!(
        out.stderr.contains("does not exist"),
        "unclear refusal: {}",
        out.stderr
    );
    assert!(!s.path().join("not-mounted").exists());

    let inside = s.src.join("new");
    let out = run_watcher(
        &[OsStr::new("sync"), s.src.as_os_str(), inside.as_os_str()],
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success(),
        "a target inside the source was accepted"
    );
    assert!(
        !inside.exists(),
        "the refused target was created: {}",
        out.stderr
    );
    check_dir_untouched(&s.dst);
}

fn check_dir_untouched(dir: &Path) {
    let entries = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(entries, 0, "{} was written to", dir.display());
}

/// Clears the immutable flag it set, whatever happens to the test.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: &Path) -> Immutable {
        let status = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .expect("run chattr");
        assert!(status.success(), "chattr +i {}", path.display());
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

fn target_status(socket: &Path) -> watcher::status::TargetStatus {
    let snapshot =
        watcher::status::query(socket, Duration::from_secs(5)).expect("query the status socket");
    snapshot.groups[0].targets[0].clone()
}

/// A path rsync keeps failing on (here a replica directory made immutable, so nothing can
/// be created in it) is set aside: the rest keeps syncing, the target is in step apart
/// from it, status names it with the error, and once it can be written it syncs again.
#[test]
fn a_lasting_partial_failure_is_set_aside_not_retried_forever() {
    let Some(_timer) = harness::begin("a_lasting_partial_failure_is_set_aside_not_retried_forever")
    else {
        return;
    };
    let ctx = "a_lasting_partial_failure_is_set_aside_not_retried_forever";
    let s = Scratch::new("svc-set-aside");
    mkdir_p(&s.src.join("locked"));
    write(&s.src.join("locked/a"), "a\n");
    mkdir_p(&s.src.join("other"));
    let (config, spec) = one_group_config(&s);
    let mut d = Service::start_run(&config, READY_TIMEOUT);
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);

    let lock = Immutable::set(&s.dst.join("locked"));
    // One batch, two rsync runs: the new directory's (recursive, first) fails; the run of
    // lone changes after it still goes, in the same batch (written first, so it is in the
    // failing batch or an earlier one, never a later one).
    write(&s.src.join("other/c"), "syncs all the same\n");
    write(
        &s.src.join("locked/new"),
        "cannot be created on the replica\n",
    );
    mkdir_p(&s.src.join("locked/newdir"));
    write(&s.src.join("locked/newdir/f"), "nor can this\n");
    d.wait_for_line("rsync cannot sync this path", Duration::from_secs(30));
    assert!(
        s.dst.join("other/c").exists(),
        "{ctx}: a failing run held back the batch's later runs\n{}",
        d.log.tail(30)
    );
    let mut seen = None;
    let set_aside =
        harness::poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            let t = target_status(&spec.status_socket);
            let done = s.dst.join("other/c").exists()
                && t.failing_paths.iter().any(|f| f.path == "locked/new")
                && t.state == watcher::status::TargetState::InStep
                && t.consecutive_failures == 0;
            seen = Some(t);
            done
        });
    assert!(
        set_aside,
        "{ctx}: the failing path was not set aside with the target in step: {seen:#?}\n{}",
        d.log.tail(30)
    );
    let failing = seen.expect("a status");
    let f = failing
        .failing_paths
        .iter()
        .find(|f| f.path == "locked/new")
        .expect("listed");
    assert!(
        f.error.contains("Operation not permitted"),
        "{ctx}: rsync's reason is kept: {f:?}"
    );
    assert_eq!(
        d.log.count("rsync cannot sync this path"),
        failing.failing_paths_total as usize,
        "{ctx}: each failing path is logged once"
    );

    // Writable again: it syncs on a later try, and the set empties.
    drop(lock);
    let recovered =
        harness::poll_until(Duration::from_secs(90), Duration::from_millis(200), || {
            s.dst.join("locked/new").exists()
                && target_status(&spec.status_socket).failing_paths_total == 0
        });
    assert!(
        recovered,
        "{ctx}: the path never synced again\n{}",
        d.log.tail(30)
    );
    d.wait_for_line("syncs again", Duration::from_secs(10));
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);
    d.stop();
}

/// `watcher check` exits non-zero when no backend can watch a path it was given, and
/// reports the capabilities the process really holds (not "CAP_SYS_ADMIN held" for a
/// user who merely got fanotify_init to work).
#[test]
fn check_tells_the_truth_about_paths_and_privileges() {
    let Some(_timer) = harness::begin("check_tells_the_truth_about_paths_and_privileges") else {
        return;
    };
    let s = Scratch::new("svc-check");
    let out = run_watcher(
        &[OsStr::new("check"), s.src.as_os_str()],
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "root, an ext4 path: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("CAP_SYS_ADMIN        yes"),
        "{}",
        out.stdout
    );

    let missing = s.path().join("no-such-dir");
    let out = run_watcher(
        &[OsStr::new("check"), missing.as_os_str()],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("no backend can watch"),
        "{}",
        out.stderr
    );

    // As an unprivileged user, on a directory it cannot read.
    use std::os::unix::process::CommandExt;
    let private = s.path().join("private");
    mkdir_p(&private);
    crate::chmod(&private, 0o700);
    let out = std::process::Command::new(harness::WATCHER)
        .arg("check")
        .arg(&private)
        .uid(65534)
        .gid(65534)
        .env_remove("RUST_LOG")
        .output()
        .expect("run watcher check as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("CAP_SYS_ADMIN        no"), "{stdout}");
    assert!(!stdout.contains("CAP_SYS_ADMIN held"), "{stdout}");
    assert!(stderr.contains("no backend can watch"), "{stderr}");
}
