//! What the probes' in-kernel filter is told about the roots: which directories are
//! roots or lie above one, and which filesystems hold them. With it, the probes drop the
//! changes outside every root before they reach the ring buffer; on a busy machine
//! that is most of them. Worked out here, in user space, from `stat` and the mount
//! table; the kernel side only looks keys up.

use std::path::{Path, PathBuf};

use hashbrown::HashMap;

use crate::backend::mountinfo::{self, Mount, kernel_dev};

/// What the in-kernel filter needs to know of the roots: every directory a root is (or a
/// mount under a root starts at) as [`ROOT`](watcher_ebpf_common::ROOT), the directories
/// above the roots as ancestors, and the devices of their filesystems. Devices come both
/// from `stat` and from the mount table (they differ on btrfs subvolumes); an extra entry
/// only lets more through. `stat` gives (device major, minor, inode).
pub fn root_filter(
    roots: &[PathBuf],
    mounts: &[Mount],
    stat: impl Fn(&Path) -> Option<(u32, u32, u64)>,
) -> (Vec<(watcher_ebpf_common::RootKey, u32)>, Vec<u32>) {
    use watcher_ebpf_common::{ROOT, ROOT_ANCESTOR, RootKey};
    let mut keys: HashMap<RootKey, u32> = HashMap::new();
    let mut devices: Vec<u32> = Vec::new();
    let mut add = |dir: &Path, kind: u32, keys: &mut HashMap<RootKey, u32>| {
        let Some((major, minor, ino)) = stat(dir) else {
            return;
        };
        let mut devs = vec![kernel_dev(major, minor)];
        if let Some(m) = mountinfo::containing(mounts, dir) {
            devs.push(kernel_dev(m.major, m.minor));
        }
        for dev in devs {
            let key = RootKey { dev, pad: 0, ino };
            let k = keys.entry(key).or_insert(kind);
            *k = (*k).min(kind);
            if kind == ROOT && !devices.contains(&dev) {
                devices.push(dev);
            }
        }
    };
    for root in roots {
        add(root, ROOT, &mut keys);
        for ancestor in root.ancestors().skip(1) {
            add(ancestor, ROOT_ANCESTOR, &mut keys);
        }
        for m in mounts {
            if m.mount_point != *root && m.mount_point.starts_with(root) {
                add(&m.mount_point, ROOT, &mut keys);
            }
        }
    }
    let mut keys: Vec<_> = keys.into_iter().collect();
    keys.sort_by_key(|(k, _)| (k.dev, k.ino));
    (keys, devices)
}

/// The roots as the probes compare absolute paths with them (see
/// [`RootPath`](watcher_ebpf_common::RootPath)): all of them, or none when one does not
/// fit (too many roots, or one too long), so that no absolute path is dropped in the
/// kernel that user space would keep.
pub fn root_paths(roots: &[PathBuf]) -> Vec<watcher_ebpf_common::RootPath> {
    use std::os::unix::ffi::OsStrExt;
    use watcher_ebpf_common::{MAX_ROOT_PATHS, RootPath};
    if roots.len() > MAX_ROOT_PATHS {
        return Vec::new();
    }
    roots
        .iter()
        .map(|r| RootPath::new(r.as_os_str().as_bytes()))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_paths_are_all_the_roots_or_none() {
        use watcher_ebpf_common::{MAX_ROOT_PATHS, ROOT_PATH_LEN};
        let paths = root_paths(&["/data/src".into(), "/srv/b/".into(), "/".into()]);
        let got: Vec<&[u8]> = paths.iter().map(|p| &p.path[..p.len as usize]).collect();
        assert_eq!(got, [&b"/data/src"[..], b"/srv/b", b"/"]);
        let long = PathBuf::from(format!("/{}", "x".repeat(ROOT_PATH_LEN)));
        assert!(root_paths(&["/a".into(), long]).is_empty());
        assert!(root_paths(&["relative".into()]).is_empty());
        let many: Vec<PathBuf> = (0..=MAX_ROOT_PATHS)
            .map(|i| format!("/r{i}").into())
            .collect();
        assert!(root_paths(&many).is_empty());
        assert_eq!(root_paths(&many[..MAX_ROOT_PATHS]).len(), MAX_ROOT_PATHS);
    }

    #[test]
    fn root_filter_knows_roots_their_ancestors_mounts_under_them_and_devices() {
        use watcher_ebpf_common::{ROOT, ROOT_ANCESTOR};
        let mounts = vec![
            Mount {
                id: 0,
                major: 8,
                minor: 1,
                root: "/".into(),
                mount_point: "/".into(),
                fstype: "ext4".into(),
            },
            Mount {
                id: 0,
                major: 0,
                minor: 40,
                root: "/".into(),
                mount_point: "/data/src/scratch".into(),
                fstype: "tmpfs".into(),
            },
            Mount {
                id: 0,
                major: 0,
                minor: 41,
                root: "/".into(),
                mount_point: "/elsewhere".into(),
                fstype: "tmpfs".into(),
            },
        ];
        // stat: the root filesystem is 8:1; the mount under the root is a tmpfs (0:40).
        let stat = |p: &Path| -> Option<(u32, u32, u64)> {
            Some(match p.to_str()? {
                "/" => (8, 1, 2),
                "/data" => (8, 1, 100),
                "/data/src" => (8, 1, 200),
                "/data/src/scratch" => (0, 40, 1),
                _ => return None,
            })
        };
        let (keys, devices) = root_filter(&[PathBuf::from("/data/src")], &mounts, stat);
        let d = kernel_dev(8, 1);
        let t = kernel_dev(0, 40);
        assert_eq!(d, 8 << 20 | 1);
        let key = |dev, ino| watcher_ebpf_common::RootKey { dev, pad: 0, ino };
        assert_eq!(
            keys,
            vec![
                (key(t, 1), ROOT),
                (key(d, 2), ROOT_ANCESTOR),
                (key(d, 100), ROOT_ANCESTOR),
                (key(d, 200), ROOT),
            ]
        );
        assert_eq!(devices, vec![d, t]);
    }
}
