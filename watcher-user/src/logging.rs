//! The one tracing subscriber, installed by the binary.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Logs to stderr. `RUST_LOG` wins when set; otherwise `-v` raises the level from info
/// (one: debug, two: trace) and `-q` lowers it to warnings.
pub fn init(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let stderr = std::io::stderr();
    let ansi = stderr.is_terminal();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}
