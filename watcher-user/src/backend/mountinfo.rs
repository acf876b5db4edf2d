//! The mount table: which filesystem type a path is on (for error messages), which
//! mounts lie under a directory (the filesystems a backend must cover beside a root's
//! own), and [`MountWatch`], which follows mounts appearing and disappearing under roots.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The type (`ext4`, `overlay`, `nfs4`, `fuse.sshfs`, ...) of the mount holding `path`,
/// from /proc/self/mountinfo. The path is made canonical first: the table holds canonical
/// mount points, and a relative path or a symlink would otherwise name the wrong mount.
pub fn filesystem_type(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    containing(&mounts(), &path).map_or_else(|| "unknown".into(), |m| m.fstype.clone())
}

/// What to tell a user about a source on a filesystem of `fstype` whose writers may be
/// elsewhere; None for local filesystems.
pub fn remote_writers_note(fstype: &str) -> Option<String> {
    writers_elsewhere(fstype).then(|| {
        format!(
            "{fstype} can be changed by other machines or a userspace server: only changes made \
             on this machine are seen; set verify_interval to catch the others"
        )
    })
}

/// The mount holding `path`: the longest mount point it lies under, the later of two
/// mounts on the same point (the one on top).
pub fn containing<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mount's id, unique while it is mounted.
    pub id: u32,
    /// The superblock's device numbers as the kernel keeps them.
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted (`/` unless a bind mount).
    pub root: std::path::PathBuf,
    pub mount_point: std::path::PathBuf,
    /// The filesystem type (`ext4`, `tmpfs`, ...).
    pub fstype: String,
}

/// Pseudo filesystems that hold no user data: never captured, never warned about, even
/// when one is mounted under a root (a root of `/`, say).
const PSEUDO: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "debugfs",
    "tracefs",
    "securityfs",
    "bpf",
    "mqueue",
    "hugetlbfs",
    "pstore",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "autofs",
    "efivarfs",
    "nsfs",
    "rpc_pipefs",
];

/// Whether `fstype` holds files someone would replicate.
pub fn holds_data(fstype: &str) -> bool {
    !PSEUDO.contains(&fstype)
}

/// Whether changes to a filesystem of `fstype` can be made elsewhere, by another machine
/// (network filesystems) or a userspace server (FUSE): no local notification sees those.
pub fn writers_elsewhere(fstype: &str) -> bool {
    matches!(
        fstype,
        "nfs" | "nfs4" | "cifs" | "smb3" | "smbfs" | "ceph" | "glusterfs" | "9p" | "afs"
    ) || fstype == "fuse"
        || fstype.starts_with("fuse.")
        || fstype == "fuseblk"
}

/// The mounts strictly below `root` that hold data, in mount-table order (a mount on top of
/// another comes after it).
pub fn below<'a>(mounts: &'a [Mount], root: &'a Path) -> impl Iterator<Item = &'a Mount> + 'a {
    mounts.iter().filter(move |m| {
        m.mount_point != root && m.mount_point.starts_with(root) && holds_data(&m.fstype)
    })
}

/// What changed in the mount table under the followed roots since the last look.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MountChanges {
    pub appeared: Vec<Mount>,
    pub gone: Vec<Mount>,
}

/// Follows the mounts below some roots. The kernel marks /proc/self/mountinfo with
/// POLLPRI (and POLLERR) once per change of the mount table, re-armed by the poll itself;
/// whoever polls [`MountWatch::fd`] calls [`MountWatch::changes`] when it fires.
pub struct MountWatch {
    file: std::fs::File,
    roots: Vec<std::path::PathBuf>,
    known: std::collections::BTreeMap<u32, Mount>,
}

impl MountWatch {
    /// Starts following the mounts below `roots`; those there now are known already.
    pub fn new(roots: Vec<std::path::PathBuf>) -> std::io::Result<Self> {
        let file = std::fs::File::open("/proc/self/mountinfo")?;
        let mut watch = MountWatch {
            file,
            roots,
            known: Default::default(),
        };
        watch.changes()?;
        Ok(watch)
    }

    /// The descriptor to poll for POLLPRI.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.file.as_fd()
    }

    /// Re-reads the mount table and tells what appeared and went away below the roots.
    pub fn changes(&mut self) -> std::io::Result<MountChanges> {
        use std::io::{Read, Seek};
        let mut text = Vec::new();
        self.file.rewind()?;
        self.file.read_to_end(&mut text)?;
        Ok(self.update(&parse_mounts(&text)))
    }

    fn update(&mut self, mounts: &[Mount]) -> MountChanges {
        let mut now = std::collections::BTreeMap::new();
        for root in &self.roots {
            for m in below(mounts, root) {
                now.insert(m.id, m.clone());
            }
        }
        let appeared = now
            .iter()
            .filter(|(id, _)| !self.known.contains_key(id))
            .map(|(_, m)| m.clone())
            .collect();
        let gone = self
            .known
            .iter()
            .filter(|(id, _)| !now.contains_key(id))
            .map(|(_, m)| m.clone())
            .collect();
        self.known = now;
        MountChanges { appeared, gone }
    }
}

