//! The VFS probe set: fentry/fexit programs on the kernel's VFS functions. Unlike the
//! syscall probes they see every caller, kernel-internal ones included (nfsd, io_uring
//! workers, writes through mmap), and the change's dentry itself, so the path is built
//! here by walking `d_parent` up to the filesystem root (user space adds the mount
//! point). Loaded only where the kernel accepts fentry programs; elsewhere user space
//! uses the syscall probes (probes.rs).
//!
//! Reports are made after the change (fexit), so a path is never synced before it
//! exists. Whether the call succeeded is not checked (the return types differ between
//! kernel versions): a failed call only costs a sync of an unchanged path. A rename's
//! old name is taken at entry (after it, the dentry carries the new name) and reported
//! with the new one at exit. Writes are reported at the first write since the file was
//! last reported and at the last close of a written file, not at every write.

use aya_ebpf::EbpfContext;
use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use aya_ebpf::helpers::generated::bpf_probe_read_kernel_str;
use aya_ebpf::macros::{fentry, fexit, map};
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::{FEntryContext, FExitContext};
use watcher_ebpf_common::abi::O_CREAT;
use watcher_ebpf_common::{KernelOffsets, VFS_PATH_BUF, VFS_PATH_LEN, VfsRecord, counter, vfs_op};

use crate::probes::{CONFIG, EVENTS, bump, ignored, lost, outside_roots, read_ptr, read_u32};

/// Names walked up from a dentry before giving up (the path is then reported unknown).
const MAX_COMPONENTS: usize = 64;
/// `FMODE_WRITE` in `file.f_mode`.
const FMODE_WRITE: u32 = 0x2;

/// Renames between their entry and exit, by thread: the old and new names.
#[map]
static RENAMES: HashMap<u64, VfsRecord> = HashMap::with_max_entries(1024, 0);

/// Room to build a rename's record at its entry (too big for the stack).
#[map]
static RENAME_SCRATCH: PerCpuArray<VfsRecord> = PerCpuArray::with_max_entries(1, 0);

/// Inodes (by address) written since they were last reported.
#[map]
static WRITTEN: LruHashMap<u64, u32> = LruHashMap::with_max_entries(1 << 16, 0);

/// Writes the path of `dentry` below its filesystem's root into `buf`, leaf first, each
/// name followed by `/`. Returns the bytes written, or -1 when the root was not reached.
#[inline(always)]
fn build_path(dentry: u64, off: &KernelOffsets, buf: *mut [u8; VFS_PATH_BUF]) -> i32 {
    let mut pos: usize = 0;
    let mut d = dentry;
    for _ in 0..MAX_COMPONENTS {
        let Some(parent) = read_ptr(d, off.d_parent) else {
            return -1;
        };
        if parent == d || parent == 0 {
            return pos as i32;
        }
        let Some(name) = read_ptr(d, off.d_name) else {
            return -1;
        };
        if pos >= VFS_PATH_LEN {
            return -1;
        }
        // A power of two: the mask shows the verifier what `pos < VFS_PATH_LEN` means.
        let at = pos & (VFS_PATH_LEN - 1);
        // SAFETY: at most 256 bytes (a name and its NUL) from `at` < VFS_PATH_LEN, inside
        // the VFS_PATH_BUF-byte buffer; the kernel string is read through the helper.
        let n = unsafe {
            bpf_probe_read_kernel_str(
                (buf as *mut u8).add(at).cast(),
                256,
                name as *const core::ffi::c_void,
            )
        };
        if n <= 1 {
            return -1;
        }
        let end = at + n as usize - 1;
        // SAFETY: `buf` is a valid record; the index is checked.
        if let Some(b) = unsafe { (*buf).get_mut(end) } {
            *b = b'/';
        }
        pos = end + 1;
        d = parent;
    }
    -1
}

/// The device of `dentry`'s filesystem.
#[inline(always)]
fn dentry_dev(dentry: u64, off: &KernelOffsets) -> u32 {
    read_ptr(dentry, off.d_sb)
        .and_then(|sb| read_u32(sb, off.s_dev))
        .unwrap_or(0)
}

/// Whether a change to `dentry` (and `other`, for a rename) is certainly outside every
/// root: judged by its parent directory, since a new or removed dentry has no inode.
#[inline(always)]
fn outside(dentry: u64, other: u64, off: &KernelOffsets) -> bool {
    if off.filter == 0 {
        return false;
    }
    let parent_outside = |d: u64| read_ptr(d, off.d_parent).is_some_and(|p| outside_roots(p, off));
    parent_outside(dentry) && (other == 0 || parent_outside(other))
}

