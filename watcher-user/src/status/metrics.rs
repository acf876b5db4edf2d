//! Prometheus metrics: the snapshot in the text exposition format, and the plain HTTP endpoint
//! that serves it.
//!
//! The endpoint has no authentication, so it only binds loopback addresses. It answers
//! `GET /metrics` (and `HEAD`) with the latest snapshot and nothing else; a request is read up
//! to a bounded head, and the connection is closed after one response. The text and its
//! endpoint live together because nothing else uses either: the rendering is pure and tested
//! on its own, the endpoint over a real loopback connection.

use std::fmt::Write as _;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::snapshot::{StatusSnapshot, TargetState, TargetStatus};
use super::{ACCEPT_BACKOFF, CLIENT_TIMEOUT, MAX_CONNECTIONS, StatusError, read_request};

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

/// The snapshot in the Prometheus text exposition format (version 0.0.4).
pub fn render_metrics(s: &StatusSnapshot) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "watcher_info",
        "gauge",
        "Version and change-capture backend of the daemon.",
    );
    let _ = writeln!(
        out,
        "watcher_info{{version=\"{}\",backend=\"{}\"}} 1",
        escape_label(&s.version),
        escape_label(&s.backend)
    );
    let globals: [(&str, &str, &str, f64); 5] = [
        (
            "watcher_start_time_seconds",
            "gauge",
            "Start time of the daemon, seconds since the Unix epoch.",
            s.started_unix_ms as f64 / 1000.0,
        ),
        (
            "watcher_events_total",
            "counter",
            "Change events read from the backend.",
            s.events_total as f64,
        ),
        (
            "watcher_events_per_second",
            "gauge",
            "Recent rate of change events.",
            s.events_per_sec,
        ),
        (
            "watcher_overflows_total",
            "counter",
            "Event queue overflows (each one triggers a full pass).",
            s.overflows as f64,
        ),
        (
            "watcher_rescans_total",
            "counter",
            "Subtrees rescanned.",
            s.rescans as f64,
        ),
    ];
    for (name, kind, help, value) in globals {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {}", format_value(value));
    }

    type Sample = fn(&TargetStatus) -> Option<f64>;
    let per_target: [(&str, &str, &str, Sample); 12] = [
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
            "watcher_sync_failures_consecutive",
            "gauge",
            "Failed rsync runs since the last successful one.",
            |t| Some(f64::from(t.consecutive_failures)),
        ),
        (
            "watcher_last_sync_success",
            "gauge",
            "Whether the last rsync run succeeded (absent before the first run).",
            |t| t.last_sync.as_ref().map(|l| if l.ok { 1.0 } else { 0.0 }),
        ),
        (
            "watcher_last_sync_timestamp_seconds",
            "gauge",
            "When the last rsync run finished, seconds since the Unix epoch.",
            |t| {
                t.last_sync
                    .as_ref()
                    .map(|l| l.finished_unix_ms as f64 / 1000.0)
            },
        ),
        (
            "watcher_target_up",
            "gauge",
            "1 while the target is kept in step, 0 while it is retrying or has failed.",
            |t| Some(if t.state.is_up() { 1.0 } else { 0.0 }),
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
    for (name, kind, help, sample) in per_target {
        family(&mut out, name, kind, help);
        for group in &s.groups {
            let g = escape_label(&group.name);
            for t in &group.targets {
                if let Some(value) = sample(t) {
                    let _ = writeln!(
                        out,
                        "{name}{{group=\"{g}\",target=\"{}\"}} {}",
                        escape_label(&t.name),
                        format_value(value)
                    );
                }
            }
        }
    }
    family(
        &mut out,
        "watcher_target_state",
        "gauge",
        "The state of the target: 1 for the current one.",
    );
    const STATES: [TargetState; 5] = [
        TargetState::InitialSync,
        TargetState::InStep,
        TargetState::Syncing,
        TargetState::Retrying,
        TargetState::Failed,
    ];
    for group in &s.groups {
        let g = escape_label(&group.name);
        for t in &group.targets {
            let target = escape_label(&t.name);
            for state in STATES {
                let _ = writeln!(
                    out,
                    "watcher_target_state{{group=\"{g}\",target=\"{target}\",state=\"{}\"}} {}",
                    state.as_str(),
                    u8::from(t.state == state)
                );
            }
        }
    }
    out
}

