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

#[cfg(test)]
mod tests {
    use super::*;

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
