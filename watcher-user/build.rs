//! With the `ebpf` feature, builds the eBPF probes (watcher-ebpf) for bpfel-unknown-none
//! with the nightly toolchain and bpf-linker; the object is embedded by backend/ebpf.rs.

fn main() {
    #[cfg(feature = "ebpf")]
    {
        println!("cargo:rerun-if-changed=../watcher-ebpf-common/src");
        let package = aya_build::Package {
            name: "watcher-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../watcher-ebpf"),
            ..Default::default()
        };
        if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom("nightly")) {
            panic!("building the eBPF probes (watcher-ebpf): {e:#}");
        }
    }
}
