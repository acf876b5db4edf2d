//! `cargo xtask vm -- CMD [ARGS...]`: runs a command in a qemu guest booting a stock Debian
//! kernel, to try what the host kernel refuses (fentry, fexit and LSM BPF programs, say).
//!
//! The guest sees the host's whole filesystem read-only over virtio-9p, so the project's
//! binaries run there as they are (same paths, same shared libraries). The project directory,
//! the cargo target directory and every `--rw` directory are shared writable; /tmp, /run and
//! /var/tmp are the guest's own tmpfs. The command runs as root, in the directory `cargo xtask`
//! was started from, with stdin from /dev/null; its stdout and stderr come back on their own
//! streams and its exit status is the task's.
//!
//! Parts: the kernel (`vmlinuz` and the few modules for virtio, 9p and the console ports) is
//! taken from the Debian package by `apt-get download` into a cache under the cargo home,
//! never installed on the host; a small initramfs (busybox-static, those modules, a shell
//! init) is written for every run, loads the modules, mounts the shares, proc, sys, dev,
//! securityfs, debugfs, tracefs and bpffs and switches root to the host's tree. The
//! kernel boots with `lsm=...,bpf`, so BPF LSM programs attach as well as fentry/fexit ones.
//! The command's output and exit status come back over virtio console ports (files qemu
//! appends to, relayed as they grow); the serial console carries the kernel's log only.
//!
//! The CPU: KVM where the host shows hardware virtualisation, else TCG, qemu's emulator
//! (with the uncompressed kernel a TCG guest starts the command about 2.5 s after qemu does;
//! the command itself runs several times slower than on the host). A /dev/kvm without
//! vmx/svm (a paravirtual KVM inside a VM) cannot run a stock kernel in useful time: `auto`
//! skips it.
//!
//! Limits: no network but loopback; 9p cannot report file handles to fanotify (the guest's
//! tmpfs /tmp can, so fanotify tests keep their trees there); a run killed with Ctrl-C leaves
//! its run directory in the temporary directory.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};

#[derive(Args)]
pub struct VmArgs {
    /// How the guest CPU runs: kvm needs hardware virtualisation (vmx or svm in
    /// /proc/cpuinfo) and /dev/kvm; tcg emulates; auto takes kvm when it is there.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Guest memory, MiB (/tmp is a tmpfs that may take half of it).
    #[arg(long, default_value_t = 2048)]
    mem: u32,
    /// Seconds after which the guest is killed, boot included (the task then exits with 124).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// A host directory the guest may write to, besides the project and its target directory
    /// (repeatable).
    #[arg(long, value_name = "DIR")]
    rw: Vec<PathBuf>,
    /// The Debian package of the guest kernel: a metapackage such as linux-image-amd64
    /// (resolved to the image it depends on) or an image package itself.
    #[arg(long, default_value = "linux-image-amd64", value_name = "PACKAGE")]
    kernel: String,
    /// Print the guest's kernel log (its serial console) after the command.
    #[arg(long)]
    kernel_log: bool,
    /// Keep this run's files (initramfs, console log, the qemu command line) and say where.
    #[arg(long)]
    keep: bool,
    /// The command to run in the guest, and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    cmd: Vec<OsString>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Accel {
    Auto,
    Kvm,
    Tcg,
}

/// Modules the init loads (with what they depend on, found in the modules themselves): the
/// PCI transport of virtio, the console ports the command's output and status come back on,
/// and 9p over virtio.
const MODULES: [&str; 4] = ["virtio_pci", "virtio_console", "9pnet_virtio", "9p"];

/// The guest's LSMs: Debian's (apparmor the major one) with bpf, so BPF LSM programs attach.
const LSM: &str = "lockdown,capability,landlock,yama,apparmor,bpf";

/// Bumped when what the kernel cache holds changes (the module list, say).
const CACHE_LAYOUT: &str = "v2";

/// 9p message size: the largest that Linux's virtio transport takes whole.
const MSIZE: u32 = 262_144;

