//! The eBPF probes of the ebpf backend: syscall probes (probes.rs) that load everywhere,
//! and VFS probes (vfs.rs) used where the kernel accepts fentry programs. Built for
//! bpfel-unknown-none by watcher-user's build script; a host build (a workspace-wide check
//! or clippy) is an empty program.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod probes;
#[cfg(target_arch = "bpf")]
mod vfs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
