//! Prometheus metrics: the snapshot in the text exposition format, and the plain HTTP endpoint
//! that serves it.
//!
//! The endpoint has no authentication, so it only binds loopback addresses unless the
//! configuration asks for another one explicitly (`metrics_allow_remote`). It answers
//! `GET /metrics` (and `HEAD`) with the latest snapshot and nothing else; a request is read up
//! to a bounded head, and the connection is closed after one response. A client that sends
//! nothing is dropped after a short idle timeout, or sooner when a new client needs its slot. The text and its
//! endpoint live together because nothing else uses either: the rendering is pure and tested
//! on its own, the endpoint over a real loopback connection.

use std::fmt::Write as _;
use std::net::SocketAddr;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use tokio::sync::watch;

use super::process::ProcessStats;
use super::snapshot::{StatusSnapshot, TargetState, TargetStatus};
use super::{ACCEPT_BACKOFF, CLIENT_TIMEOUT, Connections, StatusError, read_request_within};
#[cfg(test)]
use super::{IDLE_TIMEOUT, MAX_CONNECTIONS};

/// Longest HTTP request head accepted.
const MAX_HTTP_HEAD: usize = 8 * 1024;

/// A label value escaped for the Prometheus text format: `\`, `"` and newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value in the Prometheus text format.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One sample line: `name{label="value",...} value`.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"{}\"", escape_label(value));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_value(value));
}

