use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use watcher::cli::{Cli, Command, ConfigCommand, SyncArgs};
use watcher::config::{self, Config, DaemonConfig, GroupConfig, TargetConfig};
use watcher::daemon::{self, RunOptions};
use watcher::flush::FlushConfig;

fn main() -> ExitCode {
    let cli = Cli::parse();
    watcher::logging::init(cli.verbose, cli.quiet);
    match run(cli.command) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

/// `watcher sync SRC DST ...` is a one-group configuration built from the command line.
fn sync_config(args: SyncArgs) -> anyhow::Result<(Config, RunOptions)> {
    let source = args
        .source
        .canonicalize()
        .with_context(|| format!("source {}", args.source.display()))?;
    if !source.is_dir() {
        anyhow::bail!("source {} is not a directory", source.display());
    }
    let defaults = DaemonConfig::default();
    let config = Config {
        path: PathBuf::from("(command line)"),
        daemon: DaemonConfig {
            backend: args.backend,
            state_dir: args.state_dir.clone().unwrap_or(defaults.state_dir),
            status_socket: args.status_socket.clone().unwrap_or(defaults.status_socket),
            metrics: None,
            rsync: args.rsync,
            ebpf_probes: args.ebpf_probes,
            ebpf_ringbuf_bytes: args.ebpf_ringbuf_bytes,
            ebpf_kernel_filter: args.ebpf_kernel_filter == watcher::cli::Switch::On,
        },
        groups: vec![GroupConfig {
            name: "sync".into(),
            source,
            targets: vec![TargetConfig {
                name: args.target.to_string_lossy().into_owned(),
                dest: args.target,
                password_file: None,
                rsync_args: Vec::new(),
                ssh: Vec::new(),
                max_backlog: 1_000_000,
            }],
            excludes: args.excludes,
            rsync_args: args.rsync_args,
            hard_links: args.hard_links,
            flush: FlushConfig {
                delay: Duration::from_millis(args.delay),
                max_delay: Duration::from_millis(args.max_delay.max(args.delay)),
                max_batch: args.max_batch.max(1),
            },
            initial_sync: !args.no_initial_sync,
            verify_interval: args.verify_interval,
        }],
    };
    let opts = RunOptions {
        config_path: None,
        journal: args.state_dir.is_some(),
        status: args.status_socket.is_some(),
        dry_run: args.dry_run,
    };
    Ok((config, opts))
}

fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Sync(args) => {
            let (config, opts) = sync_config(args)?;
            daemon::run(config, opts)
        }
        Command::Run(args) => {
            let config = config::load(&args.config)?;
            let opts = RunOptions {
                config_path: Some(args.config),
                journal: true,
                status: true,
                dry_run: args.dry_run,
            };
            daemon::run(config, opts)
        }
        Command::Config(ConfigCommand::Check { config }) => {
            let cfg = config::load(&config)?;
            println!("{}: ok", cfg.path.display());
            for g in &cfg.groups {
                println!(
                    "  sync {}: {} -> {} target(s), {} exclude(s)",
                    g.name,
                    g.source.display(),
                    g.targets.len(),
                    g.excludes.len()
                );
                for t in &g.targets {
                    println!("    target {}: {}", t.name, t.dest.to_string_lossy());
                }
            }
            Ok(0)
        }
        Command::Status(args) => {
            let snapshot = watcher::status::query(&args.socket, Duration::from_secs(5))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                print!("{}", watcher::status::render(&snapshot, now));
            }
            Ok(0)
        }
        Command::Watch(args) => watcher::watch::run_watch(&args.paths, args.format, args.backend),
        Command::Check(args) => {
            let paths = if args.paths.is_empty() {
                vec![std::env::current_dir()?]
            } else {
                args.paths
            };
            let rows = watcher::backend::check(&paths);
            println!("{:<9} {:<4} {:<30} detail", "backend", "ok", "path");
            for row in &rows {
                let path = row
                    .path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(kernel)".into());
                println!(
                    "{:<9} {:<4} {:<30} {}",
                    row.backend,
                    if row.ok { "yes" } else { "no" },
                    path,
                    row.detail
                );
            }
            Ok(if rows.iter().any(|r| r.ok) { 0 } else { 1 })
        }
    }
}
