//! Filesystems mounted inside a source root: a tmpfs and an ext4 loop image mounted before
//! the daemon starts, a tmpfs mounted while it runs, one unmounted while it runs; and
//! `--one-file-system`, which leaves a nested mount out of both capture and replica.
//!
//! They need root for `mount` as well as for fanotify marks. Every mount is undone by a
//! guard, lazily when it is still busy, so a failing test leaves no mount behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::harness::{self, Daemon, Scratch, args};
use super::tree::{assert_equal_now, skip_nothing, wait_converged};
use super::{CONVERGE_TIMEOUT, mkdir_p, rename, write};

/// A filesystem mounted at `at`, unmounted on drop (lazily if busy).
pub struct Mounted {
    at: PathBuf,
    mounted: bool,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Mounted {
    pub fn tmpfs(at: &Path) -> Mounted {
        mkdir_p(at);
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "watcher-e2e"])
            .arg(at));
        Mounted {
            at: at.to_path_buf(),
            mounted: true,
        }
    }

    /// A fresh ext4 image file at `image` (outside the source), loop-mounted at `at`; the
    /// loop device goes away with the unmount.
    fn ext4(image: &Path, at: &Path) -> Mounted {
        Mounted::image(&["mkfs.ext4", "-q", "-F"], 32 << 20, image, at)
    }

    /// The same with xfs (300 MiB at least; the image is sparse).
    pub fn xfs(image: &Path, at: &Path) -> Mounted {
        Mounted::image(&["mkfs.xfs", "-q", "-f"], 320 << 20, image, at)
    }

    /// The same with btrfs.
    pub fn btrfs(image: &Path, at: &Path) -> Mounted {
        Mounted::image(&["mkfs.btrfs", "-q", "-f"], 256 << 20, image, at)
    }

    /// A sparse image of `bytes` at `image`, made by `mkfs` (the image path appended) and
    /// loop-mounted at `at`.
    fn image(mkfs: &[&str], bytes: u64, image: &Path, at: &Path) -> Mounted {
        let file = std::fs::File::create(image).expect("create image");
        file.set_len(bytes).expect("size image");
        run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(image));
        mkdir_p(at);
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(at));
        Mounted {
            at: at.to_path_buf(),
            mounted: true,
        }
    }

    /// An overlay of `base/lower` (holding one file) mounted at `at`, its upper and work
    /// directories in `base`. fanotify cannot mark an overlay.
    pub fn overlay(base: &Path, at: &Path) -> Mounted {
        let (lower, upper, work) = (base.join("lower"), base.join("upper"), base.join("work"));
        for dir in [&lower, &upper, &work] {
            mkdir_p(dir);
        }
        write(&lower.join("from-the-lower-layer"), "lower");
        mkdir_p(at);
        let mut opts = std::ffi::OsString::from("lowerdir=");
        opts.push(&lower);
        opts.push(",upperdir=");
        opts.push(&upper);
        opts.push(",workdir=");
        opts.push(&work);
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(opts)
            .arg(at));
        Mounted {
            at: at.to_path_buf(),
            mounted: true,
        }
    }

    /// Unmounts now, retrying while rsync or a walk still holds it.
    fn unmount(&mut self) {
        let ok = harness::poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
            Command::new("umount")
                .arg(&self.at)
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(ok, "umount {} kept failing", self.at.display());
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let ok = Command::new("umount")
            .arg(&self.at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        }
    }
}

/// Files, directories, rewrites, a rename and a removal inside `dir`, named by `tag`.
fn scribble(dir: &Path, tag: &str, round: usize) {
    let d = dir.join(format!("{tag}-d{round}"));
    mkdir_p(&d.join("deep/er"));
    for i in 0..20 {
        write(&d.join(format!("f{i}")), format!("{tag} {round} {i}"));
    }
    write(&d.join("deep/er/leaf"), vec![round as u8; 10_000]);
    write(&dir.join(format!("{tag}-top")), format!("top {round}"));
    rename(&d.join("f0"), &d.join("deep/f0-moved"));
    std::fs::remove_file(d.join("f1")).expect("remove f1");
    if round > 0 {
        let old = dir.join(format!("{tag}-d{}", round - 1));
        rename(&old, &dir.join(format!("{tag}-old{round}")));
    }
}