/// The mount points capture stops at, for backends that see across them anyway (inotify's
/// walk, the ebpf probes): events below them are dropped, as `rsync -x` would otherwise
/// copy what a listed path inside one names.
#[derive(Debug, Default)]
pub struct Fence {
    /// Roots whose capture stops at mount points (`one_file_system`).
    stop_at: Vec<std::path::PathBuf>,
    /// The mount points below those roots.
    fenced: Vec<std::path::PathBuf>,
}

impl Fence {
    /// The fence for the roots in `stop_at`, from the mount table now.
    pub fn new(stop_at: &[std::path::PathBuf]) -> Self {
        let table = mounts();
        let fenced = stop_at
            .iter()
            .flat_map(|root| below(&table, root).map(|m| m.mount_point.clone()))
            .collect();
        Fence {
            stop_at: stop_at.to_vec(),
            fenced,
        }
    }

    /// Whether `path` lies below a mount point that capture stops at.
    pub fn contains(&self, path: &Path) -> bool {
        self.fenced
            .iter()
            .any(|mp| path != mp && path.starts_with(mp))
    }

    /// Takes in `changes` and returns those where capture follows mounts.
    pub fn update(&mut self, changes: &MountChanges) -> MountChanges {
        let mut followed = MountChanges::default();
        for m in &changes.gone {
            let before = self.fenced.len();
            self.fenced.retain(|mp| *mp != m.mount_point);
            if before == self.fenced.len() && !self.contains(&m.mount_point) {
                followed.gone.push(m.clone());
            }
        }
        for m in &changes.appeared {
            if self.stop_at.iter().any(|r| m.mount_point.starts_with(r)) {
                self.fenced.push(m.mount_point.clone());
            } else if !self.contains(&m.mount_point) {
                followed.appeared.push(m.clone());
            }
        }
        followed
    }

    /// Drops the events from index `from` on that name paths below a fenced mount point.
    pub fn drop_fenced(&self, out: &mut Vec<crate::event::Event>, from: usize) {
        use crate::event::Event;
        if self.fenced.is_empty() {
            return;
        }
        let mut i = from;
        while i < out.len() {
            let fenced = match &out[i] {
                Event::Change { path, .. } | Event::Rescan { path } => self.contains(path),
                Event::Renamed { from, to, .. } => self.contains(from) || self.contains(to),
                _ => false,
            };
            if fenced {
                out.remove(i);
            } else {
                i += 1;
            }
        }
    }
}

/// The kernel's internal `dev_t` (what `super_block.s_dev` holds, what the ebpf probes
/// report) for a device number.
pub(crate) fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

/// Every mount of this process's namespace (empty when /proc is not readable).
pub fn mounts() -> Vec<Mount> {
    std::fs::read("/proc/self/mountinfo")
        .map(|text| parse_mounts(&text))
        .unwrap_or_default()
}

