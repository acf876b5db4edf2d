//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find the offset of a
//! struct member: the ebpf backend's probes read kernel struct fields at offsets that
//! come from here, so one object fits every kernel build.

/// A parsed BTF blob: the type table, indexed by type id.
pub struct Btf<'a> {
    strings: &'a [u8],
    /// Type id - 1 -> (name offset, info, where its kind-specific data starts).
    types: Vec<(u32, u32, usize)>,
    data: &'a [u8],
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
/// Kinds that only qualify or rename another type: typedef, volatile, const, restrict,
/// type_tag.
const QUALIFIERS: [u32; 5] = [8, 9, 10, 11, 18];

impl<'a> Btf<'a> {
    /// Parses the header and type section; None for anything that is not BTF.
    pub fn parse(data: &'a [u8]) -> Option<Btf<'a>> {
        let u16_at = |at: usize| -> Option<u16> {
            Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
        };
        let u32_at = |at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
        };
        if u16_at(0)? != 0xeb9f {
            return None;
        }
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        let strings = data.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
        let mut types = Vec::new();
        let mut at = hdr_len + type_off;
        let end = at + type_len;
        while at + 12 <= end {
            let name_off = u32_at(at)?;
            let info = u32_at(at + 4)?;
            let vlen = (info & 0xffff) as usize;
            at += 12;
            types.push((name_off, info, at));
            at += match (info >> 24) & 0x1f {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 => 12 * vlen,
                6 | 13 => 8 * vlen,
                15 | 19 => 12 * vlen,
                _ => 0,
            };
        }
        Some(Btf {
            strings,
            types,
            data,
        })
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.data.get(at..at + 4)?.try_into().ok()?,
        ))
    }

    fn name(&self, off: u32) -> Option<&'a [u8]> {
        let rest = self.strings.get(off as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(&rest[..end])
    }

    fn kind(info: u32) -> u32 {
        (info >> 24) & 0x1f
    }

    /// The struct or union a type id names, through typedefs and qualifiers.
    fn composite(&self, mut id: u32) -> Option<usize> {
        for _ in 0..16 {
            let (_, info, at) = *self.types.get((id as usize).checked_sub(1)?)?;
            match Self::kind(info) {
                KIND_STRUCT | KIND_UNION => return Some(id as usize - 1),
                k if QUALIFIERS.contains(&k) => id = self.u32_at(at - 4)?,
                _ => return None,
            }
        }
        None
    }

    /// (byte offset, type id) of `member` in the composite at `index`, looking inside
    /// anonymous struct and union members too.
    fn find(&self, index: usize, member: &[u8], depth: u32) -> Option<(u32, u32)> {
        let (_, info, at) = *self.types.get(index)?;
        let kflag = info >> 31 == 1;
        for m in 0..(info & 0xffff) as usize {
            let base = at + 12 * m;
            let name_off = self.u32_at(base)?;
            let ty = self.u32_at(base + 4)?;
            let bits = self.u32_at(base + 8)?;
            let bits = if kflag { bits & 0x00ff_ffff } else { bits };
            if name_off == 0 && depth < 8 {
                if let Some(inner) = self.composite(ty)
                    && let Some((off, t)) = self.find(inner, member, depth + 1)
                {
                    return Some((bits / 8 + off, t));
                }
            } else if self.name(name_off)? == member {
                return Some((bits / 8, ty));
            }
        }
        None
    }

    /// Offset in bytes of `path` (a member name, or names joined by dots for members of
    /// embedded structs: `f_path.dentry`) in struct `name`, if the BTF has them all.
    pub fn member_offset(&self, name: &str, path: &str) -> Option<u32> {
        let mut index = self.types.iter().position(|&(n, info, _)| {
            Self::kind(info) == KIND_STRUCT && self.name(n) == Some(name.as_bytes())
        })?;
        let mut total = 0;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (off, ty) = self.find(index, part.as_bytes(), 0)?;
            total += off;
            if parts.peek().is_some() {
                index = self.composite(ty)?;
            }
        }
        Some(total)
    }
}