/// The snapshot in the Prometheus text exposition format (version 0.0.4): the daemon's
/// families (`watcher_*`). Counters are the daemon's since it started (a reload keeps them);
/// rates are left to `rate()`.
pub fn render_metrics(s: &StatusSnapshot) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "watcher_build_info",
        "gauge",
        "The version of the daemon, as a label; always 1.",
    );
    sample(
        &mut out,
        "watcher_build_info",
        &[("version", &s.version)],
        1.0,
    );
    family(
        &mut out,
        "watcher_backend_info",
        "gauge",
        "The change-capture backend in use, as a label; always 1.",
    );
    sample(
        &mut out,
        "watcher_backend_info",
        &[("backend", &s.backend)],
        1.0,
    );
    let counters: [(&str, &str, u64); 4] = [
        (
            "watcher_events_total",
            "Changes under the source roots that marked a path for syncing.",
            s.events_total,
        ),
        (
            "watcher_backend_events_total",
            "Events read from the change-capture backend, including changes outside every source root on a watched filesystem.",
            s.backend_events_total,
        ),
        (
            "watcher_overflows_total",
            "Event queue overflows (each one triggers a full pass).",
            s.overflows,
        ),
        ("watcher_rescans_total", "Subtrees rescanned.", s.rescans),
    ];
    for (name, help, value) in counters {
        family(&mut out, name, "counter", help);
        sample(&mut out, name, &[], value as f64);
    }

    let targets: Vec<(&str, &TargetStatus)> = s
        .groups
        .iter()
        .flat_map(|g| g.targets.iter().map(move |t| (g.name.as_str(), t)))
        .collect();

    family(
        &mut out,
        "watcher_target_state",
        "gauge",
        "The state of the target: 1 for the current one, 0 for the others.",
    );
    const STATES: [TargetState; 5] = [
        TargetState::InitialSync,
        TargetState::InStep,
        TargetState::Syncing,
        TargetState::Retrying,
        TargetState::Failed,
    ];
    for &(group, t) in &targets {
        for state in STATES {
            sample(
                &mut out,
                "watcher_target_state",
                &[
                    ("group", group),
                    ("target", &t.name),
                    ("state", state.as_str()),
                ],
                f64::from(u8::from(t.state == state)),
            );
        }
    }

    type Sample = fn(&TargetStatus) -> Option<f64>;
    let per_target: [(&str, &str, &str, Sample); 16] = [
        (
            "watcher_failing_paths",
            "gauge",
            "Paths rsync keeps failing on, set aside while the rest syncs.",
            |t| Some(t.failing_paths_total as f64),
        ),
        (
            "watcher_dirty_paths",
            "gauge",
            "Paths changed and not yet handed to rsync.",
            |t| Some(t.dirty_paths as f64),
        ),
        (
            "watcher_in_flight_paths",
            "gauge",
            "Paths in the rsync run under way.",
            |t| Some(t.in_flight_paths as f64),
        ),
        (
            "watcher_oldest_unsynced_seconds",
            "gauge",
            "Age of the oldest change not yet on the target (0 when there is none).",
            |t| Some(t.oldest_unsynced_ms.unwrap_or(0) as f64 / 1000.0),
        ),
        (
            "watcher_rsync_runs_total",
            "counter",
            "rsync runs for the target.",
            |t| Some(t.rsync_runs as f64),
        ),
        (
            "watcher_sync_retries_total",
            "counter",
            "Batches retried after a failed rsync run.",
            |t| Some(t.retries_total as f64),
        ),
        (
            "watcher_post_sync_runs_total",
            "counter",
            "Runs of the target's post_sync command.",
            |t| Some(t.post_sync_runs as f64),
        ),
        (
            "watcher_post_sync_failures_total",
            "counter",
            "Runs of the target's post_sync command that failed (exit not 0, killed, not started, timed out).",
            |t| Some(t.post_sync_failures as f64),
        ),
        (
            "watcher_sync_failures_consecutive",
            "gauge",
            "Failed rsync runs since the last successful one.",
            |t| Some(f64::from(t.consecutive_failures)),
        ),
        (
            "watcher_last_success_timestamp_seconds",
            "gauge",
            "When the last successful sync of the target finished, seconds since the Unix epoch (absent before the first).",
            |t| t.last_success_unix_ms.map(|ms| ms as f64 / 1000.0),
        ),
        (
            "watcher_rsync_sent_bytes_total",
            "counter",
            "Bytes rsync sent to the target (its --stats \"Total bytes sent\": file data, checksums, file lists).",
            |t| Some(t.sent_bytes as f64),
        ),
        (
            "watcher_rsync_received_bytes_total",
            "counter",
            "Bytes rsync received from the target (its --stats \"Total bytes received\").",
            |t| Some(t.received_bytes as f64),
        ),
        (
            "watcher_rsync_literal_data_bytes_total",
            "counter",
            "File data rsync sent as it is, the part not found on the target already (its --stats \"Literal data\").",
            |t| Some(t.literal_bytes as f64),
        ),
        (
            "watcher_ssh_connection_up",
            "gauge",
            "1 while an ssh target's shared connection is up (ssh targets only).",
            |t| t.ssh.as_ref().map(|c| if c.up { 1.0 } else { 0.0 }),
        ),
        (
            "watcher_ssh_connection_since_seconds",
            "gauge",
            "Since when an ssh target's connection has been up (or down), seconds since the Unix epoch.",
            |t| {
                t.ssh
                    .as_ref()
                    .and_then(|c| c.since_unix_ms)
                    .map(|ms| ms as f64 / 1000.0)
            },
        ),
        (
            "watcher_ssh_reconnects_total",
            "counter",
            "Connections an ssh target made again after losing one.",
            |t| t.ssh.as_ref().map(|c| c.reconnects as f64),
        ),
    ];
    for (name, kind, help, value) in per_target {
        family(&mut out, name, kind, help);
        for &(group, t) in &targets {
            if let Some(value) = value(t) {
                sample(
                    &mut out,
                    name,
                    &[("group", group), ("target", &t.name)],
                    value,
                );
            }
        }
    }

    family(
        &mut out,
        "watcher_rsync_failures_total",
        "counter",
        "Failed rsync batches by the class of rsync's exit: transient (retried), fatal (the target stops), source_race (the source changed under rsync; retried).",
    );
    for &(group, t) in &targets {
        for (class, count) in t.failures.by_class() {
            sample(
                &mut out,
                "watcher_rsync_failures_total",
                &[("group", group), ("target", &t.name), ("class", class)],
                count as f64,
            );
        }
    }

    const DURATION: &str = "watcher_rsync_run_duration_seconds";
    family(&mut out, DURATION, "histogram", "How long rsync runs took.");
    for &(group, t) in &targets {
        let labels = [("group", group), ("target", t.name.as_str())];
        for (le, count) in t.run_seconds.cumulative() {
            let le = format_value(le);
            sample(
                &mut out,
                &format!("{DURATION}_bucket"),
                &[labels[0], labels[1], ("le", &le)],
                count as f64,
            );
        }
        sample(
            &mut out,
            &format!("{DURATION}_sum"),
            &labels,
            t.run_seconds.sum,
        );
        sample(
            &mut out,
            &format!("{DURATION}_count"),
            &labels,
            t.run_seconds.count() as f64,
        );
    }
    out
}

