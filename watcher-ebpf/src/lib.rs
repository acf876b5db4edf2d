//! Placeholder for the eBPF probe set. The ebpf backend is not implemented yet;
//! `watcher check` reports it as absent.
#![no_std]
