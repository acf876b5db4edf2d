//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find the offset of a
//! struct member: the ebpf backend's probe reads `task_struct` fields at offsets that
//! come from here, so one object fits every kernel build.

/// Offset in bytes of `member` in struct `name`, if the BTF has both.
pub fn member_offset(btf: &[u8], name: &str, member: &str) -> Option<u32> {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(btf.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(btf.get(at..at + 4)?.try_into().ok()?))
    };
    if u16_at(0)? != 0xeb9f {
        return None;
    }
    let hdr_len = u32_at(4)? as usize;
    let type_off = u32_at(8)? as usize;
    let type_len = u32_at(12)? as usize;
    let str_off = u32_at(16)? as usize;
    let str_len = u32_at(20)? as usize;
    let strings = btf.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
    let name_at = |off: u32| -> Option<&[u8]> {
        let rest = strings.get(off as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(&rest[..end])
    };
    let mut at = hdr_len + type_off;
    let end = at + type_len;
    while at + 12 <= end {
        let name_off = u32_at(at)?;
        let info = u32_at(at + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kflag = info >> 31 == 1;
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,
            3 => 12,
            4 | 5 => 12 * vlen,
            6 | 13 => 8 * vlen,
            15 | 19 => 12 * vlen,
            _ => 0,
        };
        if kind == 4 && name_at(name_off)? == name.as_bytes() {
            for m in 0..vlen {
                let base = at + 12 * m;
                if name_at(u32_at(base)?)? == member.as_bytes() {
                    let bits = u32_at(base + 8)?;
                    let bits = if kflag { bits & 0x00ff_ffff } else { bits };
                    return Some(bits / 8);
                }
            }
        }
        at += extra;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
