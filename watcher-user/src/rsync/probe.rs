//! The start-up probe of the installed rsync: its version, and a self-test of the exact
//! flags the daemon relies on, on odd names (some rsync releases broke exactly that path).

use super::*;

/// rsync is missing, too old, or does not behave as the daemon relies on.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot run {binary}: {source} (install rsync 3.1.3 or later)")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} --version printed no version")]
    NoVersion { binary: PathBuf },
    #[error(
        "{binary} is version {version}; 3.1.3 or later is needed (--delete-missing-args, nanosecond --modify-window)"
    )]
    TooOld { binary: PathBuf, version: String },
    #[error("{binary} {version} failed the --files-from/--delete-missing-args self-test: {detail}")]
    Misbehaves {
        binary: PathBuf,
        version: String,
        detail: String,
    },
}

/// Checks once at start-up that the installed rsync copies and deletes listed paths the way
/// [`plan`] relies on (some 3.4.x releases broke `--files-from` + `--delete-missing-args`).
/// Returns the version.
pub fn probe(binary: &Path) -> Result<String, ProbeError> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|source| ProbeError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = version_in(&text).ok_or_else(|| ProbeError::NoVersion {
        binary: binary.to_path_buf(),
    })?;
    if !recent_enough(&version) {
        return Err(ProbeError::TooOld {
            binary: binary.to_path_buf(),
            version,
        });
    }
    self_test(binary).map_err(|detail| ProbeError::Misbehaves {
        binary: binary.to_path_buf(),
        version: version.clone(),
        detail,
    })?;
    Ok(version)
}

/// The version in `rsync --version` output ("rsync  version 3.2.7  protocol version 31").
pub fn version_in(text: &str) -> Option<String> {
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map(str::to_owned)
}

/// Whether an rsync of this version has what every run relies on (3.1.3+:
/// `--delete-missing-args`, nanosecond `--modify-window`), on either side of a transfer.
pub fn recent_enough(version: &str) -> bool {
    let numbers: Vec<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    numbers.as_slice() >= [3, 1, 3].as_slice()
}

pub(super) fn self_test(binary: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let setup = || -> std::io::Result<()> {
        std::fs::create_dir_all(src.join("-d"))?;
        std::fs::write(src.join("-d/new\nline"), b"new")?;
        std::fs::create_dir_all(dst.join("gone/sub"))?;
        std::fs::write(dst.join("gone/sub/f"), b"old")?;
        std::fs::write(dst.join("stale"), b"old")?;
        Ok(())
    };
    setup().map_err(|e| format!("setting up: {e}"))?;
    let batch = Batch {
        entries: vec!["-d/new\nline".into(), "gone".into(), "stale".into()],
        subtrees: vec![],
        ..Batch::default()
    };
    let opts = RsyncOptions {
        binary: binary.to_path_buf(),
        ..RsyncOptions::default()
    };
    let runs = plan(&batch, &src, &Target::Local(dst.clone()), &opts, |p| {
        p.is_dir()
    });
    for run in runs {
        let mut child = std::process::Command::new(binary)
            .args(&run.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin.write_all(&run.stdin).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let copied = std::fs::read(dst.join("-d/new\nline")).ok();
    if copied.as_deref() != Some(b"new".as_slice()) {
        return Err("a listed file was not copied".into());
    }
    if dst.join("stale").exists() || dst.join("gone").exists() {
        return Err("a listed missing path was not deleted".into());
    }
    Ok(())
}
