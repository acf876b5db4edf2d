//! Hard links: a change through any name reaches every name on the replica, and with
//! `--hard-links` the replica keeps them linked (same inode, same link count).

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use crate::harness::{self, Daemon, Scratch, args};
use crate::tree::{skip_nothing, wait_converged, wait_converged_with_links};
use crate::{mkdir_p, rename, set_mtime, write, write_in_place};

const TIMEOUT: Duration = Duration::from_secs(60);

fn link(from: &Path, to: &Path) {
    std::fs::hard_link(from, to)
        .unwrap_or_else(|e| panic!("ln {} {}: {e}", from.display(), to.display()));
}

fn unlink(path: &Path) {
    std::fs::remove_file(path).unwrap_or_else(|e| panic!("rm {}: {e}", path.display()));
}

/// Steps through the life of a few hard links; after each, the replica must be exact
/// (and, with `-H`, linked the same way). `rsyncd`: the target is an rsync daemon module
/// instead of a local directory.
fn hard_link_steps(test: &'static str, hard_links: bool, rsyncd: bool) {
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    let s = Scratch::new(test);
    let server = rsyncd.then(|| crate::rsyncd::RsyncDaemon::start(s.path(), &s.dst));
    let src = &s.src;
    mkdir_p(&src.join("d/e"));
    write(&src.join("a"), b"first version of a");
    link(&src.join("a"), &src.join("d/e/b"));
    write(&src.join("single"), b"a file with one link");
    write(&src.join("other"), b"a file with one link too");
    write(&src.join("lonely"), b"one link until the end");
    mkdir_p(&src.join("box"));
    let mut extra: Vec<OsString> = if hard_links {
        args(&["--hard-links"])
    } else {
        Vec::new()
    };
    let target: OsString = match &server {
        Some(server) => {
            extra.push(
                format!(
                    "--rsync-arg=--password-file={}",
                    server.password_file.display()
                )
                .into(),
            );
            server.url().into()
        }
        None => s.dst.clone().into(),
    };
    let d = Daemon::start(src, &target, &extra);
    let check = |step: &str| {
        let ctx = format!("{test}: {step}");
        if hard_links {
            wait_converged_with_links(src, &s.dst, TIMEOUT, &ctx);
        } else {
            wait_converged(src, &s.dst, TIMEOUT, &skip_nothing, &ctx);
        }
    };
    check("right after `ready`");

    write_in_place(&src.join("d/e/b"), b"written through b!");
    check("written through the second name");
    write_in_place(&src.join("a"), b"written through a!!");
    check("written through the first name");

    // A link added late, to a file the replica already has.
    link(&src.join("single"), &src.join("late"));
    check("a link added to a file that had one");
    write_in_place(&src.join("late"), b"written through late!");
    check("written through the late link");

    // A link made inside a new directory, and one moved in from a new directory.
    mkdir_p(&src.join("new/deep"));
    link(&src.join("a"), &src.join("new/deep/c"));
    check("a link in a new directory");
    write_in_place(&src.join("new/deep/c"), b"written through c!!");
    check("written through the link in the new directory");
    mkdir_p(&src.join("staging"));
    link(&src.join("other"), &src.join("staging/o2"));
    rename(&src.join("staging"), &src.join("moved"));
    write_in_place(&src.join("other"), b"written through other");
    check("a directory holding a link moved in");

    // Renamed and unlinked names.
    rename(&src.join("d/e/b"), &src.join("d/b2"));
    write_in_place(&src.join("d/b2"), b"written through b2!!");
    check("written through a renamed name");
    unlink(&src.join("a"));
    write_in_place(&src.join("new/deep/c"), b"c after a was unlinked");
    check("one name unlinked");
    unlink(&src.join("late"));
    check("a late link unlinked again");

    // A rewrite keeping size and mtime (rsync's quick check cannot see it) through a name
    // that is unlinked right after: only the file's other names are left to carry it.
    link(&src.join("d/b2"), &src.join("doomed"));
    set_mtime(&src.join("d/b2"), 1_600_000_000, 0);
    check("one more name, a known mtime");
    write_in_place(&src.join("doomed"), b"C AFTER A WAS UNLINKED");
    set_mtime(&src.join("doomed"), 1_600_000_000, 0);
    unlink(&src.join("doomed"));
    check("rewritten in place through a name unlinked at once");

    // A link to a file of one name, written through and unlinked at once, or moved away
    // with its directory and unlinked there: no event names the first name, and the daemon
    // may never see the two names together. fanotify's events carry the file's identity,
    // the ebpf probes report the first name when the link is made; inotify's events say
    // neither, so there a name gone before the daemon looked at it is not followed to its
    // file (the README says so).
    match harness::backend().as_deref() {
        None | Some("fanotify") | Some("ebpf") => {
            link(&src.join("lonely"), &src.join("brief"));
            write_in_place(&src.join("brief"), b"written through a brief link");
            unlink(&src.join("brief"));
            check("written through a new link unlinked at once");
            link(&src.join("lonely"), &src.join("box/brief"));
            write_in_place(&src.join("box/brief"), b"written through a boxed link");
            rename(&src.join("box"), &src.join("box2"));
            unlink(&src.join("box2/brief"));
            check("written through a new link moved away with its directory, then unlinked");
        }
        Some(other) => eprintln!(
            "{test}: a link written through and removed at once: not checked on {other}, \
             whose events do not say which file a vanished name was"
        ),
    }

    // Attributes are the inode's too.
    crate::chmod(&src.join("d/b2"), 0o600);
    set_mtime(&src.join("moved/o2"), 1_500_000_000, 42);
    check("attributes changed through one name");
    d.stop();
    if hard_links {
        wait_converged_with_links(src, &s.dst, TIMEOUT, &format!("{test}: after stop"));
    }
    if let Some(server) = server {
        server.stop();
    }
}

#[test]
fn hard_links_stay_linked_with_hard_links() {
    hard_link_steps("hard_links_stay_linked_with_hard_links", true, false);
}

#[test]
fn hard_links_stay_linked_on_an_rsync_daemon_target() {
    hard_link_steps(
        "hard_links_stay_linked_on_an_rsync_daemon_target",
        true,
        true,
    );
}

#[test]
fn hard_links_all_get_new_content_without_hard_links() {
    hard_link_steps(
        "hard_links_all_get_new_content_without_hard_links",
        false,
        false,
    );
}
