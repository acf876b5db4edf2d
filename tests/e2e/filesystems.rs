//! The seeded churn (renames of files and directories with contents, hard links, `rm -rf`,
//! rewrites) with the source on each kind of filesystem a storage server has under a
//! root: xfs and btrfs loop images (btrfs with a subvolume inside the root, churned too),
//! a tmpfs and an overlay. ext4 is the scratch directory's own filesystem in
//! `churn_local_target`. Each source is mounted over the scratch's `src` and undone by a
//! guard, lazily when busy.
//!
//! On the fanotify backend an overlay cannot be marked: that case runs under `auto`
//! (fanotify's default pass, inotify there) and the inotify and ebpf passes.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::harness::{self, Scratch};
use super::mounts::Mounted;

/// Operations per filesystem: enough for every kind of operation many times over.
const OPS: usize = 1000;

fn churn(test: &str, s: &Scratch, nested: Option<&dyn Fn(&Path) -> PathBuf>) {
    super::churn_with(test, s, s.dst.as_os_str(), &[], false, OPS, true, nested);
}

#[test]
fn churn_on_xfs() {
    let test = "churn_on_xfs";
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    let s = Scratch::new("fs-xfs");
    let _fs = Mounted::xfs(&s.path().join("src.xfs"), &s.src);
    churn(test, &s, None);
}

#[test]
fn churn_on_btrfs_with_a_subvolume_inside_the_root() {
    let test = "churn_on_btrfs_with_a_subvolume_inside_the_root";
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    let s = Scratch::new("fs-btrfs");
    let _fs = Mounted::btrfs(&s.path().join("src.btrfs"), &s.src);
    let subvolume = |src: &Path| {
        let dir = src.join("subvolume");
        let out = Command::new("btrfs")
            .args(["-q", "subvolume", "create"])
            .arg(&dir)
            .output()
            .expect("run btrfs");
        assert!(
            out.status.success(),
            "btrfs subvolume create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    };
    churn(test, &s, Some(&subvolume));
}

#[test]
fn churn_on_tmpfs() {
    let test = "churn_on_tmpfs";
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    let s = Scratch::new("fs-tmpfs");
    let _fs = Mounted::tmpfs(&s.src);
    churn(test, &s, None);
}

#[test]
fn churn_on_overlay() {
    let test = "churn_on_overlay";
    let Some(_timer) = harness::begin(test) else {
        return;
    };
    if harness::backend().as_deref() == Some("fanotify") {
        eprintln!("{test}: skipped: fanotify alone cannot mark an overlay (auto and inotify can)");
        return;
    }
    let s = Scratch::new("fs-overlay");
    let _fs = Mounted::overlay(&s.path().join("layers"), &s.src);
    churn(test, &s, None);
}
