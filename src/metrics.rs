//! Numbers to graph: `--metrics ADDR:PORT` serves the process's counters in
//! Prometheus' text format (version 0.0.4) at `GET /metrics`.
//!
//! Components register a [`MetricsSource`] (the PCI function: trapped
//! accesses per region, DMA, page tracking, and its model's own; the VNC
//! server); a scrape asks each to write its families with a
//! [`MetricsWriter`]. Names follow Prometheus' conventions: `umdev_` prefix,
//! `_total` for counters, units in the name (`_bytes`, `_seconds`).
//!
//! The endpoint is one thread answering one connection at a time: a request
//! is at most [`MAX_REQUEST`] bytes of HTTP/1.x head read within
//! [`REQUEST_TIMEOUT`]; anything else gets a 400 and the connection closed.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tracing::{info, warn};

/// The longest request head read.
pub const MAX_REQUEST: usize = 8192;
/// How long a client may take to send it (and to take the answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes metric families in the text format. A family written by several
/// sources (instances of one parent, each with its own labels) comes out
/// once, its samples together.
#[derive(Default)]
pub struct MetricsWriter {
    /// Families in the order first written: name, HELP and TYPE lines, samples.
    families: Vec<(String, String, Vec<String>)>,
    /// Labels added to every sample while set (`with_labels`), rendered.
    labels: String,
}

/// A label value as the text format quotes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends `label="value"` to a rendered label list.
fn push_label(labels: &mut String, label: &str, value: &str) {
    if !labels.is_empty() {
        labels.push(',');
    }
    let _ = write!(labels, "{label}=\"{}\"", escape(value));
}

impl MetricsWriter {
    fn family(&mut self, name: &str, help: &str, kind: &str) -> &mut Vec<String> {
        let i = match self.families.iter().position(|f| f.0 == name) {
            Some(i) => i,
            None => {
                let head = format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
                self.families.push((name.to_owned(), head, Vec::new()));
                self.families.len() - 1
            }
        };
        &mut self.families[i].2
    }

    /// One sample of `name` with `label="value"` (if any) after the writer's
    /// labels.
    fn sample(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        label: Option<(&str, &str)>,
        value: String,
    ) {
        let mut labels = self.labels.clone();
        if let Some((l, v)) = label {
            push_label(&mut labels, l, v);
        }
        let line = if labels.is_empty() {
            format!("{name} {value}")
        } else {
            format!("{name}{{{labels}}} {value}")
        };
        self.family(name, help, kind).push(line);
    }

    /// Runs `f` with `labels` added to every sample it writes.
    pub fn with_labels(&mut self, labels: &[(&str, &str)], f: impl FnOnce(&mut Self)) {
        let saved = self.labels.clone();
        for (l, v) in labels {
            push_label(&mut self.labels, l, v);
        }
        f(self);
        self.labels = saved;
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.sample(name, help, "counter", None, value.to_string());
    }

    /// A counter with one label, a sample per value.
    pub fn counters(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, u64)]) {
        self.labeled(name, help, "counter", label, samples);
    }

    fn labeled(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        label: &str,
        samples: &[(&str, u64)],
    ) {
        self.family(name, help, kind);
        for (v, n) in samples {
            self.sample(name, help, kind, Some((label, v)), n.to_string());
        }
    }

    /// A counter of seconds.
    pub fn seconds(&mut self, name: &str, help: &str, value: Duration) {
        self.sample(name, help, "counter", None, value.as_secs_f64().to_string());
    }

    /// A gauge with one label, a sample per value.
    pub fn gauges(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, u64)]) {
        self.labeled(name, help, "gauge", label, samples);
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.sample(name, help, "gauge", None, value.to_string());
    }

    pub fn finish(self) -> String {
        let mut out = String::new();
        for (_, head, samples) in self.families {
            out.push_str(&head);
            for line in samples {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }
}

/// A source whose samples all carry `labels` (e.g. `instance="<uuid>"` for
/// one of a parent's instances).
pub struct LabeledSource {
    pub labels: Vec<(String, String)>,
    pub inner: Arc<dyn MetricsSource>,
}

impl MetricsSource for LabeledSource {
    fn write_metrics(&self, w: &mut MetricsWriter) {
        let labels: Vec<(&str, &str)> = self
            .labels
            .iter()
            .map(|(l, v)| (l.as_str(), v.as_str()))
            .collect();
        w.with_labels(&labels, |w| self.inner.write_metrics(w));
    }
}

/// Something with counters.
pub trait MetricsSource: Send + Sync {
    fn write_metrics(&self, w: &mut MetricsWriter);
}

static SOURCES: Mutex<Vec<Weak<dyn MetricsSource>>> = Mutex::new(Vec::new());

/// Adds `source` to what a scrape reports, for as long as it lives.
pub fn register(source: &Arc<dyn MetricsSource>) {
    let mut s = SOURCES.lock().unwrap_or_else(|p| p.into_inner());
    s.retain(|w| w.strong_count() > 0);
    s.push(Arc::downgrade(source));
}

/// Every registered source's families, in the text format.
pub fn render() -> String {
    let sources: Vec<_> = SOURCES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let mut w = MetricsWriter::default();
    for s in sources {
        s.write_metrics(&mut w);
    }
    w.finish()
}

/// The non-zero samples of `source`, as `name{labels} value` joined by ", ":
/// what a run did, for a log line when no scraper was watching.
pub fn summary(source: &dyn MetricsSource) -> String {
    let mut w = MetricsWriter::default();
    source.write_metrics(&mut w);
    let text = w.finish();
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
        .collect();
    samples.join(", ")
}

/// What a client asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Metrics,
    /// Any other path of a GET (404).
    Other,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("request head over {MAX_REQUEST} bytes or incomplete")]
    Incomplete,
    #[error("not an HTTP/1.x GET or HEAD: {0:?}")]
    Method(String),
}

