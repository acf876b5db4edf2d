//! Loading the probes: the eBPF object embedded at build time, its maps filled (kernel
//! struct offsets, the root filter, the processes to ignore) and one of its two probe
//! sets attached. Kept apart from reading records so that `watcher check` can try both
//! sets without starting a backend.

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use aya::programs::{FEntry, FExit, RawTracePoint};
use aya::{Ebpf, EbpfLoader};
use watcher_ebpf_common as common;

use super::{EbpfOptions, ProbeChoice};
use crate::backend::{BackendError, OwnPids, Support};

#[derive(Clone, Copy)]
#[repr(transparent)]
struct Offsets(common::KernelOffsets);
// SAFETY: plain old data (u32 fields), no padding.
unsafe impl aya::Pod for Offsets {}

#[derive(Clone, Copy)]
#[repr(transparent)]
struct RootPathEntry(common::RootPath);
// SAFETY: plain old data (a u32 and bytes), no padding.
unsafe impl aya::Pod for RootPathEntry {}

#[derive(Clone, Copy)]
#[repr(transparent)]
struct Key(common::RootKey);
// SAFETY: plain old data with its padding spelled out as a field.
unsafe impl aya::Pod for Key {}

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/watcher-ebpf"));

/// The two probe sets in the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProbeSet {
    /// fentry/fexit on VFS functions: every writer, paths built in the kernel.
    Vfs,
    /// Raw tracepoints on syscall entry and exit: ordinary processes' syscalls.
    Syscalls,
}

impl ProbeSet {
    pub(super) fn describe(self) -> &'static str {
        match self {
            ProbeSet::Vfs => "vfs (fentry/fexit on the kernel's VFS functions)",
            ProbeSet::Syscalls => {
                "syscalls (raw tracepoints sys_enter, sys_exit, sched_process_exit)"
            }
        }
    }
}

pub(super) fn err(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Ebpf(format!("{what}: {e}"))
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map, BackendError> {
    ebpf.map_mut(name)
        .ok_or_else(|| err("eBPF object", format!("no map {name}")))
}

/// What the maps are filled with, worked out once per start (reading and parsing the
/// kernel's BTF, stat-ing the roots) whichever probe set is then tried.
struct MapContents {
    offsets: common::KernelOffsets,
    /// Fields the VFS probe set needs that the kernel's BTF lacks.
    vfs_missing: Vec<String>,
    /// Whether the BTF has every field the in-kernel filter reads.
    filter_available: bool,
    roots: Vec<(common::RootKey, u32)>,
    devices: Vec<u32>,
    /// The roots as absolute paths (empty: absolute paths are never dropped).
    root_paths: Vec<common::RootPath>,
    /// Processes whose syscalls the probes drop, with every process they fork.
    ignored: Vec<u32>,
}

/// The maps' contents for `roots`, with the in-kernel filter when `filter` is on and
/// the kernel's BTF has every field it needs; the processes of `own` are ignored.
fn map_contents(roots: &[PathBuf], filter: bool, own: &OwnPids) -> MapContents {
    let (mut offsets, vfs_missing) = super::btf::kernel_offsets();
    let filter_available = offsets.filter != 0;
    let (keys, devices) = if filter_available && filter {
        super::root_filter::root_filter(roots, &crate::backend::mountinfo::mounts(), dev_ino)
    } else {
        Default::default()
    };
    offsets.filter = u32::from(!devices.is_empty());
    let root_paths = if offsets.filter != 0 {
        super::root_filter::root_paths(roots)
    } else {
        Vec::new()
    };
    offsets.root_paths = root_paths.len() as u32;
    if filter_available && filter {
        tracing::info!(
            directories = keys.len(),
            filesystems = devices.len(),
            absolute_paths = !root_paths.is_empty(),
            on = offsets.filter != 0,
            "ebpf in-kernel filter by root"
        );
    }
    MapContents {
        offsets,
        vfs_missing,
        filter_available,
        roots: keys,
        devices,
        root_paths,
        ignored: own.snapshot().into_iter().map(|pid| pid as u32).collect(),
    }
}

/// `path`'s device (major, minor) and inode.
fn dev_ino(path: &Path) -> Option<(u32, u32, u64)> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).ok()?;
    let dev = md.dev();
    Some((libc::major(dev), libc::minor(dev), md.ino()))
}