/// The process families of the Prometheus conventions (`process_*`).
pub fn render_process_metrics(p: &ProcessStats) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, kind: &str, help: &str, value: f64| {
        family(&mut out, name, kind, help);
        sample(&mut out, name, &[], value);
    };
    gauge(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    gauge(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_bytes as f64,
    );
    gauge(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.virtual_bytes as f64,
    );
    gauge(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds as f64,
    );
    if let Some(max) = p.max_fds {
        gauge(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max as f64,
        );
    }
    gauge(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    );
    out
}

/// What a scrape gets: the snapshot's families, then the process's (left out should
/// `/proc` not be readable).
fn scrape_text(s: &StatusSnapshot) -> String {
    let mut text = render_metrics(s);
    match ProcessStats::read() {
        Ok(p) => text.push_str(&render_process_metrics(&p)),
        Err(e) => tracing::debug!(error = %e, "reading process metrics"),
    }
    text
}

/// The metrics endpoint: plain HTTP, on a loopback address unless asked otherwise.
#[derive(Debug)]
pub struct MetricsListener {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl MetricsListener {
    /// Binds `addr` (port 0 picks a free port), which must be a loopback address unless
    /// `allow_remote`. Needs no runtime; [`serve`](Self::serve) does.
    pub fn bind(addr: SocketAddr, allow_remote: bool) -> Result<MetricsListener, StatusError> {
        if !addr.ip().is_loopback() {
            if !allow_remote {
                return Err(StatusError::NotLoopback { addr });
            }
            tracing::warn!(%addr, "metrics endpoint on a non-loopback address: it has no \
                authentication, anyone who can reach it can read the metrics");
        }
        let net_err = |action, source| StatusError::Net {
            action,
            addr,
            source,
        };
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| net_err("binding metrics endpoint on", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| net_err("configuring metrics endpoint on", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| net_err("configuring metrics endpoint on", e))?;
        Ok(MetricsListener { listener, addr })
    }

    /// The address bound (with the actual port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers `GET /metrics` with the latest snapshot in `rx`. Runs until the future is
    /// dropped, or returns `Ok` once the sender has been dropped.
    pub async fn serve(self, mut rx: watch::Receiver<StatusSnapshot>) -> Result<(), StatusError> {
        let addr = self.addr;
        let listener = tokio::net::TcpListener::from_std(self.listener).map_err(|source| {
            StatusError::Net {
                action: "serving metrics on",
                addr,
                source,
            }
        })?;
        let mut connections = Connections::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let rx = rx.clone();
                        if !connections.admit(|requested| answer_http(stream, rx, requested)) {
                            tracing::debug!("too many metrics requests at once; closing a connection");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "accepting on metrics endpoint");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                () = connections.join_next() => {}
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn head_complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// The HTTP response to a request head; `metrics` renders the body when it is needed.
fn http_response(head: &[u8], complete: bool, metrics: impl FnOnce() -> String) -> Vec<u8> {
    let plain = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    if !complete {
        return if head.len() >= MAX_HTTP_HEAD {
            plain(
                "431 Request Header Fields Too Large",
                "",
                "request head too large\n",
            )
        } else {
            plain("400 Bad Request", "", "incomplete request\n")
        };
    }
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let request_line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return plain("400 Bad Request", "", "malformed request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return plain("400 Bad Request", "", "unsupported HTTP version\n");
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return plain("404 Not Found", "", "not found; metrics are at /metrics\n");
    }
    match method {
        "GET" | "HEAD" => {
            let body = metrics();
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            if method == "GET" {
                response.extend_from_slice(body.as_bytes());
            }
            response
        }
        _ => plain(
            "405 Method Not Allowed",
            "Allow: GET, HEAD\r\n",
            "method not allowed\n",
        ),
    }
}

async fn answer_http<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    rx: watch::Receiver<StatusSnapshot>,
    requested: Arc<AtomicBool>,
) {
    let exchange = async {
        let (head, complete) =
            read_request_within(&mut stream, MAX_HTTP_HEAD, head_complete, &requested).await?;
        if head.is_empty() {
            return Ok(());
        }
        let response = http_response(&head, complete, || scrape_text(&rx.borrow()));
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
        Err(_) => tracing::debug!("metrics connection timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpStream};
    use std::time::Duration;

    use crate::status::runtime;
    use crate::status::snapshot::sample;

    /// Checks the exposition format: every family introduced once by HELP and TYPE, its
    /// samples right after it (a histogram's as `_bucket` with `le`, `_sum`, `_count`), every
    /// value a number. Returns each family's type.
    pub(crate) fn check_exposition(text: &str) -> std::collections::BTreeMap<String, String> {
        let mut types = std::collections::BTreeMap::new();
        let mut current = (String::new(), String::new());
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!types.contains_key(name), "{name} twice");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "{name} twice"
                );
                current = (name.to_owned(), kind.to_owned());
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let (family, kind) = &current;
                if kind == "histogram" {
                    let suffix = name.strip_prefix(family.as_str()).unwrap_or("");
                    assert!(
                        ["_bucket", "_sum", "_count"].contains(&suffix),
                        "sample outside its family: {line}"
                    );
                    assert_eq!(
                        suffix == "_bucket",
                        line.contains(",le=\""),
                        "le goes with _bucket: {line}"
                    );
                } else {
                    assert_eq!(name, family, "sample outside its family: {line}");
                }
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter without _total: {name}");
                }
                let value = line.rsplit(' ').next().unwrap();
                assert!(
                    value.parse::<f64>().is_ok() || value == "+Inf",
                    "bad value in {line}"
                );
            }
        }
        types
    }

