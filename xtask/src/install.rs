//! `cargo xtask install [--prefix DIR] [--destdir DIR] [--binary PATH] [--ebpf]`: the
//! binary, the systemd unit, the example configuration, shell completions and man pages,
//! where systemd, the shells and man(1) look for them.
//!
//! Under PREFIX (default /usr/local), with DESTDIR prepended to every path for staging
//! a package:
//!
//! ```text
//! bin/watcher                                   0755
//! lib/systemd/system/watcher.service            the unit, naming PREFIX/bin/watcher
//! share/bash-completion/completions/watcher
//! share/zsh/site-functions/_watcher
//! share/fish/vendor_completions.d/watcher.fish
//! share/man/man1/watcher.1, watcher-SUBCOMMAND.1
//! share/doc/watcher/watcher.toml                the example configuration
//! SYSCONFDIR/watcher/watcher.toml               the same, 0600, only if absent
//! ```
//!
//! SYSCONFDIR is /etc for the prefixes /usr and /usr/local (the daemon's default
//! configuration path), PREFIX/etc otherwise. The completions and man pages come from the
//! binary itself (`watcher completions SHELL`, `watcher man --dir`), so they match it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Where the unit and the daemon expect the binary and configuration by default.
const UNIT_BINARY: &str = "/usr/local/bin/watcher";
const UNIT_CONFIG: &str = "/etc/watcher/watcher.toml";

/// What to install and where.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The final installation prefix (what the unit names).
    pub prefix: PathBuf,
    /// Prepended to every path written (staging); empty for a real install.
    pub destdir: Option<PathBuf>,
}

impl Layout {
    /// The configuration directory the installed unit reads.
    pub fn sysconfdir(&self) -> PathBuf {
        if self.prefix == Path::new("/usr") || self.prefix == Path::new("/usr/local") {
            PathBuf::from("/etc")
        } else {
            self.prefix.join("etc")
        }
    }

    /// `path` (absolute, as installed) where it is written: under DESTDIR when staging.
    fn staged(&self, path: &Path) -> PathBuf {
        match &self.destdir {
            Some(dest) => dest.join(path.strip_prefix("/").unwrap_or(path)),
            None => path.to_path_buf(),
        }
    }

    fn under_prefix(&self, rel: &str) -> PathBuf {
        self.staged(&self.prefix.join(rel))
    }
}

/// The unit with the binary and configuration paths of this layout.
pub fn unit_text(unit: &str, layout: &Layout) -> String {
    let binary = layout.prefix.join("bin/watcher");
    let config = layout.sysconfdir().join("watcher/watcher.toml");
    unit.replace(UNIT_BINARY, &binary.to_string_lossy())
        .replace(UNIT_CONFIG, &config.to_string_lossy())
}

fn mkdir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Writes `data` to `path` with `mode`, creating its directory; says so.
fn put(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        mkdir(dir)?;
    }
    // Through a temporary file and a rename, so a running binary is replaced, not
    // overwritten in place ("text file busy").
    let tmp = path.with_extension("xtask-tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    eprintln!("xtask: installed {}", path.display());
    Ok(())
}

