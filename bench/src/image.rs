//! An ext4 image loop-mounted on a directory, and what its loop device has written.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::run_ok;

/// An ext4 image mounted on a directory; unmounted and removed when dropped.
pub struct LoopImage {
    image: PathBuf,
    pub mount: PathBuf,
    mounted: bool,
}

impl LoopImage {
    /// `watcher-bench-PID.img` of `size` in `dir` (`mkfs.ext4 -i 8192`), mounted on
    /// `watcher-bench-PID.mnt` beside it.
    pub fn create(dir: &Path, size: &str) -> Result<Self> {
        Self::create_with(dir, "", size, &[], "loop")
    }

    /// Like [`LoopImage::create`], the file names ending in `tag`, with more `mkfs.ext4`
    /// arguments and the mount options `options` (which must include `loop`).
    pub fn create_with(
        dir: &Path,
        tag: &str,
        size: &str,
        mkfs: &[&str],
        options: &str,
    ) -> Result<Self> {
        let id = std::process::id();
        let mut me = Self {
            image: dir.join(format!("watcher-bench-{id}{tag}.img")),
            mount: dir.join(format!("watcher-bench-{id}{tag}.mnt")),
            mounted: false,
        };
        run_ok(Command::new("truncate").args(["-s", size]).arg(&me.image))?;
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-i", "8192"])
                .args(mkfs)
                .arg(&me.image),
        )?;
        std::fs::create_dir_all(&me.mount)?;
        run_ok(
            Command::new("mount")
                .args(["-o", options])
                .arg(&me.image)
                .arg(&me.mount),
        )?;
        me.mounted = true;
        Ok(me)
    }

    /// The block device mounted there (`/dev/loopN`), from `/proc/self/mounts`.
    pub fn device(&self) -> Result<PathBuf> {
        let mounts =
            std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
        let mount = self.mount.canonicalize()?;
        mounts
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?, f.next()?))
            })
            .filter(|(_, m)| Path::new(m) == mount)
            .map(|(dev, _)| PathBuf::from(dev))
            .next_back()
            .with_context(|| format!("{} is not in /proc/self/mounts", mount.display()))
    }

    /// Bytes the device has written so far: sectors written (the 7th field of
    /// `/sys/block/loopN/stat`, always 512-byte units) times 512. Call `sync` first for
    /// the data still in the page cache.
    pub fn written(&self) -> Result<u64> {
        let dev = self.device()?;
        let name = dev
            .file_name()
            .context("a device without a name")?
            .to_string_lossy()
            .into_owned();
        let path = Path::new("/sys/block").join(&name).join("stat");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let Some(sectors) = text
            .split_whitespace()
            .nth(6)
            .and_then(|w| w.parse::<u64>().ok())
        else {
            bail!("no written sectors in {}: {text:?}", path.display());
        };
        Ok(sectors * 512)
    }
}

impl Drop for LoopImage {
    fn drop(&mut self) {
        if self.mounted {
            let mut ok = false;
            for _ in 0..20 {
                if Command::new("umount")
                    .arg(&self.mount)
                    .status()
                    .is_ok_and(|s| s.success())
                {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
            }
        }
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_file(&self.image);
    }
}