/// Runs the command in a guest; returns its exit status (124 when it timed out).
pub fn run(root: &Path, cwd: &Path, args: VmArgs) -> anyhow::Result<i32> {
    ensure_host_tools()?;
    let kernel = kernel(&args.kernel)?;
    let accel = match args.accel {
        Accel::Auto if kvm_usable() => Accel::Kvm,
        Accel::Auto => Accel::Tcg,
        a => a,
    };
    if args.accel == Accel::Auto && accel == Accel::Tcg {
        eprintln!(
            "xtask: vm: no hardware virtualisation here (no vmx/svm in /proc/cpuinfo or no \
             usable /dev/kvm): emulating the guest CPU with TCG"
        );
    }

    let mut rw = vec![root.to_path_buf(), target_dir(root)];
    rw.extend(args.rw.iter().cloned());
    let rw = writable_dirs(rw)?;

    let run = RunDir::new(args.keep)?;
    let script = command_script(cwd, &args.cmd)?;
    let init = init_script(&kernel.modules, &rw);
    let initramfs = run.0.join("initramfs.cpio");
    write_initramfs(&initramfs, &kernel, &init, &script)?;

    let files = ["console.log", "stdout", "stderr", "status", "qemu.log"].map(|f| run.0.join(f));
    let [console, out, err, status_file, qemu_log] = &files;
    for f in [out, err, status_file] {
        File::create(f)?;
    }

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-machine", "q35"]);
    match accel {
        Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
        _ => qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    qemu.arg("-smp").arg(args.cpus.to_string());
    qemu.arg("-m").arg(format!("{}M", args.mem));
    qemu.arg("-kernel").arg(kernel.image());
    qemu.arg("-initrd").arg(&initramfs);
    let cmdline = format!("console=ttyS0 quiet panic=-1 mitigations=off lsm={LSM}");
    qemu.arg("-append").arg(cmdline);
    qemu.arg("-serial").arg(qemu_path("file:", console));
    qemu.args(["-device", "virtio-serial-pci,id=ports"]);
    for (nr, (name, file)) in [("stdout", out), ("stderr", err), ("status", status_file)]
        .into_iter()
        .enumerate()
    {
        qemu.arg("-chardev")
            .arg(qemu_path(&format!("file,id={name},path="), file))
            .arg("-device")
            .arg(format!(
                "virtserialport,bus=ports.0,nr={},chardev={name},name={name}",
                nr + 1
            ));
    }
    let shares = std::iter::once((Path::new("/"), "readonly=on"))
        .chain(rw.iter().map(|d| (d.as_path(), "")));
    for (i, (dir, extra)) in shares.enumerate() {
        let mut fsdev = qemu_path(
            &format!("local,id=fs{i},security_model=none,multidevs=remap,path="),
            dir,
        );
        if !extra.is_empty() {
            fsdev.push(",");
            fsdev.push(extra);
        }
        qemu.arg("-fsdev")
            .arg(fsdev)
            .arg("-device")
            .arg(format!("virtio-9p-pci,fsdev=fs{i},mount_tag=fs{i}"));
    }
    let log = File::create(qemu_log)?;
    qemu.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);

    std::fs::write(run.0.join("qemu.cmd"), format!("{qemu:?}\n"))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    let mut child = Guest(qemu.spawn().context("starting qemu-system-x86_64")?);
    let mut relays = [
        Relay::new(out, Box::new(std::io::stdout()))?,
        Relay::new(err, Box::new(std::io::stderr()))?,
    ];
    let exited = loop {
        let exited = child.0.try_wait()?;
        for r in &mut relays {
            r.pump()?;
        }
        if let Some(st) = exited {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.0.kill();
            let _ = child.0.wait();
            eprintln!(
                "xtask: vm: the guest did not finish within {} s (--timeout), killed; its \
                 console:\n{}",
                args.timeout,
                tail(console)
            );
            // As timeout(1) says it.
            return Ok(124);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = started.elapsed();
    if args.kernel_log {
        eprintln!("{}", std::fs::read_to_string(console).unwrap_or_default());
    }
    let reported = std::fs::read_to_string(status_file).unwrap_or_default();
    match reported.trim().parse::<i32>() {
        Ok(code) => {
            if args.kernel_log {
                eprintln!(
                    "xtask: vm: {} ({}) under {}: exit status {code} after {:.1} s",
                    kernel.package,
                    kernel.release,
                    accel_name(accel),
                    elapsed.as_secs_f64()
                );
            }
            Ok(code)
        }
        Err(_) => bail!(
            "the guest stopped ({exited}) without reporting the command's exit status; \
             qemu said:\n{}\nits console:\n{}",
            std::fs::read_to_string(qemu_log).unwrap_or_default().trim(),
            tail(console)
        ),
    }
}

fn accel_name(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "kvm",
        _ => "tcg",
    }
}

/// qemu-system-x86 and a static busybox (the `busybox` package is dynamically linked).
fn ensure_host_tools() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if !crate::on_path("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if !deb_installed("busybox-static") {
        missing.push("busybox-static");
    }
    crate::apt_install(&missing)
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// KVM runs a stock kernel only with hardware virtualisation; a /dev/kvm without it (a
/// paravirtual KVM in a guest, say) crawls through the kernel's boot for minutes.
fn kvm_usable() -> bool {
    let hardware = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    });
    hardware
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => root.join(d),
        None => root.join("target"),
    }
}