/// Lets the in-kernel filter pass the changes on the filesystem mounted at `mount_point`
/// (mounted below a root after the probes were loaded), as it does for mounts there at
/// start-up. Entries are only added: one left from an unmounted filesystem lets no more
/// through than its device's other mounts would.
pub(super) fn filter_mount(ebpf: &mut Ebpf, mount_point: &Path) -> Result<(), BackendError> {
    let (keys, devices) = super::root_filter::root_filter(
        &[mount_point.to_path_buf()],
        &crate::backend::mountinfo::mounts(),
        dev_ino,
    );
    {
        let mut map: BpfHashMap<&mut MapData, Key, u32> =
            BpfHashMap::try_from(map_mut(ebpf, common::MAP_ROOTS)?)
                .map_err(|e| err("map ROOTS", e))?;
        // The mount point itself only: its ancestors are the root's, already known.
        for (key, kind) in keys.iter().filter(|(_, kind)| *kind == common::ROOT) {
            map.insert(Key(*key), kind, 0)
                .map_err(|e| err("adding to the roots map", e))?;
        }
    }
    let mut map: BpfHashMap<&mut MapData, u32, u32> =
        BpfHashMap::try_from(map_mut(ebpf, common::MAP_DEVICES)?)
            .map_err(|e| err("map DEVICES", e))?;
    for dev in &devices {
        map.insert(dev, 1, 0)
            .map_err(|e| err("adding to the devices map", e))?;
    }
    Ok(())
}

/// Loads the object, fills its maps from `contents` and attaches probe set `set`; the
/// ignored processes (the daemon's own tgid) are ignored from the first record on.
fn load(ringbuf_bytes: u32, contents: &MapContents, set: ProbeSet) -> Result<Ebpf, BackendError> {
    if set == ProbeSet::Vfs && !contents.vfs_missing.is_empty() {
        return Err(err(
            "vfs probes",
            format!("the kernel's BTF lacks {}", contents.vfs_missing.join(", ")),
        ));
    }
    let level = super::probe_log::probe_log_level();
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(common::MAP_EVENTS, ringbuf_bytes)
        .override_global(aya_log::LEVEL, &level, false)
        .load(OBJECT)
        .map_err(|e| err("loading the eBPF object", e))?;
    {
        let mut map: BpfHashMap<&mut MapData, Key, u32> =
            BpfHashMap::try_from(map_mut(&mut ebpf, common::MAP_ROOTS)?)
                .map_err(|e| err("map ROOTS", e))?;
        for (key, kind) in &contents.roots {
            map.insert(Key(*key), kind, 0)
                .map_err(|e| err("filling the roots map", e))?;
        }
    }
    {
        let mut map: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(map_mut(&mut ebpf, common::MAP_DEVICES)?)
                .map_err(|e| err("map DEVICES", e))?;
        for dev in &contents.devices {
            map.insert(dev, 1, 0)
                .map_err(|e| err("filling the devices map", e))?;
        }
    }
    {
        let mut map: Array<&mut MapData, RootPathEntry> =
            Array::try_from(map_mut(&mut ebpf, common::MAP_ROOT_PATHS)?)
                .map_err(|e| err("map ROOT_PATHS", e))?;
        for (i, path) in contents.root_paths.iter().enumerate() {
            map.set(i as u32, RootPathEntry(*path), 0)
                .map_err(|e| err("filling the root paths map", e))?;
        }
    }
    {
        let mut config: Array<&mut MapData, Offsets> =
            Array::try_from(map_mut(&mut ebpf, common::MAP_CONFIG)?)
                .map_err(|e| err("map CONFIG", e))?;
        config
            .set(0, Offsets(contents.offsets), 0)
            .map_err(|e| err("setting kernel struct offsets", e))?;
    }
    {
        let mut ignored: BpfHashMap<&mut MapData, u32, u32> =
            BpfHashMap::try_from(map_mut(&mut ebpf, common::MAP_IGNORED)?)
                .map_err(|e| err("map IGNORED", e))?;
        for tgid in &contents.ignored {
            ignored
                .insert(tgid, common::IGNORE_SELF, 0)
                .map_err(|e| err("ignoring the daemon's own tgid", e))?;
        }
    }
    match set {
        ProbeSet::Vfs => attach_vfs(&mut ebpf)?,
        ProbeSet::Syscalls => attach_syscalls(&mut ebpf)?,
    }
    Ok(ebpf)
}