/// Runs `binary args` and returns its stdout.
fn output_of(binary: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(binary)
        .args(args)
        .output()
        .with_context(|| format!("running {} {args:?}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// Installs `binary` and the files of the project at `root` into `layout`.
pub fn install(binary: &Path, root: &Path, layout: &Layout) -> anyhow::Result<()> {
    let data = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let installed = layout.under_prefix("bin/watcher");
    put(&installed, &data, 0o755)?;

    let unit_path = root.join("contrib/watcher.service");
    let unit = std::fs::read_to_string(&unit_path)
        .with_context(|| format!("reading {}", unit_path.display()))?;
    put(
        &layout.under_prefix("lib/systemd/system/watcher.service"),
        unit_text(&unit, layout).as_bytes(),
        0o644,
    )?;

    for (shell, rel) in [
        ("bash", "share/bash-completion/completions/watcher"),
        ("zsh", "share/zsh/site-functions/_watcher"),
        ("fish", "share/fish/vendor_completions.d/watcher.fish"),
    ] {
        let script = output_of(&installed, &["completions", shell])?;
        put(&layout.under_prefix(rel), &script, 0o644)?;
    }

    let man_dir = layout.under_prefix("share/man/man1");
    mkdir(&man_dir)?;
    let dir = man_dir.to_string_lossy().into_owned();
    let pages = output_of(&installed, &["man", "--dir", &dir])?;
    for page in String::from_utf8_lossy(&pages).lines() {
        let _ = std::fs::set_permissions(page, std::fs::Permissions::from_mode(0o644));
        eprintln!("xtask: installed {page}");
    }

    let example_path = root.join("contrib/watcher.toml");
    let example = std::fs::read(&example_path)
        .with_context(|| format!("reading {}", example_path.display()))?;
    put(
        &layout.under_prefix("share/doc/watcher/watcher.toml"),
        &example,
        0o644,
    )?;
    let config = layout.staged(&layout.sysconfdir().join("watcher/watcher.toml"));
    if config.exists() {
        eprintln!("xtask: kept the existing {}", config.display());
    } else {
        // May name password files: readable by root alone, as `watcher config check` wants.
        put(&config, &example, 0o600)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the binary: answers `completions SHELL` and `man --dir DIR` the way
    /// watcher does (its own output is tested in watcher-user).
    const STAND_IN: &str = r##"#!/bin/sh
case "$1" in
completions) echo "# $2 completion for watcher" ;;
man) mkdir -p "$3" && for p in watcher watcher-run watcher-sync; do
       echo ".TH $p 1" > "$3/$p.1" && echo "$3/$p.1"; done ;;
*) exit 2 ;;
esac
"##;

    fn project_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn install_puts_every_file_in_place() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let binary = tmp.path().join("watcher-built");
        std::fs::write(&binary, STAND_IN).expect("stand-in");
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let prefix = tmp.path().join("prefix");
        let layout = Layout {
            prefix: prefix.clone(),
            destdir: None,
        };
        install(&binary, &project_root(), &layout).expect("install");

        assert_eq!(mode(&prefix.join("bin/watcher")), 0o755);
        let unit = std::fs::read_to_string(prefix.join("lib/systemd/system/watcher.service"))
            .expect("unit");
        let exec = format!(
            "ExecStart={}/bin/watcher run --config {}/etc/watcher/watcher.toml",
            prefix.display(),
            prefix.display()
        );
        assert!(unit.lines().any(|l| l == exec), "{unit}");
        assert!(!unit.contains(UNIT_BINARY), "{unit}");
        for (rel, shell) in [
            ("share/bash-completion/completions/watcher", "bash"),
            ("share/zsh/site-functions/_watcher", "zsh"),
            ("share/fish/vendor_completions.d/watcher.fish", "fish"),
        ] {
            let text = std::fs::read_to_string(prefix.join(rel)).expect(rel);
            assert!(text.contains(shell), "{rel}: {text}");
        }
        for page in ["watcher.1", "watcher-run.1", "watcher-sync.1"] {
            assert_eq!(
                mode(&prefix.join("share/man/man1").join(page)),
                0o644,
                "{page}"
            );
        }
        let config = prefix.join("etc/watcher/watcher.toml");
        assert_eq!(mode(&config), 0o600);
        assert!(prefix.join("share/doc/watcher/watcher.toml").is_file());

        // A second install keeps the configuration an administrator edited.
        std::fs::write(&config, "# edited\n").expect("edit");
        install(&binary, &project_root(), &layout).expect("install again");
        assert_eq!(
            std::fs::read_to_string(&config).expect("config"),
            "# edited\n"
        );
    }

    #[test]
    fn a_staged_install_names_the_final_paths() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let binary = tmp.path().join("watcher-built");
        std::fs::write(&binary, STAND_IN).expect("stand-in");
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let stage = tmp.path().join("stage");
        let layout = Layout {
            prefix: PathBuf::from("/usr/local"),
            destdir: Some(stage.clone()),
        };
        install(&binary, &project_root(), &layout).expect("install");
        assert!(stage.join("usr/local/bin/watcher").is_file());
        assert!(stage.join("etc/watcher/watcher.toml").is_file());
        let unit =
            std::fs::read_to_string(stage.join("usr/local/lib/systemd/system/watcher.service"))
                .expect("unit");
        assert!(
            unit.lines()
                .any(|l| l
                    == "ExecStart=/usr/local/bin/watcher run --config /etc/watcher/watcher.toml"),
            "{unit}"
        );
    }
}