#[cfg(feature = "ebpf")]
/// Kernel struct offsets from the kernel's BTF (`filter` set when it has every field
/// the in-kernel filter reads), and the fields the VFS probe set needs that it lacks.
/// Without BTF: no parent check, no in-kernel filter, no VFS probes; with a filter
/// field missing, no in-kernel filter (said in the log).
pub(super) fn kernel_offsets() -> (watcher_ebpf_common::KernelOffsets, Vec<String>) {
    let Ok(blob) = std::fs::read("/sys/kernel/btf/vmlinux") else {
        tracing::warn!(
            "no kernel BTF: children of the daemon are filtered from their parent's fork \
             on, and changes outside the roots are filtered in user space only"
        );
        return (
            watcher_ebpf_common::KernelOffsets::default(),
            vec!["kernel BTF".into()],
        );
    };
    let Some(btf) = Btf::parse(&blob) else {
        tracing::warn!("the kernel's BTF does not parse: no in-kernel filtering");
        return (
            watcher_ebpf_common::KernelOffsets::default(),
            vec!["kernel BTF".into()],
        );
    };
    let mut missing = Vec::new();
    let mut field = |name: &str, path: &str| {
        btf.member_offset(name, path).unwrap_or_else(|| {
            missing.push(format!("{name}.{path}"));
            0
        })
    };
    let mut off = watcher_ebpf_common::KernelOffsets {
        real_parent: field("task_struct", "real_parent"),
        tgid: field("task_struct", "tgid"),
        files: field("task_struct", "files"),
        fdt: field("files_struct", "fdt"),
        fdt_max_fds: field("fdtable", "max_fds"),
        fdt_fd: field("fdtable", "fd"),
        f_dentry: field("file", "f_path.dentry"),
        fs: field("task_struct", "fs"),
        pwd_dentry: field("fs_struct", "pwd.dentry"),
        d_parent: field("dentry", "d_parent"),
        d_inode: field("dentry", "d_inode"),
        d_sb: field("dentry", "d_sb"),
        i_ino: field("inode", "i_ino"),
        s_dev: field("super_block", "s_dev"),
        filter: 0,
        d_name: field("dentry", "d_name.name"),
        f_mode: field("file", "f_mode"),
        f_inode: field("file", "f_inode"),
        ki_filp: field("kiocb", "ki_filp"),
        rd_old_dentry: field("renamedata", "old_dentry"),
        rd_new_dentry: field("renamedata", "new_dentry"),
        open_flag: field("open_flags", "open_flag"),
        i_mode: field("inode", "i_mode"),
        dir_check: 0,
        root_paths: 0,
    };
    // What `dir_check` reads: task -> files -> fdtable -> file -> inode -> mode.
    const DIR_CHECK: [&str; 6] = [
        "task_struct.files",
        "files_struct.fdt",
        "fdtable.max_fds",
        "fdtable.fd",
        "file.f_inode",
        "inode.i_mode",
    ];
    off.dir_check = u32::from(!missing.iter().any(|m| DIR_CHECK.contains(&m.as_str())));
    const VFS_ONLY: [&str; 7] = [
        "open_flags.open_flag",
        "dentry.d_name.name",
        "file.f_mode",
        "file.f_inode",
        "kiocb.ki_filp",
        "renamedata.old_dentry",
        "renamedata.new_dentry",
    ];
    const SHARED: [&str; 4] = [
        "file.f_path.dentry",
        "dentry.d_parent",
        "dentry.d_sb",
        "super_block.s_dev",
    ];
    let vfs_missing: Vec<String> = missing
        .iter()
        .filter(|m| VFS_ONLY.contains(&m.as_str()) || SHARED.contains(&m.as_str()))
        .cloned()
        .collect();
    let filter_missing: Vec<&String> = missing
        .iter()
        .filter(|m| !VFS_ONLY.contains(&m.as_str()) && m.as_str() != "inode.i_mode")
        .collect();
    if !filter_missing.is_empty() {
        tracing::warn!(
            missing = filter_missing
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            "kernel BTF lacks fields the probes read: changes outside the roots are \
             filtered in user space only"
        );
    } else {
        off.filter = 1;
    }
    (off, vfs_missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn member_offset(btf: &[u8], name: &str, member: &str) -> Option<u32> {
        Btf::parse(btf)?.member_offset(name, member)
    }

    /// A BTF blob with one int and `struct s { int a; int b; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0";
        let mut types = Vec::new();
        let mut push = |v: u32| types.extend_from_slice(&v.to_le_bytes());
        // [1] int, 4 bytes.
        push(1);
        push(1 << 24);
        push(4);
        push(32);
        // [2] struct s, 2 members, 8 bytes.
        push(5);
        push((4 << 24) | 2);
        push(8);
        for (name, bits) in [(7, 0), (9, 32)] {
            push(name);
            push(1);
            push(bits);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9fu16.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_member_offsets() {
        let b = blob();
        assert_eq!(member_offset(&b, "s", "a"), Some(0));
        assert_eq!(member_offset(&b, "s", "b"), Some(4));
        assert_eq!(member_offset(&b, "s", "c"), None);
        assert_eq!(member_offset(&b, "t", "a"), None);
    }

    #[test]
    fn finds_task_struct_in_this_kernel() {
        let Ok(b) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            return;
        };
        let parent = member_offset(&b, "task_struct", "real_parent");
        let tgid = member_offset(&b, "task_struct", "tgid");
        assert!(parent.is_some_and(|p| p > 0), "real_parent {parent:?}");
        assert!(tgid.is_some_and(|t| t > 0), "tgid {tgid:?}");
    }

    /// The kernel struct fields the ebpf probes read (see `kernel_offsets`).
    const PROBE_FIELDS: &[(&str, &str)] = &[
        ("task_struct", "real_parent"),
        ("task_struct", "tgid"),
        ("task_struct", "files"),
        ("files_struct", "fdt"),
        ("fdtable", "max_fds"),
        ("fdtable", "fd"),
        ("file", "f_path.dentry"),
        ("task_struct", "fs"),
        ("fs_struct", "pwd.dentry"),
        ("dentry", "d_parent"),
        ("dentry", "d_inode"),
        ("dentry", "d_sb"),
        ("inode", "i_ino"),
        ("super_block", "s_dev"),
        ("dentry", "d_name.name"),
        ("file", "f_mode"),
        ("file", "f_inode"),
        ("kiocb", "ki_filp"),
        ("renamedata", "old_dentry"),
        ("renamedata", "new_dentry"),
        ("open_flags", "open_flag"),
    ];

    /// `bpftool btf dump format raw`, parsed: type id -> (kind, name, type id it refers
    /// to, members as (name, type id, bit offset)).
    type RawTypes = HashMap<u32, (String, String, u32, Vec<(String, u32, u32)>)>;

    fn parse_raw(text: &str) -> RawTypes {
        let mut types = RawTypes::new();
        let mut current = None;
        let field = |line: &str, key: &str| -> u32 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.parse().ok())
                .unwrap_or(0)
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('[') {
                let (id, rest) = rest.split_once("] ").expect("[id] KIND");
                let id: u32 = id.parse().expect("type id");
                let mut words = rest.splitn(2, ' ');
                let kind = words.next().unwrap_or("").to_string();
                let rest = words.next().unwrap_or("");
                let name = rest.split('\'').nth(1).unwrap_or("").to_string();
                types.insert(id, (kind, name, field(rest, "type_id="), Vec::new()));
                current = Some(id);
            } else if let (Some(id), Some(member)) = (current, line.strip_prefix('\t')) {
                let name = member.split('\'').nth(1).unwrap_or("").to_string();
                let entry = types.get_mut(&id).expect("current type");
                let bits = member
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("bits_offset="))
                    .and_then(|b| b.parse().ok());
                if let Some(bits) = bits {
                    entry.3.push((name, field(member, "type_id="), bits));
                }
            }
        }
        types
    }

    /// The same lookup as [`Btf::member_offset`], done on bpftool's decoding.
    fn raw_offset(types: &RawTypes, id: u32, path: &[&str]) -> Option<u32> {
        let composite = |mut id: u32| {
            for _ in 0..16 {
                let (kind, _, to, _) = types.get(&id)?;
                match kind.as_str() {
                    "STRUCT" | "UNION" => return Some(id),
                    "TYPEDEF" | "CONST" | "VOLATILE" | "RESTRICT" | "TYPE_TAG" => id = *to,
                    _ => return None,
                }
            }
            None
        };
        let (first, rest) = path.split_first()?;
        for (name, ty, bits) in &types.get(&id)?.3 {
            if name == first {
                return if rest.is_empty() {
                    Some(bits / 8)
                } else {
                    Some(bits / 8 + raw_offset(types, composite(*ty)?, rest)?)
                };
            }
            if name == "(anon)"
                && let Some(inner) = composite(*ty)
                && let Some(off) = raw_offset(types, inner, path)
            {
                return Some(bits / 8 + off);
            }
        }
        None
    }

    /// Every offset the probes use agrees with what bpftool decodes from this kernel's
    /// BTF (an independent reader), including members inside anonymous unions.
    #[test]
    fn probe_offsets_agree_with_bpftool() {
        const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
        let ci = std::env::var_os("CI").is_some_and(|v| v == "true");
        let Ok(blob) = std::fs::read(VMLINUX) else {
            assert!(!ci, "{VMLINUX} is missing");
            eprintln!("skipped: no {VMLINUX}");
            return;
        };
        // Debian installs it in /usr/sbin, which a non-login PATH may lack.
        let bpftool = ["bpftool", "/usr/sbin/bpftool"]
            .into_iter()
            .find(|b| {
                std::process::Command::new(b)
                    .arg("version")
                    .output()
                    .is_ok()
            })
            .unwrap_or("bpftool");
        let out = match std::process::Command::new(bpftool)
            .args(["btf", "dump", "file", VMLINUX, "format", "raw"])
            .output()
        {
            Ok(out) if out.status.success() => out,
            other => {
                assert!(
                    !ci,
                    "bpftool btf dump failed: {other:?} (cargo xtask setup installs it)"
                );
                eprintln!("skipped: bpftool not available: {other:?}");
                return;
            }
        };
        let types = parse_raw(&String::from_utf8_lossy(&out.stdout));
        let btf = Btf::parse(&blob).expect("kernel BTF parses");
        for (name, path) in PROBE_FIELDS {
            let id = types
                .iter()
                .filter(|(_, (kind, n, _, _))| kind == "STRUCT" && n == name)
                .map(|(id, _)| *id)
                .min()
                .unwrap_or_else(|| panic!("bpftool lists no struct {name}"));
            let theirs = raw_offset(&types, id, &path.split('.').collect::<Vec<_>>());
            let ours = btf.member_offset(name, path);
            assert!(ours.is_some(), "{name}.{path}: not found");
            assert_eq!(ours, theirs, "{name}.{path}");
        }
    }
}