/// Loads and attaches the fentry/fexit programs; the first the kernel refuses ends it.
fn attach_vfs(ebpf: &mut Ebpf) -> Result<(), BackendError> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| err("reading the kernel's BTF", e))?;
    for &(name, function, exit) in common::VFS_PROGRAMS {
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| err("eBPF object", format!("no program {name}")))?;
        if exit {
            let prog: &mut FExit = prog.try_into().map_err(|e| err(name, e))?;
            prog.load(function, &btf)
                .map_err(|e| err(&format!("loading fexit program on {function}"), e))?;
            prog.attach()
                .map_err(|e| err(&format!("attaching fexit program to {function}"), e))?;
        } else {
            let prog: &mut FEntry = prog.try_into().map_err(|e| err(name, e))?;
            prog.load(function, &btf)
                .map_err(|e| err(&format!("loading fentry program on {function}"), e))?;
            prog.attach()
                .map_err(|e| err(&format!("attaching fentry program to {function}"), e))?;
        }
    }
    Ok(())
}

fn attach_syscalls(ebpf: &mut Ebpf) -> Result<(), BackendError> {
    for (name, tracepoint) in [
        (common::PROG_PROCESS_EXIT, "sched_process_exit"),
        (common::PROG_SYS_ENTER, "sys_enter"),
        (common::PROG_SYS_EXIT, "sys_exit"),
    ] {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| err("eBPF object", format!("no program {name}")))?
            .try_into()
            .map_err(|e| err(name, e))?;
        prog.load()
            .map_err(|e| err(&format!("loading raw tracepoint program {name}"), e))?;
        prog.attach(tracepoint).map_err(|e| {
            err(
                &format!("attaching {name} to raw tracepoint {tracepoint}"),
                e,
            )
        })?;
    }
    Ok(())
}

/// Loads the probe set `choice` asks for: with `Auto`, the VFS set where the kernel
/// takes it, else the syscall set (the reason said in the log).
pub(super) fn load_chosen(
    options: &EbpfOptions,
    roots: &[PathBuf],
    own: &OwnPids,
) -> Result<(Ebpf, ProbeSet), BackendError> {
    let ringbuf_bytes = options.ringbuf_size();
    let contents = map_contents(roots, options.kernel_filter, own);
    let set = match options.probes {
        ProbeChoice::Vfs => ProbeSet::Vfs,
        ProbeChoice::Syscalls => ProbeSet::Syscalls,
        ProbeChoice::Auto => match load(ringbuf_bytes, &contents, ProbeSet::Vfs) {
            Ok(ebpf) => return Ok((ebpf, ProbeSet::Vfs)),
            Err(e) => {
                tracing::info!(
                    reason = %crate::backend::error_chain(&e),
                    "ebpf: the vfs probe set does not load here; using the syscall probes"
                );
                ProbeSet::Syscalls
            }
        },
    };
    Ok((load(ringbuf_bytes, &contents, set)?, set))
}

/// Rows for `watcher check`: which probe set loads and attaches here, and why not.
pub fn check() -> Vec<Support> {
    let contents = map_contents(&[], false, &OwnPids::new());
    let vfs = load(4096, &contents, ProbeSet::Vfs).map(drop);
    let syscalls = load(4096, &contents, ProbeSet::Syscalls).map(drop);
    let filter_ok = contents.filter_available;
    let say = |r: &Result<(), BackendError>| match r {
        Ok(()) => "loads and attaches".to_string(),
        Err(e) => format!("refused: {}", crate::backend::error_chain(e)),
    };
    let detail = format!(
        "probe set {}: {}; probe set {}: {}; in-kernel filter by root: {}",
        ProbeSet::Vfs.describe(),
        say(&vfs),
        ProbeSet::Syscalls.describe(),
        say(&syscalls),
        if filter_ok {
            "available"
        } else {
            "unavailable (kernel BTF lacks fields)"
        },
    );
    vec![Support {
        backend: "ebpf",
        path: None,
        ok: vfs.is_ok() || syscalls.is_ok(),
        detail,
    }]
}
