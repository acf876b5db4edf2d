//! The mount table: which filesystem type a path is on (for error messages), and which
//! mounts lie under a directory (for the ebpf backend's in-kernel filter).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The type (`ext4`, `nfs4`, ...) of the mount holding `path`, from /proc/self/mountinfo.
pub fn filesystem_type(path: &Path) -> String {
    containing(&mounts(), path).map_or_else(|| "unknown".into(), |m| m.fstype.clone())
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
    /// The superblock's device numbers as the kernel keeps them.
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted (`/` unless a bind mount).
    pub root: std::path::PathBuf,
    pub mount_point: std::path::PathBuf,
    /// The filesystem type (`ext4`, `tmpfs`, ...).
    pub fstype: String,
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
                    major: 259,
                    minor: 2,
                    root: "/".into(),
                    mount_point: "/".into(),
                    fstype: "ext4".into(),
                },
                Mount {
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
    fn root_has_a_type() {
        assert_ne!(filesystem_type(Path::new("/")), "");
    }
}