/// Canonical, existing, and none inside another (which shares it already).
fn writable_dirs(dirs: Vec<PathBuf>) -> anyhow::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        let d = d
            .canonicalize()
            .with_context(|| format!("resolving {}", d.display()))?;
        if d == Path::new("/") {
            bail!("--rw /: the host's root is shared read-only");
        }
        out.push(d);
    }
    out.sort();
    out.dedup();
    let all = out.clone();
    out.retain(|d| !all.iter().any(|o| o != d && d.starts_with(o)));
    Ok(out)
}

/// A qemu option value ending in a path: commas in the path doubled, as qemu's option syntax
/// wants.
fn qemu_path(prefix: &str, path: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    let bytes = path.as_os_str().as_bytes();
    let mut escaped = Vec::with_capacity(bytes.len());
    for &b in bytes {
        escaped.push(b);
        if b == b',' {
            escaped.push(b',');
        }
    }
    s.push(OsStr::from_bytes(&escaped));
    s
}

/// The guest kernel, ready in the cache.
struct Kernel {
    package: String,
    release: String,
    dir: PathBuf,
    /// Module file names, in the order they load.
    modules: Vec<String>,
}

impl Kernel {
    /// The uncompressed kernel when there is one: qemu boots it straight at its PVH entry,
    /// seconds sooner under TCG than through the compressed image's own decompressor.
    fn image(&self) -> PathBuf {
        let elf = self.dir.join("vmlinux");
        if elf.is_file() {
            elf
        } else {
            self.dir.join("vmlinuz")
        }
    }
}

/// The ELF kernel inside a bzImage (its payload, decompressed), if it has a PVH entry.
fn vmlinux(bzimage: &[u8]) -> anyhow::Result<Vec<u8>> {
    let u32_at = |at: usize| -> anyhow::Result<usize> {
        let b = bzimage
            .get(at..at + 4)
            .context("truncated kernel image header")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not a bzImage");
    }
    // Boot protocol: setup sectors at 0x1f1; payload offset and length (from the
    // protected-mode code, which follows the setup) at 0x248 and 0x24c.
    let setup = (usize::from(bzimage[0x1f1]).max(4) + 1) * 512;
    let start = setup + u32_at(0x248)?;
    // The payload ends in the kernel's uncompressed size, 4 bytes that are not the stream's.
    let payload = bzimage
        .get(start..(start + u32_at(0x24c)?).saturating_sub(4))
        .context("kernel payload out of the image")?;
    let tool = if payload.starts_with(b"\xfd7zXZ\0") {
        "xz"
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "zstd"
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        "gzip"
    } else {
        bail!("kernel payload in an unknown compression");
    };
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {tool}"))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let input = payload.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    if !out.status.success() || !out.stdout.starts_with(b"\x7fELF") {
        bail!("{tool} -dc of the kernel payload failed");
    }
    // XEN_ELFNOTE_PHYS32_ENTRY (18) in a "Xen" note: the PVH entry qemu boots. A note
    // header: name size (4), descriptor size (any), type, then the name.
    let pvh = out.stdout.windows(16).any(|w| {
        w[..4] == 4u32.to_le_bytes() && w[8..12] == 18u32.to_le_bytes() && &w[12..] == b"Xen\0"
    });
    if !pvh {
        bail!("the kernel has no PVH entry");
    }
    Ok(out.stdout)
}

