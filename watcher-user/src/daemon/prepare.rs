//! Building an engine from a configuration: every part of it (filter, capture, ssh
//! connections, targets and their journals) is made before anything of a running engine
//! is stopped, so a configuration that fails leaves the running one as it was.

use super::*;

/// Which targets of the running engine a new one takes over, by group and target name.
pub(super) type Continuing = Vec<(String, String)>;

/// Opens the journal of a target, replaying what the previous run left: its unsynced marks,
/// and whether it stopped cleanly.
pub(super) fn open_journal(
    config: &Config,
    group: &str,
    target: &str,
) -> anyhow::Result<(Journal, Recovered)> {
    let dir = &config.daemon.state_dir;
    let (journal, found) = Journal::open_target(dir, group, target)
        .with_context(|| format!("opening the journal in {}", dir.display()))?;
    if !found.marks.is_empty() {
        tracing::info!(group = %group, target = %target, paths = found.marks.len(),
            "resuming unsynced changes from the journal");
    }
    if found.existed && !found.clean {
        tracing::warn!(group = %group, target = %target,
            "previous run did not shut down cleanly: re-syncing the whole tree");
    }
    Ok((journal, found))
}

/// Builds every target of `config`. Targets the running engine has (`continuing`) get their
/// backlog and journal when it hands them over; the others open their journal here, so a
/// journal that cannot be opened fails the new configuration before anything of the old
/// one stopped.
pub(super) fn target_states(
    config: &Config,
    groups: &[GroupId],
    opts: &RunOptions,
    filter: &Filter,
    continuing: &Continuing,
    links: &Links,
) -> anyhow::Result<Vec<TargetState>> {
    let now = Instant::now();
    let mut targets = Vec::new();
    for (group, g) in groups.iter().zip(&config.groups) {
        let root = filter.root(*group).to_path_buf();
        let root_id = FileId::of(&root)
            .with_context(|| format!("sync group {}: source {}", g.name, root.display()))?;
        let hard_links = HardLinks::new(&root);
        for t in &g.targets {
            let link = links.get(&g.name, &t.name);
            let extra_args = match &link {
                Some(link) => link.rsync_args(&t.rsync_args(g)),
                None => t.rsync_args(g),
            };
            let settings = Settings {
                group: *group,
                group_name: g.name.clone(),
                name: t.name.clone(),
                dest: t.dest.clone(),
                root: root.clone(),
                root_id,
                rsync: RsyncOptions {
                    binary: config.daemon.rsync.clone(),
                    hardlinks: g.hard_links,
                    one_file_system: g.one_file_system,
                    excludes: filter.excludes(*group).to_vec(),
                    extra_args,
                    dry_run: opts.dry_run,
                    delete: g.delete,
                },
                link,
                hard_links: hard_links.clone(),
                post_sync: (!t.post_sync.is_empty() && !opts.dry_run).then(|| {
                    let env = vec![
                        ("WATCHER_GROUP", OsString::from(&g.name)),
                        ("WATCHER_TARGET", OsString::from(&t.name)),
                        ("WATCHER_SOURCE", root.clone().into_os_string()),
                        ("WATCHER_DEST", t.dest.rsync_arg()),
                    ];
                    let label = format!("{}/{}", g.name, t.name);
                    Arc::new(post_sync::Hook::start(t.post_sync.clone(), env, label))
                }),
                // An idle rsync is a process too: none beyond `max_processes`.
                standby: (!opts.dry_run && config.daemon.max_processes.is_none())
                    .then(|| Arc::new(rsync::Standby::default())),
            };
            let carried = continuing
                .iter()
                .any(|(gn, tn)| *gn == g.name && *tn == t.name);
            let mut needs_full_sync = g.initial_sync && !carried;
            let mut recovered: Option<Recovered> = None;
            let journal = if opts.journal && !carried {
                let (journal, found) = open_journal(config, &g.name, &t.name)
                    .with_context(|| format!("sync group {}: target {}", g.name, t.name))?;
                // After an unclean stop, what changed while nobody was watching is unknown,
                // so the whole tree is compared.
                needs_full_sync |= found.existed && !found.clean;
                recovered = Some(found);
                Some(journal)
            } else {
                None
            };
            let mut state = TargetState {
                settings,
                backlog: Backlog::new(t.max_backlog, journal),
                machine: SyncMachine::new(g.flush, g.verify_interval, now),
                failing: FailingPaths::default(),
            };
            if let Some(found) = &recovered {
                state.backlog.restore(&found.marks, now);
            }
            if needs_full_sync {
                state.mark(Path::new(""), Scope::Subtree, now);
                state.machine.needs_initial_sync();
            }
            state.settle_marks(now);
            targets.push(state);
        }
    }
    Ok(targets)
}

/// What a reload cannot change while the daemon runs: said clearly, and the running
/// configuration kept.
pub(super) fn check_reloadable(
    old: &Config,
    new: &Config,
    opts: &RunOptions,
) -> anyhow::Result<()> {
    let (was, now) = (&old.daemon, &new.daemon);
    if opts.journal && was.state_dir != now.state_dir {
        bail!(
            "state_dir changed from {} to {}: the journals cannot move while the daemon runs; \
             restart the service to use the new directory",
            was.state_dir.display(),
            now.state_dir.display()
        );
    }
    if opts.status && was.status_socket != now.status_socket {
        tracing::warn!(old = %was.status_socket.display(), new = %now.status_socket.display(),
            "status_socket changed: the new socket takes effect when the service restarts");
    }
    if opts.status && was.metrics != now.metrics {
        tracing::warn!("metrics changed: the new endpoint takes effect when the service restarts");
    }
    Ok(())
}