    #[test]
    fn metrics_text() {
        let text = render_metrics(&sample());
        for want in [
            "# HELP watcher_events_total ",
            "# TYPE watcher_events_total counter\nwatcher_events_total 123456\n",
            "# TYPE watcher_overflows_total counter\nwatcher_overflows_total 2\n",
            "# TYPE watcher_backend_events_total counter\nwatcher_backend_events_total 9876543\n",
            "# TYPE watcher_build_info gauge\nwatcher_build_info{version=\"0.1.0\"} 1\n",
            "watcher_backend_info{backend=\"fanotify\"} 1\n",
            "# TYPE watcher_dirty_paths gauge\n",
            "watcher_dirty_paths{group=\"data\",target=\"local\"} 0\n",
            "watcher_dirty_paths{group=\"data\",target=\"remote \\\"eu\\\"\"} 120\n",
            "watcher_oldest_unsynced_seconds{group=\"data\",target=\"remote \\\"eu\\\"\"} 185\n",
            "watcher_oldest_unsynced_seconds{group=\"data\",target=\"local\"} 0\n",
            "# TYPE watcher_rsync_runs_total counter\n",
            "watcher_rsync_runs_total{group=\"data\",target=\"local\"} 12\n",
            "watcher_sync_failures_consecutive{group=\"data\",target=\"remote \\\"eu\\\"\"} 2\n",
            "watcher_target_state{group=\"data\",target=\"local\",state=\"in_step\"} 1\n",
            "watcher_target_state{group=\"data\",target=\"local\",state=\"failed\"} 0\n",
            "watcher_target_state{group=\"data\",target=\"remote \\\"eu\\\"\",state=\"retrying\"} 1\n",
            "watcher_last_success_timestamp_seconds{group=\"data\",target=\"local\"} 4598.8\n",
            "watcher_rsync_sent_bytes_total{group=\"data\",target=\"local\"} 2500776\n",
            "watcher_rsync_received_bytes_total{group=\"data\",target=\"local\"} 54\n",
            "watcher_rsync_literal_data_bytes_total{group=\"data\",target=\"local\"} 2500003\n",
            "watcher_rsync_failures_total{group=\"data\",target=\"remote \\\"eu\\\"\",class=\"transient\"} 3\n",
            "watcher_rsync_failures_total{group=\"data\",target=\"remote \\\"eu\\\"\",class=\"fatal\"} 0\n",
            "watcher_rsync_failures_total{group=\"data\",target=\"remote \\\"eu\\\"\",class=\"source_race\"} 1\n",
            "watcher_rsync_failures_total{group=\"data\",target=\"local\",class=\"transient\"} 0\n",
            "# TYPE watcher_rsync_run_duration_seconds histogram\n",
            "watcher_rsync_run_duration_seconds_bucket{group=\"data\",target=\"local\",le=\"0.01\"} 0\n",
            "watcher_rsync_run_duration_seconds_bucket{group=\"data\",target=\"local\",le=\"0.025\"} 1\n",
            "watcher_rsync_run_duration_seconds_bucket{group=\"data\",target=\"local\",le=\"0.05\"} 2\n",
            "watcher_rsync_run_duration_seconds_bucket{group=\"data\",target=\"local\",le=\"2.5\"} 5\n",
            "watcher_rsync_run_duration_seconds_bucket{group=\"data\",target=\"local\",le=\"30\"} 5\n",
            "watcher_rsync_run_duration_seconds_bucket{group=\"data\",target=\"local\",le=\"60\"} 6\n",
            "watcher_rsync_run_duration_seconds_bucket{group=\"data\",target=\"local\",le=\"+Inf\"} 6\n",
            "watcher_rsync_run_duration_seconds_sum{group=\"data\",target=\"local\"} 43.25\n",
            "watcher_rsync_run_duration_seconds_count{group=\"data\",target=\"local\"} 6\n",
            "watcher_rsync_run_duration_seconds_count{group=\"data\",target=\"remote \\\"eu\\\"\"} 0\n",
            "watcher_ssh_connection_up{group=\"data\",target=\"remote \\\"eu\\\"\"} 0\n",
            "watcher_ssh_connection_since_seconds{group=\"data\",target=\"remote \\\"eu\\\"\"} 4535\n",
            "# TYPE watcher_ssh_reconnects_total counter\nwatcher_ssh_reconnects_total{group=\"data\",target=\"remote \\\"eu\\\"\"} 3\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // No rate (that is rate()'s job), one family for the state, the start time is
        // process_start_time_seconds.
        for gone in [
            "per_second",
            "watcher_target_up",
            "watcher_info",
            "watcher_start_time",
            "watcher_last_sync_success",
        ] {
            assert!(!text.contains(gone), "{gone} in:\n{text}");
        }
        // Not before the first successful sync.
        assert!(
            !text.contains("watcher_last_success_timestamp_seconds{group=\"data\",target=\"remote"),
            "{text}"
        );
        // Only ssh targets have connection metrics.
        assert!(!text.contains("watcher_ssh_connection_up{group=\"data\",target=\"local\"}"));
        let types = check_exposition(&text);
        assert_eq!(types.len(), 25, "{types:?}");
        assert_eq!(
            types
                .get("watcher_post_sync_failures_total")
                .map(String::as_str),
            Some("counter")
        );
    }

    #[test]
    fn process_metrics_text() {
        let p = ProcessStats {
            cpu_seconds: 3.25,
            resident_bytes: 8_388_608,
            virtual_bytes: 1_234_567_168,
            start_time_seconds: 1_700_001_234.5,
            open_fds: 12,
            max_fds: Some(1024),
        };
        let text = render_process_metrics(&p);
        let types = check_exposition(&text);
        let want: std::collections::BTreeMap<String, String> = [
            ("process_cpu_seconds_total", "counter"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_virtual_memory_bytes", "gauge"),
            ("process_open_fds", "gauge"),
            ("process_max_fds", "gauge"),
            ("process_start_time_seconds", "gauge"),
        ]
        .into_iter()
        .map(|(n, k)| (n.to_owned(), k.to_owned()))
        .collect();
        assert_eq!(types, want);
        for line in [
            "process_cpu_seconds_total 3.25\n",
            "process_resident_memory_bytes 8388608\n",
            "process_open_fds 12\n",
            "process_max_fds 1024\n",
            "process_start_time_seconds 1700001234.5\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        let unlimited = render_process_metrics(&ProcessStats { max_fds: None, ..p });
        assert!(!unlimited.contains("process_max_fds"), "{unlimited}");
    }

    #[test]
    fn label_escaping() {
        assert_eq!(escape_label("plain"), "plain");
        assert_eq!(escape_label("a\"b"), "a\\\"b");
        assert_eq!(escape_label("a\\b"), "a\\\\b");
        assert_eq!(escape_label("a\nb"), "a\\nb");
        assert_eq!(escape_label("\\\"\n"), "\\\\\\\"\\n");
        let mut s = sample();
        s.groups[0].name = "we\\ird\nname".into();
        let text = render_metrics(&s);
        assert!(
            text.contains("watcher_dirty_paths{group=\"we\\\\ird\\nname\",target=\"local\"} 0\n"),
            "{text}"
        );
        // No raw newline inside a sample line: every line is a comment or a whole sample.
        assert!(
            text.lines()
                .all(|l| l.starts_with('#') || l.starts_with("watcher_"))
        );
        check_exposition(&text);
    }

    #[test]
    fn metric_values() {
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.5), "0.5");
        assert_eq!(format_value(1e21), "1000000000000000000000");
    }

    #[test]
    fn http_responses() {
        let text = |head: &str| {
            String::from_utf8(http_response(
                head.as_bytes(),
                head_complete(head.as_bytes()),
                || "body\n".to_owned(),
            ))
            .unwrap()
        };
        let ok = text("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("Content-Length: 5\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nbody\n"), "{ok}");
        let ok = text("GET /metrics?x=1 HTTP/1.0\n\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let head = text("HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.contains("Content-Length: 5\r\n") && head.ends_with("\r\n\r\n"));
        assert!(text("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(text("GET /metricsx HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(text("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
        assert!(text("GARBAGE\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(text("GET /metrics SPDY/3\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(text("GET /metrics HTTP/1.1\r\n").starts_with("HTTP/1.1 400 "));
        let big = vec![b'a'; MAX_HTTP_HEAD];
        let resp = String::from_utf8(http_response(&big, false, String::new)).unwrap();
        assert!(resp.starts_with("HTTP/1.1 431 "), "{resp}");
    }

    fn http_get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn metrics_over_tcp() {
        let listener = MetricsListener::bind((Ipv4Addr::LOCALHOST, 0).into(), false).unwrap();
        let addr = listener.local_addr();
        assert_ne!(addr.port(), 0);
        let (tx, rx) = watch::channel(sample());
        let server = std::thread::spawn(move || runtime().block_on(listener.serve(rx)));

        let response = http_get(addr, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(body.starts_with(&render_metrics(&sample())), "{body}");
        let types = check_exposition(body);
        assert_eq!(
            types.get("process_cpu_seconds_total").map(String::as_str),
            Some("counter"),
            "{body}"
        );
        assert!(
            types.contains_key("process_resident_memory_bytes"),
            "{body}"
        );

        tx.send_modify(|s| s.overflows = 9);
        let response = http_get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(
            response.contains("\nwatcher_overflows_total 9\n"),
            "{response}"
        );

        let response = http_get(addr, "GET / HTTP/1.1\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 404 "), "{response}");

        drop(tx);
        server.join().unwrap().unwrap();
    }

    /// Any local user can open connections to the endpoint and send nothing: they must not
    /// lock a scraper out, neither while they are held open nor afterwards.
    #[test]
    fn idle_clients_do_not_lock_out_a_scrape() {
        let listener = MetricsListener::bind((Ipv4Addr::LOCALHOST, 0).into(), false).unwrap();
        let addr = listener.local_addr();
        let (tx, rx) = watch::channel(sample());
        let server = std::thread::spawn(move || runtime().block_on(listener.serve(rx)));

        let idle: Vec<TcpStream> = (0..3 * MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let start = std::time::Instant::now();
        let response = http_get(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(
            response.starts_with("HTTP/1.1 200 OK\r\n"),
            "scrape behind {} idle clients: {response:?}",
            idle.len()
        );
        assert!(
            start.elapsed() < IDLE_TIMEOUT,
            "the scrape waited for idle clients to time out: {:?}",
            start.elapsed()
        );

        // The newest idle client is still connected, and is dropped once it has been idle
        // for the idle timeout.
        let mut newest = idle.last().unwrap().try_clone().unwrap();
        newest
            .set_read_timeout(Some(IDLE_TIMEOUT + Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let waited = std::time::Instant::now();
        let n = newest
            .read(&mut buf)
            .expect("closed, not timed out on our side");
        assert_eq!(n, 0, "an idle client got data");
        assert!(waited.elapsed() <= IDLE_TIMEOUT + Duration::from_secs(1));

        drop(idle);
        drop(tx);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn metrics_refuse_non_loopback_unless_allowed() {
        let err = MetricsListener::bind((Ipv4Addr::UNSPECIFIED, 0).into(), false).unwrap_err();
        assert!(matches!(err, StatusError::NotLoopback { .. }), "{err:?}");
        assert!(err.to_string().contains("0.0.0.0:0"), "{err}");
        assert!(err.to_string().contains("metrics_allow_remote"), "{err}");
        let err =
            MetricsListener::bind((Ipv4Addr::new(10, 0, 0, 1), 9100).into(), false).unwrap_err();
        assert!(matches!(err, StatusError::NotLoopback { .. }), "{err:?}");
        // Asked for: every address, loopback included, so the test can connect.
        let listener = MetricsListener::bind((Ipv4Addr::UNSPECIFIED, 0).into(), true).unwrap();
        assert!(listener.local_addr().ip().is_unspecified());
        assert_ne!(listener.local_addr().port(), 0);
    }
}