/// Resolves the kernel package with apt and extracts what the guest needs, once per image
/// package; works offline from the cache when apt cannot tell.
fn kernel(requested: &str) -> anyhow::Result<Kernel> {
    let cache = crate::cargo_home()?.join("watcher-vm").join(CACHE_LAYOUT);
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c);
    if requested.is_empty() || !requested.chars().all(valid) {
        bail!("--kernel {requested:?} is not a Debian package name");
    }
    let resolved = image_package(requested).or_else(|_| {
        // apt's lists may be missing (a fresh container): fetch them once.
        crate::apt_update()?;
        image_package(requested)
    });
    // What the request resolved to last time, for when apt cannot tell (offline, say).
    let memo = cache.join("resolved").join(requested);
    let package = match resolved {
        Ok(p) => {
            std::fs::create_dir_all(cache.join("resolved"))?;
            std::fs::write(&memo, &p)?;
            p
        }
        Err(e) => match std::fs::read_to_string(&memo) {
            Ok(p) if cache.join(p.trim()).join("release").is_file() => {
                eprintln!("xtask: vm: {e:#}; using {} as last time", p.trim());
                p.trim().to_string()
            }
            _ => return Err(e),
        },
    };
    let dir = cache.join(&package);
    if !dir.join("release").is_file() {
        extract_kernel(&package, &cache, &dir)?;
    }
    let release = std::fs::read_to_string(dir.join("release"))?
        .trim()
        .to_string();
    let modules = std::fs::read_to_string(dir.join("modules/order"))?
        .lines()
        .map(str::to_string)
        .collect();
    Ok(Kernel {
        package,
        release,
        dir,
        modules,
    })
}

/// `linux-image-amd64` → `linux-image-6.1.0-56-amd64`: the image a metapackage depends on,
/// or the package itself when it is an image.
fn image_package(requested: &str) -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", requested])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.trim().is_empty() {
        bail!(
            "apt-cache knows no package {requested}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let is_image = |p: &str| {
        p.strip_prefix("linux-image-")
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    };
    let dep = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| is_image(p));
    match dep {
        Some(p) => Ok(p.to_string()),
        None if is_image(requested) => Ok(requested.to_string()),
        None => bail!("{requested} is no kernel image package and depends on none"),
    }
}