impl Prepared {
    /// Takes over the running engine's backlogs and journals and starts reading events.
    pub(super) fn into_engine(mut self, opts: &RunOptions, carried: HandOver) -> Engine {
        let now = Instant::now();
        for (group, target, batch, journal) in carried {
            let Some(state) = self
                .targets
                .iter_mut()
                .find(|t| t.settings.group_name == group && t.settings.name == target)
            else {
                if !batch.is_empty() {
                    tracing::warn!(group = %group, target = %target, paths = batch.len(),
                        "target removed from the configuration; its unsynced paths are dropped");
                }
                continue;
            };
            // A journal dropped after a write error is tried again with the new engine.
            let journal = match journal {
                Some(journal) => Some(journal),
                None if opts.journal => match open_journal(&self.config, &group, &target) {
                    Ok((journal, _)) => Some(journal),
                    Err(e) => {
                        tracing::error!(group = %group, target = %target,
                            "{e:#}; continuing without a journal");
                        None
                    }
                },
                None => None,
            };
            state.backlog.set_journal(journal);
            state.backlog.restore_batch(batch, now);
            state.settle_marks(now);
        }
        let backend_name = self.backend.name();
        for g in &self.config.groups {
            tracing::info!(group = %g.name, source = %g.source.display(), backend = backend_name,
                targets = g.targets.len(), "watching");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (events, reader) = spawn_reader(self.backend, stop.clone());
        // After the reader started, so no link made during the walk goes unseen.
        let mut walking: Vec<GroupId> = Vec::new();
        for t in &self.targets {
            if !walking.contains(&t.settings.group) {
                walking.push(t.settings.group);
                t.settings.hard_links.start_walker(&t.settings.group_name);
            }
        }
        Engine {
            config: self.config,
            filter: self.filter,
            targets: self.targets,
            backend_name,
            events: Some(events),
            reader: Some(reader),
            stop,
            stop_verify: watch::Sender::new(false),
            links: self.links,
            next_turn: 0,
        }
    }
}

impl Engine {
    /// Builds everything a configuration needs and starts its backend (so no change is
    /// missed), without stopping or touching the running engine, if any: any failure leaves
    /// it running. Local target directories are created last, once every check passed (and
    /// never in a dry run).
    pub(super) fn prepare(
        config: Config,
        opts: &RunOptions,
        own_pids: &Arc<OwnPids>,
        running: Option<&Engine>,
    ) -> anyhow::Result<Prepared> {
        if let Some(running) = running {
            check_reloadable(&running.config, &config, opts)?;
        }
        let mut builder = FilterBuilder::new();
        let mut groups = Vec::new();
        for g in &config.groups {
            let id = builder
                .add_group(&g.source, g.excludes.clone())
                .with_context(|| format!("sync group {}", g.name))?;
            groups.push(id);
        }
        let filter = builder.build()?;
        // Before the backend starts: a target that cannot work stops a start or a reload.
        let links = Links::start(
            &ssh::control_dir(&config.daemon.status_socket),
            config.groups.iter().flat_map(|g| {
                g.targets.iter().map(move |t| {
                    let dest = match &t.dest {
                        Target::Local(path) => path.as_os_str(),
                        Target::Remote(spec) => spec.as_os_str(),
                    };
                    let name = t.name.as_str();
                    (
                        g.name.as_str(),
                        name,
                        dest,
                        t.ssh.as_slice(),
                        t.rsync_args(g),
                    )
                })
            }),
        )?;
        let roots: Vec<PathBuf> = config.groups.iter().map(|g| g.source.clone()).collect();
        let d = &config.daemon;
        let options = backend::BackendOptions {
            kind: d.backend,
            ebpf: backend::ebpf::EbpfOptions {
                ringbuf_bytes: d.ebpf_ringbuf_bytes,
                probes: d.ebpf_probes,
                kernel_filter: d.ebpf_kernel_filter,
            },
            one_file_system: config
                .groups
                .iter()
                .filter(|g| g.one_file_system)
                .map(|g| g.source.clone())
                .collect(),
        };
        let backend = backend::start(&options, &roots, own_pids.clone())
            .context("starting change capture")?;
        let continuing: Continuing = running.map_or_else(Vec::new, |engine| {
            engine
                .targets
                .iter()
                .map(|t| (t.settings.group_name.clone(), t.settings.name.clone()))
                .collect()
        });
        let targets = target_states(&config, &groups, opts, &filter, &continuing, &links)?;
        if !opts.dry_run {
            for g in &config.groups {
                for t in &g.targets {
                    t.dest
                        .create_local_dir()
                        .with_context(|| format!("sync group {}: target {}", g.name, t.name))?;
                }
            }
        }
        Ok(Prepared {
            config,
            filter,
            targets,
            backend,
            links,
        })
    }
}