fn parse_mounts(text: &[u8]) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        // The fs type is the first field after the " - " separator.
        let Some(sep) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        let Some(Ok(id)) = fields.first().map(|f| String::from_utf8_lossy(f).parse()) else {
            continue;
        };
        let (Some(dev), Some(root), Some(mount), Some(fstype)) = (
            fields.get(2),
            fields.get(3),
            fields.get(4),
            fields.get(sep + 1),
        ) else {
            continue;
        };
        let dev = String::from_utf8_lossy(dev);
        let Some((major, minor)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) else {
            continue;
        };
        out.push(Mount {
            id,
            major,
            minor,
            root: std::ffi::OsStr::from_bytes(&unescape(root)).into(),
            fstype: String::from_utf8_lossy(fstype).into_owned(),
            mount_point: std::ffi::OsStr::from_bytes(&unescape(mount)).into(),
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() {
            let oct = &field[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(br"/mnt/a\040b"), b"/mnt/a b");
        assert_eq!(unescape(br"/x\"), b"/x\\");
    }

    #[test]
    fn parses_device_numbers_and_mount_points() {
        let text = b"22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n\
                     40 22 0:35 /sub /mnt/a\\040b rw - btrfs /dev/sdb rw\n";
        assert_eq!(
            parse_mounts(text),
            vec![
                Mount {
                    id: 22,
                    major: 259,
                    minor: 2,
                    root: "/".into(),
                    mount_point: "/".into(),
                    fstype: "ext4".into(),
                },
                Mount {
                    id: 40,
                    major: 0,
                    minor: 35,
                    root: "/sub".into(),
                    mount_point: "/mnt/a b".into(),
                    fstype: "btrfs".into(),
                },
            ]
        );
    }

    #[test]
    fn the_mount_on_top_holds_a_path() {
        let text = b"1 0 8:1 / / rw - ext4 /dev/a rw\n\
                     2 1 0:40 / /data rw - tmpfs t rw\n\
                     3 2 0:41 / /data rw - xfs /dev/b rw\n";
        let mounts = parse_mounts(text);
        let at = |p: &str| containing(&mounts, Path::new(p)).map(|m| m.fstype.as_str());
        assert_eq!(at("/data/x"), Some("xfs"));
        assert_eq!(at("/database"), Some("ext4"));
        assert_eq!(at("/"), Some("ext4"));
    }

    #[test]
    fn mounts_below_a_root_appear_and_go() {
        let table = |extra: &[u8]| {
            let mut text = b"1 0 8:1 / / rw - ext4 /dev/a rw\n\
                             2 1 8:2 / /srv rw - xfs /dev/b rw\n\
                             3 2 0:40 / /srv/data/proc rw - proc proc rw\n\
                             9 1 0:50 / /srvx rw - tmpfs t rw\n"
                .to_vec();
            text.extend_from_slice(extra);
            parse_mounts(&text)
        };
        let tmp = b"4 2 0:41 / /srv/data/tmp rw - tmpfs t rw\n";
        let img = b"5 4 7:0 / /srv/data/tmp/img rw - ext4 /dev/loop0 rw\n";
        let mut watch = MountWatch {
            file: std::fs::File::open("/dev/null").expect("open /dev/null"),
            roots: vec!["/srv/data".into()],
            known: Default::default(),
        };
        watch.update(&table(tmp));
        let mut both = tmp.to_vec();
        both.extend_from_slice(img);
        let changes = watch.update(&table(&both));
        assert_eq!(changes.gone, []);
        let appeared: Vec<_> = changes.appeared.iter().map(|m| m.id).collect();
        assert_eq!(appeared, [5]);
        let changes = watch.update(&table(b""));
        assert_eq!(changes.appeared, []);
        let gone: Vec<_> = changes.gone.iter().map(|m| m.id).collect();
        assert_eq!(gone, [4, 5]);
    }

    #[test]
    fn a_fence_drops_what_lies_below_mounts_of_one_file_system_roots() {
        use crate::event::{ChangeKind, Event};
        let mount = |id, at: &str| Mount {
            id,
            major: 0,
            minor: id,
            root: "/".into(),
            mount_point: at.into(),
            fstype: "tmpfs".into(),
        };
        let mut fence = Fence {
            stop_at: vec!["/x".into()],
            fenced: vec![],
        };
        let followed = fence.update(&MountChanges {
            appeared: vec![mount(1, "/x/t"), mount(2, "/y/t"), mount(3, "/x/t/deeper")],
            gone: vec![],
        });
        let ids: Vec<_> = followed.appeared.iter().map(|m| m.id).collect();
        assert_eq!(ids, [2]);
        let change = |p: &str| Event::Change {
            kind: ChangeKind::Created,
            path: p.into(),
            is_dir: false,
            pid: 1,
        };
        let mut out = vec![
            change("/x/t"),
            change("/x/t/f"),
            change("/x/f"),
            change("/y/t/f"),
        ];
        fence.drop_fenced(&mut out, 0);
        assert_eq!(out, [change("/x/t"), change("/x/f"), change("/y/t/f")]);
        let followed = fence.update(&MountChanges {
            appeared: vec![],
            gone: vec![mount(1, "/x/t"), mount(2, "/y/t")],
        });
        let ids: Vec<_> = followed.gone.iter().map(|m| m.id).collect();
        assert_eq!(ids, [2]);
        assert!(!fence.contains(Path::new("/x/t/f")));
    }

    #[test]
    fn network_and_userspace_filesystems_have_writers_elsewhere() {
        for t in ["nfs", "nfs4", "cifs", "smb3", "fuse.sshfs", "fuseblk"] {
            assert!(writers_elsewhere(t), "{t}");
        }
        for t in ["ext4", "xfs", "btrfs", "tmpfs", "overlay"] {
            assert!(!writers_elsewhere(t), "{t}");
        }
    }

    #[test]
    fn a_relative_path_has_the_type_of_its_canonical_form() {
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(filesystem_type(Path::new(".")), filesystem_type(&cwd));
    }

    #[test]
    fn root_has_a_type() {
        assert_ne!(filesystem_type(Path::new("/")), "");
    }
}
