//! What lsyncd users look for. `post_sync`: the target's command runs after each batch
//! that landed, with the synced paths on stdin (NUL-ended), without a shell; a failing
//! command is logged and counted and changes nothing about the syncing. `max_processes`:
//! no more rsync runs at once than it says, over every target.

use std::time::Duration;

use crate::harness::{self, READY_TIMEOUT, Scratch};
use crate::service::{ConfigSpec, GroupSpec, Service, TargetSpec, write_config_text};
use crate::tree::{skip_nothing, wait_converged};
use crate::{CONVERGE_TIMEOUT, mkdir_p, write};

fn target_status(socket: &std::path::Path, name: &str) -> watcher::status::TargetStatus {
    let snapshot =
        watcher::status::query(socket, Duration::from_secs(5)).expect("query the status socket");
    snapshot.groups[0]
        .targets
        .iter()
        .find(|t| t.name == name)
        .expect("the target")
        .clone()
}

#[test]
fn post_sync_gets_the_synced_paths_and_its_failures_are_counted() {
    let Some(_timer) =
        harness::begin("post_sync_gets_the_synced_paths_and_its_failures_are_counted")
    else {
        return;
    };
    let ctx = "post_sync_gets_the_synced_paths_and_its_failures_are_counted";
    let s = Scratch::new("svc-post-sync");
    let got = s.path().join("post-sync.out");
    let other = s.path().join("dst-other");
    mkdir_p(&other);
    let config = s.path().join("watcher.toml");
    let mut spec = ConfigSpec::in_dir(s.path());
    let mut logged = TargetSpec::local("logged", &s.dst);
    // An argument vector: tee appends what it reads to the file named.
    logged.post_sync = vec![
        "/usr/bin/tee".into(),
        "-a".into(),
        got.to_str().expect("UTF-8 temp path").into(),
    ];
    let mut failing = TargetSpec::local("failing", &other);
    failing.post_sync = vec!["/bin/false".into()];
    spec.groups
        .push(GroupSpec::new("data", &s.src, vec![logged, failing]));
    spec.write(&config);
    let mut d = Service::start_run(&config, READY_TIMEOUT);

    write(&s.src.join("a"), "a\n");
    write(&s.src.join("odd\nname"), "a newline in a name\n");
    mkdir_p(&s.src.join("dir/sub"));
    write(&s.src.join("dir/sub/f"), "f\n");
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);
    wait_converged(&s.src, &other, CONVERGE_TIMEOUT, &skip_nothing, ctx);

    let names_all = || {
        let bytes = std::fs::read(&got).unwrap_or_default();
        let names: Vec<Vec<u8>> = bytes
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        let has = |n: &[u8]| names.iter().any(|x| x == n);
        // The new directory goes as a subtree (or its file on its own, if the batch
        // saw the file first).
        has(b"a") && has(b"odd\nname") && (has(b"dir/") || has(b"dir/sub/") || has(b"dir/sub/f"))
    };
    assert!(
        harness::poll_until(
            Duration::from_secs(20),
            Duration::from_millis(50),
            names_all
        ),
        "{ctx}: post_sync did not get every synced path: {:?}\n{}",
        String::from_utf8_lossy(&std::fs::read(&got).unwrap_or_default()),
        d.log.tail(30)
    );

    // The failing command: logged with its exit, counted, and its target in step all the same.
    d.wait_for_line("post_sync command failed: exit 1", Duration::from_secs(20));
    let failed = target_status(&spec.status_socket, "failing");
    assert!(
        failed.post_sync_failures >= 1 && failed.post_sync_runs >= failed.post_sync_failures,
        "{ctx}: failures not counted: {failed:#?}"
    );
    let in_step = harness::poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        target_status(&spec.status_socket, "failing").state == watcher::status::TargetState::InStep
    });
    assert!(in_step, "{ctx}: a failing post_sync held its target back");
    let ok = target_status(&spec.status_socket, "logged");
    assert!(
        ok.post_sync_runs >= 1 && ok.post_sync_failures == 0,
        "{ctx}: {ok:#?}"
    );
    d.stop();
}

#[test]
fn max_processes_caps_the_rsync_runs_going_at_once() {
    let Some(_timer) = harness::begin("max_processes_caps_the_rsync_runs_going_at_once") else {
        return;
    };
    let ctx = "max_processes_caps_the_rsync_runs_going_at_once";
    let s = Scratch::new("svc-max-processes");
    let running = s.path().join("running");
    mkdir_p(&running);
    let counts = s.path().join("counts");
    // The daemon's rsync, wrapped: each run notes how many runs are going, lasts a little
    // longer (so runs of different targets would overlap without the cap), then is rsync.
    let wrapper = s.path().join("rsync-counting");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nmkdir '{dir}/'$$\nls '{dir}' | wc -l >> '{counts}'\nsleep 0.3\nrsync \"$@\"\nrc=$?\nrmdir '{dir}/'$$\nexit $rc\n",
            dir = running.display(),
            counts = counts.display()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod the wrapper");
    let dsts: Vec<std::path::PathBuf> = (1..=3).map(|i| s.path().join(format!("dst{i}"))).collect();
    for d in &dsts {
        mkdir_p(d);
    }
    let mut spec = ConfigSpec::in_dir(s.path());
    spec.groups.push(GroupSpec::new(
        "data",
        &s.src,
        dsts.iter()
            .enumerate()
            .map(|(i, d)| TargetSpec::local(&format!("t{i}"), d))
            .collect(),
    ));
    let text = spec.render().replacen(
        "[daemon]\n",
        &format!(
            "[daemon]\nmax_processes = 1\nrsync = {}\n",
            crate::service::toml_str(wrapper.to_str().expect("UTF-8 temp path"))
        ),
        1,
    );
    let config = s.path().join("watcher.toml");
    write_config_text(&config, &text);
    let d = Service::start_run(&config, READY_TIMEOUT);
    for round in 0..3 {
        write(&s.src.join(format!("f{round}")), "x\n");
        std::thread::sleep(Duration::from_millis(150));
    }
    for dst in &dsts {
        wait_converged(&s.src, dst, CONVERGE_TIMEOUT, &skip_nothing, ctx);
    }
    let seen = std::fs::read_to_string(&counts).expect("the wrapper ran");
    let runs: Vec<u32> = seen
        .lines()
        .map(|l| l.trim().parse().expect("a count"))
        .collect();
    assert!(
        runs.len() >= 6,
        "{ctx}: the three targets' initial syncs and changes took {} runs",
        runs.len()
    );
    assert!(
        runs.iter().all(|&n| n == 1),
        "{ctx}: more than one rsync run at once: {runs:?}\n{}",
        d.log.tail(20)
    );
    d.stop();
}
