//! `watcher watch`, the inotifywait look-alike: event selection, formats, one-shot mode,
//! and what is printed for a directory renamed and then deleted.

use std::ffi::OsString;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::harness::{self, Daemon, Scratch};

const WAIT: Duration = Duration::from_secs(20);

/// SIGTERM ends a watch with 0.
fn stop(mut d: Daemon) {
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(WAIT).success());
}

/// `watcher watch ARGS... SRC` with the backend under test, started and watching.
fn watch(s: &Scratch, args: &[&str]) -> Daemon {
    let mut all: Vec<OsString> = vec!["watch".into()];
    all.extend(args.iter().map(OsString::from));
    if let Some(backend) = harness::backend() {
        all.extend(["--backend".into(), backend.into()]);
    }
    all.push(s.src.clone().into());
    let mut d = Daemon::spawn_with(&all);
    // As long as a daemon may take to be ready: loading the ebpf probes in the emulated
    // guest takes seconds.
    d.wait_for_line("watching", harness::READY_TIMEOUT);
    d
}

/// `-e close_write,move --json`: a close after writing is its own event, nothing else
/// selected is printed, and a rename the kernel reports whole is one object.
#[test]
fn watch_selects_close_write_and_prints_renames_whole() {
    let Some(_timer) = harness::begin("watch_selects_close_write_and_prints_renames_whole") else {
        return;
    };
    if harness::backend().as_deref() == Some("ebpf") {
        // Documented: the ebpf probes report the close of a written file as a change and a
        // rename as its two halves, and see no deletes inside a directory already gone.
        eprintln!(
            "not for the ebpf backend: it has no close_write, whole renames or deletes below a vanished directory"
        );
        return;
    }
    let s = Scratch::new("watch-json");
    // Made before the watch: a creation merged with the write and close is a creation.
    std::fs::write(s.src.join("a"), "").unwrap();
    let mut d = watch(&s, &["-e", "close_write,move", "--json"]);
    std::fs::write(s.src.join("a"), "x").unwrap();
    let a = s.src.join("a").display().to_string();
    d.wait_for_line(&format!(r#""kind":"close_write","path":"{a}""#), WAIT);
    std::fs::rename(s.src.join("a"), s.src.join("b")).unwrap();
    let b = s.src.join("b").display().to_string();
    d.wait_for_line(&format!(r#""kind":"moved_to","path":"{b}""#), WAIT);
    d.wait_for_line(
        &format!(r#""from":"{a}","is_dir":false,"kind":"renamed""#),
        WAIT,
    );
    assert_eq!(
        d.count(r#""kind":"created""#),
        0,
        "created was not selected"
    );
    assert_eq!(
        d.count(r#""kind":"modified""#),
        0,
        "modify was not selected"
    );
    assert!(d.count(r#""time":"20"#) >= 2, "every object has a time");
    stop(d);
}

/// `mv k k2; rm -rf k2`: the files deleted inside the renamed directory are printed, not
/// only the directory.
#[test]
fn watch_prints_deletes_inside_a_directory_renamed_then_deleted() {
    let Some(_timer) =
        harness::begin("watch_prints_deletes_inside_a_directory_renamed_then_deleted")
    else {
        return;
    };
    if harness::backend().as_deref() == Some("ebpf") {
        // Documented: the ebpf probes report the close of a written file as a change and a
        // rename as its two halves, and see no deletes inside a directory already gone.
        eprintln!(
            "not for the ebpf backend: it has no close_write, whole renames or deletes below a vanished directory"
        );
        return;
    }
    let s = Scratch::new("watch-rmrf");
    let mut d = watch(&s, &["--format", "%w%f %e"]);
    let k = s.src.join("k");
    std::fs::create_dir(&k).unwrap();
    // inotify watches a new directory once its creation is read: what is made in it
    // before that is not reported (as with inotifywait).
    d.wait_for_line(&format!("{} CREATE,ISDIR", k.display()), WAIT);
    std::fs::write(k.join("f1"), "1").unwrap();
    std::fs::write(k.join("f2"), "2").unwrap();
    // Read before the deletions: fanotify merges the unread events of one name, and a
    // creation and deletion merged are printed as the creation (see watch.rs).
    d.wait_for_line(&format!("{}/f2 CLOSE_WRITE", k.display()), WAIT);
    std::fs::rename(&k, s.src.join("k2")).unwrap();
    std::fs::remove_dir_all(s.src.join("k2")).unwrap();
    let k2 = s.src.join("k2").display().to_string();
    d.wait_for_line(&format!("{k2} DELETE,ISDIR"), WAIT);
    d.wait_for_line(&format!("{k2}/f1 DELETE"), WAIT);
    d.wait_for_line(&format!("{k2}/f2 DELETE"), WAIT);
    stop(d);
}

/// `-1` exits after the first event, `-t` with nothing seen exits 2.
#[test]
fn watch_oneshot_and_timeout() {
    let Some(_timer) = harness::begin("watch_oneshot_and_timeout") else {
        return;
    };
    let s = Scratch::new("watch-oneshot");
    let mut d = watch(&s, &["-1", "-e", "create", "--format", "%e %f"]);
    std::fs::write(s.src.join("one"), "").unwrap();
    assert!(d.wait_exit(WAIT).success());
    assert_eq!(d.count("CREATE one"), 1);

    let mut d = watch(&s, &["-1", "-t", "1"]);
    assert_eq!(d.wait_exit(WAIT).code(), Some(2));
}