/// Parses a request head (the request line and headers, up to the empty
/// line). Only the request line matters.
pub fn parse_request(head: &[u8]) -> Result<Request, HttpError> {
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| head.windows(2).position(|w| w == b"\n\n"))
        .ok_or(HttpError::Incomplete)?;
    let text = String::from_utf8_lossy(&head[..end]);
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, path, version) = (parts.next(), parts.next(), parts.next());
    let ok = matches!(method, Some("GET" | "HEAD"))
        && version.is_some_and(|v| v.starts_with("HTTP/1."))
        && parts.next().is_none();
    if !ok {
        return Err(HttpError::Method(line.chars().take(80).collect()));
    }
    Ok(match path {
        Some("/metrics") | Some("/metrics/") => Request::Metrics,
        _ => Request::Other,
    })
}

/// Reads a request head: until the empty line, at most [`MAX_REQUEST`] bytes.
fn read_head(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while head.len() < MAX_REQUEST {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    head.truncate(MAX_REQUEST);
    Ok(head)
}

/// The answer to `head`.
pub fn respond(head: &[u8]) -> Vec<u8> {
    let (status, body) = match parse_request(head) {
        Ok(Request::Metrics) => ("200 OK", render()),
        Ok(Request::Other) => ("404 Not Found", "try /metrics\n".to_string()),
        Err(e) => ("400 Bad Request", format!("{e}\n")),
    };
    let content_type = if status.starts_with("200") {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head.starts_with(b"HEAD ") {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn serve_one(mut s: TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let head = read_head(&mut s)?;
    s.write_all(&respond(&head))?;
    let _ = s.shutdown(std::net::Shutdown::Both);
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("--metrics {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("--metrics: starting its thread: {0}")]
    Thread(io::Error),
}

/// System calls the endpoint makes after start-up beyond the default sandbox
/// (its timeouts).
pub const SYSCALLS: &[libc::c_long] = &[libc::SYS_setsockopt];

/// Binds `addr` (now, before the sandbox) and answers scrapes on a thread;
/// returns the address bound (port 0 picks one).
pub fn serve(addr: SocketAddr) -> Result<SocketAddr, MetricsError> {
    let listener =
        TcpListener::bind(addr).map_err(|source| MetricsError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Listen { addr, source })?;
    crate::sandbox::allow_extra(SYSCALLS);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = serve_one(s) {
                            warn!("metrics request: {e}");
                        }
                    }
                    Err(e) => warn!("metrics accept: {e}"),
                }
            }
        })
        .map_err(MetricsError::Thread)?;
    info!(%bound, "metrics at http://{bound}/metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Two;
    impl MetricsSource for Two {
        fn write_metrics(&self, w: &mut MetricsWriter) {
            w.counter("umdev_test_total", "A test counter.", 2);
            w.counters("umdev_test_by_total", "By kind.", "kind", &[("a\"b", 1)]);
        }
    }

    #[test]
    fn labeled_sources_share_their_families() {
        let a = LabeledSource {
            labels: vec![("instance".into(), "a".into())],
            inner: Arc::new(Two),
        };
        let b = LabeledSource {
            labels: vec![("instance".into(), "b".into())],
            inner: Arc::new(Two),
        };
        let mut w = MetricsWriter::default();
        a.write_metrics(&mut w);
        b.write_metrics(&mut w);
        let text = w.finish();
        assert_eq!(
            text.matches("# TYPE umdev_test_total counter").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains(
                "umdev_test_total{instance=\"a\"} 2\numdev_test_total{instance=\"b\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("umdev_test_by_total{instance=\"b\",kind=\"a\\\"b\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn summary_lists_non_zero_samples_only() {
        struct Some0;
        impl MetricsSource for Some0 {
            fn write_metrics(&self, w: &mut MetricsWriter) {
                w.counter("umdev_zero_total", "Nothing.", 0);
                w.counters("umdev_by_total", "By kind.", "kind", &[("a", 0), ("b", 10)]);
            }
        }
        assert_eq!(
            summary(&Two),
            "umdev_test_total 2, umdev_test_by_total{kind=\"a\\\"b\"} 1"
        );
        assert_eq!(summary(&Some0), "umdev_by_total{kind=\"b\"} 10");
    }

    #[test]
    fn requests_and_rendering() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(Request::Metrics)
        );
        assert_eq!(parse_request(b"GET / HTTP/1.0\n\n"), Ok(Request::Other));
        assert!(parse_request(b"GET /metrics HTTP/1.1\r\n").is_err());
        assert!(parse_request(b"POST /metrics HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_request(b"GET /metrics SPDY\r\n\r\n").is_err());
        assert!(parse_request(b"\xff\xfe\r\n\r\n").is_err());
        let source: Arc<dyn MetricsSource> = Arc::new(Two);
        register(&source);
        let text = render();
        assert!(text.contains("# TYPE umdev_test_total counter\numdev_test_total 2\n"));
        assert!(text.contains("umdev_test_by_total{kind=\"a\\\"b\"} 1"));
        let answer = String::from_utf8(respond(b"GET /metrics HTTP/1.1\r\n\r\n")).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(answer.contains("text/plain; version=0.0.4"));
        let head = String::from_utf8(respond(b"HEAD /metrics HTTP/1.1\r\n\r\n")).unwrap();
        assert!(head.ends_with("\r\n\r\n"));
        assert!(String::from_utf8(respond(b"junk"))
            .unwrap()
            .starts_with("HTTP/1.1 400"));
    }
}