/// Whether the current process is the daemon or one of its children (counted).
#[inline(always)]
fn own() -> bool {
    let own = ignored((bpf_get_current_pid_tgid() >> 32) as u32);
    if own {
        bump(counter::OWN_DROPPED);
    }
    own
}

/// Reports `op` on `dentry` (also for the syscall probes: a call through an fd they did
/// not see opened).
#[inline(always)]
pub(crate) fn report<C: EbpfContext>(ctx: &C, op: u32, dentry: u64) {
    if dentry == 0 || own() {
        return;
    }
    let Some(off) = CONFIG.get(0) else {
        return;
    };
    if outside(dentry, 0, off) {
        bump(counter::OUTSIDE_DROPPED);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<VfsRecord>(0) else {
        lost(ctx);
        return;
    };
    let rec = entry.as_mut_ptr();
    let id = bpf_get_current_pid_tgid();
    // SAFETY: `rec` is the reserved, exclusively owned record.
    unsafe {
        (*rec).tgid = (id >> 32) as u32;
        (*rec).pid = id as u32;
        (*rec).op = op;
        (*rec).dev = dentry_dev(dentry, off);
        (*rec).len1 = build_path(dentry, off, &raw mut (*rec).path1);
        (*rec).len2 = 0;
    }
    entry.submit(0);
    bump(counter::WRITTEN);
}

/// The dentry a `struct file` is open on.
#[inline(always)]
fn file_dentry(file: u64, off: &KernelOffsets) -> u64 {
    read_ptr(file, off.f_dentry).unwrap_or(0)
}

/// A write through `file`: reported if its inode was not written since its last report.
#[inline(always)]
fn written<C: EbpfContext>(ctx: &C, file: u64) {
    let Some(off) = CONFIG.get(0) else {
        return;
    };
    let Some(inode) = read_ptr(file, off.f_inode) else {
        return;
    };
    // SAFETY: a plain lookup.
    if unsafe { WRITTEN.get(&inode) }.is_some() {
        return;
    }
    let _ = WRITTEN.insert(&inode, &1, 0);
    report(ctx, vfs_op::MODIFY, file_dentry(file, off));
}

/// Opens with O_CREAT: regular files made by open(2), openat2 and io_uring do not go
/// through vfs_create (the filesystem's create is called directly).
#[fexit(function = "do_filp_open")]
pub fn watcher_filp_open(ctx: FExitContext) -> i32 {
    // The return value follows the three arguments: a struct file, or an error number
    // in the last page of the address space (ERR_PTR).
    let file: u64 = ctx.arg(3);
    if file == 0 || file >= -4095i64 as u64 {
        return 0;
    }
    let Some(off) = CONFIG.get(0) else {
        return 0;
    };
    let flags: u64 = ctx.arg(2);
    if read_u32(flags, off.open_flag).is_some_and(|f| f & O_CREAT != 0) {
        report(&ctx, vfs_op::CREATE, file_dentry(file, off));
    }
    0
}

#[fexit(function = "vfs_create")]
pub fn watcher_vfs_create(ctx: FExitContext) -> i32 {
    report(&ctx, vfs_op::CREATE, ctx.arg::<u64>(2));
    0
}

#[fexit(function = "vfs_mkdir")]
pub fn watcher_vfs_mkdir(ctx: FExitContext) -> i32 {
    report(&ctx, vfs_op::MKDIR, ctx.arg::<u64>(2));
    0
}

#[fexit(function = "vfs_mknod")]
pub fn watcher_vfs_mknod(ctx: FExitContext) -> i32 {
    report(&ctx, vfs_op::CREATE, ctx.arg::<u64>(2));
    0
}

#[fexit(function = "vfs_symlink")]
pub fn watcher_vfs_symlink(ctx: FExitContext) -> i32 {
    report(&ctx, vfs_op::CREATE, ctx.arg::<u64>(2));
    0
}

#[fexit(function = "vfs_link")]
pub fn watcher_vfs_link(ctx: FExitContext) -> i32 {
    report(&ctx, vfs_op::CREATE, ctx.arg::<u64>(3));
    // The old name's link count changed; it is also the name that carries a write through
    // the new one once that is gone (`ln a b; echo x >b; rm b`).
    report(&ctx, vfs_op::ATTRIB, ctx.arg::<u64>(0));
    0
}

#[fexit(function = "vfs_unlink")]
pub fn watcher_vfs_unlink(ctx: FExitContext) -> i32 {
    report(&ctx, vfs_op::REMOVE, ctx.arg::<u64>(2));
    0
}

#[fexit(function = "vfs_rmdir")]
pub fn watcher_vfs_rmdir(ctx: FExitContext) -> i32 {
    report(&ctx, vfs_op::REMOVE_DIR, ctx.arg::<u64>(2));
    0
}

#[fexit(function = "notify_change")]
pub fn watcher_notify_change(ctx: FExitContext) -> i32 {
    report(&ctx, vfs_op::ATTRIB, ctx.arg::<u64>(1));
    0
}

#[fexit(function = "vfs_setxattr")]
pub fn watcher_vfs_setxattr(ctx: FExitContext) -> i32 {
    report(&ctx, vfs_op::ATTRIB, ctx.arg::<u64>(1));
    0
}

#[fexit(function = "vfs_removexattr")]
pub fn watcher_vfs_removexattr(ctx: FExitContext) -> i32 {
    report(&ctx, vfs_op::ATTRIB, ctx.arg::<u64>(1));
    0
}

/// A rename's entry: both names, while the dentries still carry them.
#[fentry(function = "vfs_rename")]
pub fn watcher_vfs_rename_enter(ctx: FEntryContext) -> i32 {
    if own() {
        return 0;
    }
    let Some(off) = CONFIG.get(0) else {
        return 0;
    };
    let rd: u64 = ctx.arg(0);
    let old = read_ptr(rd, off.rd_old_dentry).unwrap_or(0);
    let new = read_ptr(rd, off.rd_new_dentry).unwrap_or(0);
    if old == 0 || new == 0 {
        return 0;
    }
    if outside(old, new, off) {
        bump(counter::OUTSIDE_DROPPED);
        return 0;
    }
    let Some(rec) = RENAME_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let id = bpf_get_current_pid_tgid();
    // SAFETY: this CPU's scratch record, used only within this program run.
    unsafe {
        (*rec).tgid = (id >> 32) as u32;
        (*rec).pid = id as u32;
        (*rec).op = vfs_op::RENAME;
        (*rec).dev = dentry_dev(old, off);
        (*rec).len1 = build_path(old, off, &raw mut (*rec).path1);
        (*rec).len2 = build_path(new, off, &raw mut (*rec).path2);
        let _ = RENAMES.insert(&id, &*rec, 0);
    }
    0
}

/// A rename's exit: the names taken at its entry go out now that the rename is done.
#[fexit(function = "vfs_rename")]
pub fn watcher_vfs_rename(ctx: FExitContext) -> i32 {
    let id = bpf_get_current_pid_tgid();
    let Some(rec) = RENAMES.get_ptr(&id) else {
        return 0;
    };
    // SAFETY: a map value, copied into the ring buffer by the helper.
    if EVENTS.output::<VfsRecord>(unsafe { &*rec }, 0).is_err() {
        lost(&ctx);
    } else {
        bump(counter::WRITTEN);
    }
    let _ = RENAMES.remove(&id);
    0
}

#[fentry(function = "file_modified")]
pub fn watcher_file_modified(ctx: FEntryContext) -> i32 {
    written(&ctx, ctx.arg::<u64>(0));
    0
}

#[fentry(function = "kiocb_modified")]
pub fn watcher_kiocb_modified(ctx: FEntryContext) -> i32 {
    let Some(off) = CONFIG.get(0) else {
        return 0;
    };
    if let Some(file) = read_ptr(ctx.arg::<u64>(0), off.ki_filp) {
        written(&ctx, file);
    }
    0
}

/// Writes through a shared mapping (page_mkwrite) and filesystems that update the time
/// themselves.
#[fentry(function = "file_update_time")]
pub fn watcher_file_update_time(ctx: FEntryContext) -> i32 {
    written(&ctx, ctx.arg::<u64>(0));
    0
}

/// The last close of a file: reported when it was written since its last report.
#[fentry(function = "__fput")]
pub fn watcher_fput(ctx: FEntryContext) -> i32 {
    let Some(off) = CONFIG.get(0) else {
        return 0;
    };
    let file: u64 = ctx.arg(0);
    if read_u32(file, off.f_mode).is_none_or(|mode| mode & FMODE_WRITE == 0) {
        return 0;
    }
    let Some(inode) = read_ptr(file, off.f_inode) else {
        return 0;
    };
    // SAFETY: a plain lookup.
    if unsafe { WRITTEN.get(&inode) }.is_none() {
        return 0;
    }
    let _ = WRITTEN.remove(&inode);
    report(&ctx, vfs_op::CLOSE_WRITE, file_dentry(file, off));
    0
}