#[test]
fn nested_mounts_replicate() {
    let Some(_timer) = harness::begin("nested_mounts_replicate") else {
        return;
    };
    let s = Scratch::new("nested-mounts");
    let tmp = s.src.join("scratch");
    let vol = s.src.join("data/vol");
    let later = s.src.join("later");
    mkdir_p(&later);
    write(&later.join("under-the-mount"), "hidden while mounted");
    let mut tmpfs = Mounted::tmpfs(&tmp);
    let _ext4 = Mounted::ext4(&s.path().join("vol.ext4"), &vol);
    scribble(&s.src, "root", 0);
    scribble(&tmp, "tmpfs", 0);
    scribble(&vol, "ext4", 0);
    let mut d = Daemon::start(&s.src, &s.dst, &args(&[]));
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "initial sync",
    );

    // Changes on each filesystem, the nested ones included.
    for round in 1..3 {
        scribble(&s.src, "root", round);
        scribble(&tmp, "tmpfs", round);
        scribble(&vol, "ext4", round);
    }
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "writes in every filesystem",
    );

    // Mounted while running: what it shows appears on the replica, and later writes follow.
    let mut later_fs = Mounted::tmpfs(&later);
    scribble(&later, "later", 0);
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "tmpfs mounted while running",
    );
    scribble(&later, "later", 1);
    scribble(&vol, "ext4", 3);
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "writes in the new mount",
    );

    // Unmounted while running: the directory below shows again, and writes there follow.
    tmpfs.unmount();
    later_fs.unmount();
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "tmpfs unmounted while running",
    );
    scribble(&tmp, "after", 0);
    scribble(&later, "after", 0);
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "writes after the unmount",
    );
    d.wait_rsync_quiet(Duration::from_secs(1), Duration::from_secs(20));
    assert_equal_now(&s.src, &s.dst, &skip_nothing, "still converged");
    d.stop();
}

/// An overlay (which refuses fanotify marks) mounted inside a root on a filesystem that
/// takes them: `auto` keeps fanotify for the root and watches the overlay with inotify, and
/// changes on both sides replicate; so do changes in a second overlay mounted later.
#[test]
fn an_overlay_below_a_root_is_watched_with_inotify_beside_fanotify() {
    let test = "an_overlay_below_a_root_is_watched_with_inotify_beside_fanotify";
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    if harness::backend().as_deref() == Some("fanotify") {
        eprintln!("{test}: skipped: fanotify alone cannot mark an overlay (auto and inotify can)");
        return;
    }
    let s = Scratch::new("overlay-below");
    let ov = s.src.join("containers/ov");
    let _overlay = Mounted::overlay(&s.path().join("layers"), &ov);
    scribble(&s.src, "root", 0);
    scribble(&ov, "overlay", 0);
    let mut d = Daemon::start(&s.src, &s.dst, &args(&[]));
    if harness::backend().is_none() {
        d.wait_for_line("place watched with inotify", Duration::from_secs(5));
        d.wait_for_line("backend=\"fanotify+inotify\"", Duration::from_secs(5));
    }
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "initial sync",
    );
    for round in 1..3 {
        scribble(&s.src, "root", round);
        scribble(&ov, "overlay", round);
    }
    std::fs::remove_file(ov.join("from-the-lower-layer")).expect("whiteout a lower file");
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "writes on both filesystems",
    );
    // An overlay mounted while running: under auto its fanotify part cannot mark it and
    // rescans it every few seconds instead; the other backends watch it.
    let later = s.src.join("later");
    let _later_overlay = Mounted::overlay(&s.path().join("later-layers"), &later);
    scribble(&later, "later", 0);
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "an overlay mounted while running",
    );
    scribble(&later, "later", 1);
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip_nothing,
        "writes in the overlay mounted while running",
    );
    d.wait_rsync_quiet(Duration::from_secs(1), Duration::from_secs(20));
    assert_equal_now(&s.src, &s.dst, &skip_nothing, "still converged");
    d.stop();
}

#[test]
fn one_file_system_leaves_nested_mounts_out() {
    let Some(_timer) = harness::begin("one_file_system_leaves_nested_mounts_out") else {
        return;
    };
    let s = Scratch::new("one-file-system");
    let tmp = s.src.join("scratch");
    let _tmpfs = Mounted::tmpfs(&tmp);
    // Writes go below the mount's root, whose attributes the replica's (empty) mount point
    // directory keeps from the initial sync.
    let inner = tmp.join("inner");
    mkdir_p(&inner);
    scribble(&s.src, "root", 0);
    scribble(&inner, "tmpfs", 0);
    // rsync -x copies a mount point as an empty directory.
    let skip = |rel: &Path, _: &std::fs::Metadata| {
        rel.starts_with("scratch") && rel != Path::new("scratch")
    };
    let mut d = Daemon::start(&s.src, &s.dst, &args(&["--one-file-system"]));
    wait_converged(&s.src, &s.dst, CONVERGE_TIMEOUT, &skip, "initial sync");
    for round in 1..3 {
        scribble(&inner, "tmpfs", round);
        scribble(&s.src, "root", round);
    }
    wait_converged(
        &s.src,
        &s.dst,
        CONVERGE_TIMEOUT,
        &skip,
        "writes on both filesystems",
    );
    d.wait_rsync_quiet(Duration::from_secs(1), Duration::from_secs(20));
    let copied: Vec<_> = std::fs::read_dir(s.dst.join("scratch"))
        .expect("the mount point is on the replica")
        .map(|e| e.expect("read replica dir").file_name())
        .collect();
    assert!(copied.is_empty(), "the nested mount was copied: {copied:?}");
    assert!(
        !d.log.contains("filesystem below a root marked"),
        "the nested mount was marked:\n{}",
        d.log.tail(20)
    );
    d.stop();
}