fn extract_kernel(package: &str, cache: &Path, dest: &Path) -> anyhow::Result<()> {
    eprintln!("xtask: vm: fetching {package} (kept in {})", dest.display());
    let staging = cache.join(format!(".staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let result = (|| {
        let mut download = Command::new("apt-get");
        download.arg("download").arg("-qq");
        if crate::nix_is_root() {
            // apt's download sandbox user could not write here; root itself can.
            download.args(["-o", "APT::Sandbox::User=root"]);
        }
        crate::status(download.arg(package).current_dir(&staging))?;
        let deb = std::fs::read_dir(&staging)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        let tree = staging.join("tree");
        crate::status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        let out = staging.join("out");
        std::fs::create_dir_all(out.join("modules"))?;

        let vmlinuz = std::fs::read_dir(tree.join("boot"))?
            .filter_map(Result::ok)
            .find(|e| e.file_name().as_bytes().starts_with(b"vmlinuz-"))
            .context("no boot/vmlinuz-* in the package")?;
        let release = vmlinuz.file_name().to_string_lossy()["vmlinuz-".len()..].to_string();
        std::fs::copy(vmlinuz.path(), out.join("vmlinuz"))?;
        match vmlinux(&std::fs::read(vmlinuz.path())?) {
            Ok(elf) => std::fs::write(out.join("vmlinux"), elf)?,
            Err(e) => eprintln!("xtask: vm: booting the compressed kernel (slower): {e:#}"),
        }
        let moddir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| tree.join(d).join(&release))
            .find(|d| d.is_dir())
            .with_context(|| format!("no modules for {release} in the package"))?;
        let order = module_closure(&moddir, &out.join("modules"))?;
        std::fs::write(out.join("modules/order"), order.join("\n") + "\n")?;
        let version = Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Version")
            .output()?;
        std::fs::write(out.join("version"), &version.stdout)?;
        // Written last: its presence means the rest is complete.
        std::fs::write(out.join("release"), format!("{release}\n"))?;
        let _ = std::fs::remove_dir_all(dest);
        if let Err(e) = std::fs::rename(&out, dest) {
            // Another run may have put it there in the meantime.
            if !dest.join("release").is_file() {
                return Err(e).with_context(|| format!("moving the kernel to {}", dest.display()));
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Copies MODULES and every module they depend on (their `depends=` modinfo) from `moddir`
/// into `into`, uncompressed; returns the file names in load order.
fn module_closure(moddir: &Path, into: &Path) -> anyhow::Result<Vec<String>> {
    let mut files = BTreeMap::new();
    index_modules(moddir, &mut files)?;
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for m in MODULES {
        visit_module(m, &files, into, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// Module name (dashes as underscores) → its file.
fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        if e.file_type()?.is_dir() {
            index_modules(&path, files)?;
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = [".ko", ".ko.xz", ".ko.zst"]
            .iter()
            .find_map(|ext| name.strip_suffix(ext))
        {
            files.insert(stem.replace('-', "_"), path);
        }
    }
    Ok(())
}

fn visit_module(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    into: &Path,
    seen: &mut HashSet<String>,
    order: &mut Vec<String>,
) -> anyhow::Result<()> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    let Some(path) = files.get(&name) else {
        // Not a module: built into this kernel.
        return Ok(());
    };
    let bytes = read_module(path)?;
    for dep in modinfo(&bytes, "depends")
        .split(',')
        .filter(|d| !d.is_empty())
    {
        visit_module(dep, files, into, seen, order)?;
    }
    let file = format!("{name}.ko");
    std::fs::write(into.join(&file), &bytes)?;
    order.push(file);
    Ok(())
}

fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let decompressor = match path.extension().and_then(|x| x.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        _ => return Ok(std::fs::read(path)?),
    };
    let out = Command::new(decompressor)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {decompressor} -dc {}", path.display()))?;
    if !out.status.success() {
        bail!("{decompressor} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

/// A `key=value` of a module's .modinfo section: NUL-separated strings.
fn modinfo(module: &[u8], key: &str) -> String {
    let needle = format!("\0{key}=");
    let needle = needle.as_bytes();
    module
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|at| {
            let value = &module[at + needle.len()..];
            let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
            String::from_utf8_lossy(&value[..end]).into_owned()
        })
        .unwrap_or_default()
}

/// A word for a POSIX shell, single-quoted.
fn sh_quote(s: &[u8]) -> Vec<u8> {
    let mut q = vec![b'\''];
    for &b in s {
        if b == b'\'' {
            q.extend_from_slice(b"'\\''");
        } else {
            q.push(b);
        }
    }
    q.push(b'\'');
    q
}

/// Environment variables the command gets from the host (others it gets not, since the
/// guest is not the host: no display, no agent sockets).
fn forwarded(name: &str) -> bool {
    matches!(
        name,
        "PATH"
            | "HOME"
            | "USER"
            | "LOGNAME"
            | "LANG"
            | "LC_ALL"
            | "TZ"
            | "TERM"
            | "CI"
            | "CARGO_HOME"
            | "CARGO_TARGET_DIR"
            | "RUSTUP_HOME"
            | "RUSTUP_TOOLCHAIN"
    ) || name.starts_with("RUST_")
        || name.starts_with("WATCHER_")
}

/// The command, for the guest's shell: the forwarded environment, the directory, then exec.
fn command_script(cwd: &Path, cmd: &[OsString]) -> anyhow::Result<Vec<u8>> {
    let mut s = Vec::new();
    for (k, v) in std::env::vars_os() {
        let Some(name) = k.to_str() else { continue };
        if !forwarded(name) || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        s.extend_from_slice(format!("export {name}=").as_bytes());
        s.extend(sh_quote(v.as_bytes()));
        s.push(b'\n');
    }
    s.extend_from_slice(b"cd ");
    s.extend(sh_quote(cwd.as_os_str().as_bytes()));
    s.extend_from_slice(b" || exit 125\nexec");
    if cmd.is_empty() {
        bail!("no command given");
    }
    for a in cmd {
        s.push(b' ');
        s.extend(sh_quote(a.as_bytes()));
    }
    s.push(b'\n');
    Ok(s)
}

/// The initramfs's /init (busybox sh): modules, mounts, then switch_root to the host's tree,
/// where /run/xtask-vm/pid1.sh runs the command and powers off.
fn init_script(modules: &[String], rw: &[PathBuf]) -> Vec<u8> {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "xtask-vm: $*"; poweroff -f; sleep 10; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
"#,
    );
    for m in modules {
        s += &format!("insmod /lib/modules/{m} || fail insmod {m}\n");
    }
    let opts = format!("trans=virtio,version=9p2000.L,msize={MSIZE}");
    s += &format!(
        "mount -t 9p -o {opts},ro,cache=loose fs0 /newroot || fail mounting the host root\n"
    );
    s += "for d in /tmp /run /var/tmp; do mount -t tmpfs -o mode=1777 tmpfs /newroot$d || fail tmpfs $d; done\n";
    for (i, d) in rw.iter().enumerate() {
        let q = String::from_utf8_lossy(&sh_quote(d.as_os_str().as_bytes())).into_owned();
        s += &format!(
            "mkdir -p /newroot{q} && mount -t 9p -o {opts},cache=mmap fs{} /newroot{q} || fail mounting {q}\n",
            i + 1
        );
    }
    s += r#"cd /newroot
mount -t proc proc proc || fail proc
mount -t sysfs sysfs sys || fail sysfs
mount -t devtmpfs devtmpfs dev || fail devtmpfs
mkdir -p dev/pts dev/shm
mount -t devpts devpts dev/pts
mount -t tmpfs -o mode=1777 tmpfs dev/shm
mount -t securityfs securityfs sys/kernel/security || fail securityfs
mount -t debugfs debugfs sys/kernel/debug || fail debugfs
mount -t tracefs tracefs sys/kernel/tracing || fail tracefs
mount -t bpf bpf sys/fs/bpf || fail bpffs
mount -t cgroup2 cgroup2 sys/fs/cgroup || fail cgroup2
cd /
ip link set lo up
hostname xtask-vm
port() {
  i=0
  while [ $i -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
      [ "$(cat $p/name 2>/dev/null)" = "$1" ] && echo /dev/${p##*/} && return
    done
    sleep 0.05; i=$((i+1))
  done
  fail "no virtio port $1"
}
out=$(port stdout) && err=$(port stderr) && st=$(port status) || fail ports
mkdir -p /newroot/run/xtask-vm
cp /bin/busybox /pid1.sh /cmd.sh /newroot/run/xtask-vm/ || fail copying
umount /proc /sys /dev
echo "xtask-vm: starting the command at $(cut -d' ' -f1 /newroot/proc/uptime) s"
exec switch_root /newroot /run/xtask-vm/busybox sh /run/xtask-vm/pid1.sh $out $err $st
"#;
    s.into_bytes()
}

/// PID 1 in the host's tree: the command, its status on the status port, power off.
const PID1: &str = r#"B=/run/xtask-vm/busybox
$B env -i $B sh /run/xtask-vm/cmd.sh </dev/null >$1 2>$2
echo $? >$3
$B poweroff -f
$B sleep 10
"#;

fn write_initramfs(path: &Path, kernel: &Kernel, init: &[u8], cmd: &[u8]) -> anyhow::Result<()> {
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        c.dir(d);
    }
    c.node("dev/console", 0o020_600, 5, 1);
    let busybox = std::fs::read("/bin/busybox").context("reading /bin/busybox")?;
    c.file("bin/busybox", 0o755, &busybox);
    c.file("init", 0o755, init);
    c.file("pid1.sh", 0o644, PID1.as_bytes());
    c.file("cmd.sh", 0o644, cmd);
    for m in &kernel.modules {
        let bytes = std::fs::read(kernel.dir.join("modules").join(m))?;
        c.file(&format!("lib/modules/{m}"), 0o644, &bytes);
    }
    std::fs::write(path, c.finish())?;
    Ok(())
}

/// A cpio archive in the "newc" format the kernel unpacks.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o170_000 == 0o040_000 { 2 } else { 1 },
            0,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn node(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.entry(name, mode, (major, minor), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// Copies what qemu appended to a file since the last call.
struct Relay {
    file: File,
    to: Box<dyn Write>,
    buf: Vec<u8>,
}

impl Relay {
    fn new(path: &Path, to: Box<dyn Write>) -> anyhow::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
            to,
            buf: vec![0; 64 * 1024],
        })
    }

    fn pump(&mut self) -> anyhow::Result<()> {
        loop {
            let n = self.file.read(&mut self.buf)?;
            if n == 0 {
                return Ok(self.to.flush()?);
            }
            self.to.write_all(&self.buf[..n])?;
        }
    }
}

/// qemu, killed if the task stops early.
struct Guest(Child);

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A directory for one run's files, removed afterwards.
struct RunDir(PathBuf, bool);

impl RunDir {
    fn new(keep: bool) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("xtask-vm-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir, keep))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.1 {
            eprintln!("xtask: vm: this run's files are in {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