/// The metrics endpoint: plain HTTP on a loopback address.
#[derive(Debug)]
pub struct MetricsListener {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl MetricsListener {
    /// Binds `addr`, which must be a loopback address (port 0 picks a free port). Needs no
    /// runtime; [`serve`](Self::serve) does.
    pub fn bind(addr: SocketAddr) -> Result<MetricsListener, StatusError> {
        if !addr.ip().is_loopback() {
            return Err(StatusError::NotLoopback { addr });
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
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        if connections.len() >= MAX_CONNECTIONS {
                            tracing::debug!("too many metrics connections; closing one");
                            continue;
                        }
                        connections.spawn(answer_http(stream, rx.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "accepting on metrics endpoint");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
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
) {
    let exchange = async {
        let (head, complete) = read_request(&mut stream, MAX_HTTP_HEAD, head_complete).await?;
        if head.is_empty() {
            return Ok(());
        }
        let response = http_response(&head, complete, || render_metrics(&rx.borrow()));
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

    #[test]
    fn metrics_text() {
        let text = render_metrics(&sample());
        for want in [
            "# HELP watcher_events_total ",
            "# TYPE watcher_events_total counter\nwatcher_events_total 123456\n",
            "# TYPE watcher_overflows_total counter\nwatcher_overflows_total 2\n",
            "watcher_events_per_second 78.25\n",
            "watcher_info{version=\"0.1.0\",backend=\"fanotify\"} 1\n",
            "# TYPE watcher_dirty_paths gauge\n",
            "watcher_dirty_paths{group=\"data\",target=\"local\"} 0\n",
            "watcher_dirty_paths{group=\"data\",target=\"remote \\\"eu\\\"\"} 120\n",
            "watcher_oldest_unsynced_seconds{group=\"data\",target=\"remote \\\"eu\\\"\"} 185\n",
            "watcher_oldest_unsynced_seconds{group=\"data\",target=\"local\"} 0\n",
            "# TYPE watcher_rsync_runs_total counter\n",
            "watcher_rsync_runs_total{group=\"data\",target=\"local\"} 12\n",
            "watcher_sync_failures_consecutive{group=\"data\",target=\"remote \\\"eu\\\"\"} 2\n",
            "watcher_last_sync_success{group=\"data\",target=\"local\"} 1\n",
            "watcher_last_sync_success{group=\"data\",target=\"remote \\\"eu\\\"\"} 0\n",
            "watcher_target_up{group=\"data\",target=\"local\"} 1\n",
            "watcher_target_up{group=\"data\",target=\"remote \\\"eu\\\"\"} 0\n",
            "watcher_target_state{group=\"data\",target=\"local\",state=\"in_step\"} 1\n",
            "watcher_target_state{group=\"data\",target=\"local\",state=\"failed\"} 0\n",
            "watcher_ssh_connection_up{group=\"data\",target=\"remote \\\"eu\\\"\"} 0\n",
            "watcher_ssh_connection_since_seconds{group=\"data\",target=\"remote \\\"eu\\\"\"} 4535\n",
            "# TYPE watcher_ssh_reconnects_total counter\nwatcher_ssh_reconnects_total{group=\"data\",target=\"remote \\\"eu\\\"\"} 3\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // Only ssh targets have connection metrics.
        assert!(!text.contains("watcher_ssh_connection_up{group=\"data\",target=\"local\"}"));
        // Every family is introduced once, and its samples follow it without interruption.
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                assert!(seen.insert(name.clone()), "{name} twice");
                current = name;
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, current, "sample outside its family: {line}");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
            }
        }
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
        let listener = MetricsListener::bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
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
        assert_eq!(body, render_metrics(&sample()));

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

    #[test]
    fn metrics_refuse_non_loopback() {
        let err = MetricsListener::bind((Ipv4Addr::UNSPECIFIED, 0).into()).unwrap_err();
        assert!(matches!(err, StatusError::NotLoopback { .. }), "{err:?}");
        assert!(err.to_string().contains("0.0.0.0:0"), "{err}");
        let err = MetricsListener::bind((Ipv4Addr::new(10, 0, 0, 1), 9100).into()).unwrap_err();
        assert!(matches!(err, StatusError::NotLoopback { .. }), "{err:?}");
    }
}
