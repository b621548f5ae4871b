//! `--log-format pretty`: one human-readable access log line per request, for a terminal.

use std::fmt::Write as _;
use std::time::Duration;

use tether_gateway::observe::access::{AccessLog, LineSink, Outcome, RequestRecord};

/// Writes one line per request, e.g.
/// `499 GET /work client_abort reason=client_closed stage=first_byte 1002ms prop=0.2ms id=…`.
#[derive(Debug)]
pub struct Pretty {
    out: LineSink,
}

impl Pretty {
    /// Pretty lines to `out`.
    pub fn new(out: LineSink) -> Pretty {
        Pretty { out }
    }
}

impl AccessLog for Pretty {
    fn record(&self, rec: &RequestRecord) {
        self.out.write_line(&format_record(rec));
    }

    fn flush(&self) {
        self.out.flush();
    }

    fn reopen(&self) -> std::io::Result<bool> {
        self.out.reopen()
    }
}

/// The line for one record, without the newline.
pub fn format_record(rec: &RequestRecord) -> String {
    let mut s = format!(
        "{} {} {} {} {}",
        rec.status,
        rec.method.as_ref().map_or("-", |m| m.as_str()),
        rec.path,
        rec.protocol,
        rec.outcome
    );
    if let Some(code) = rec.grpc_status {
        let _ = write!(s, " grpc-status={code}");
    }
    if let Some(r) = rec.abort_reason {
        let _ = write!(s, " reason={r}");
    }
    if let Some(stage) = rec.stage
        && rec.outcome != Outcome::Ok
    {
        let _ = write!(s, " stage={stage}");
    }
    let _ = write!(s, " {}", human(rec.duration));
    if let Some(p) = rec.propagation {
        let _ = write!(s, " prop={}", human(p));
    }
    if let Some(u) = &rec.upstream {
        let _ = write!(s, " upstream={u}");
        if let Some(a) = rec.upstream_addr {
            let _ = write!(s, "@{a}");
        }
    }
    // Where the time went upstream, only for the stages that took any.
    let t = &rec.timings;
    for (name, d) in [
        ("dns", t.dns),
        ("connect", t.connect),
        ("tls", t.tls),
        ("send", t.send),
        ("ttfb", t.first_byte),
        ("body", t.body),
    ] {
        if let Some(d) = d.filter(|d| *d >= Duration::from_micros(100)) {
            let _ = write!(s, " {name}={}", human(d));
        }
    }
    if rec.retries > 0 {
        let _ = write!(s, " retries={}", rec.retries);
    }
    let _ = write!(
        s,
        " sent={}B client={} id={}",
        rec.bytes_sent, rec.client, rec.request_id
    );
    if let Some(tls) = &rec.tls {
        let _ = write!(s, " tls={}", tls.version);
        if let Some(name) = &tls.server_name {
            let _ = write!(s, " sni={name}");
        }
    }
    if let Some(t) = &rec.trace_id {
        let _ = write!(s, " trace={t}");
    }
    if let Some(sp) = &rec.span_id {
        let _ = write!(s, " span={sp}");
    }
    s
}

/// `850us`, `0.2ms` below 10 ms, `1002ms`, `12.3s`.
fn human(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1000 {
        format!("{us}us")
    } else if us < 10_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else if us < 100_000_000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use tether::CancelReason;
    use tether_gateway::observe::access::StageTimings;

    use super::*;

    #[test]
    fn client_abort_line() {
        let rec = RequestRecord {
            time: SystemTime::now(),
            request_id: "r1".into(),
            client: "127.0.0.1:5000".parse().unwrap(),
            local: "127.0.0.1:8080".parse().unwrap(),
            protocol: "HTTP/1.1",
            method: Some(http::Method::GET),
            authority: "localhost".into(),
            path: "/work".into(),
            status: 499,
            bytes_sent: 0,
            bytes_received: 0,
            duration: Duration::from_millis(1002),
            route: Some("demo".into()),
            upstream: Some("demo".into()),
            upstream_addr: None,
            upstream_local: None,
            upstream_protocol: Some("http1"),
            outcome: Outcome::ClientAbort,
            abort_reason: Some(CancelReason::ClientClosed),
            stage: Some("first_byte"),
            upstream_connect: None,
            queued: None,
            auth: None,
            auth_to_client: None,
            grpc_status: None,
            tls: None,
            upstream_first_byte: None,
            upstream_time: None,
            propagation: Some(Duration::from_micros(200)),
            upstream_reused: None,
            retries: 0,
            timings: StageTimings {
                connect: Some(Duration::from_micros(50)),
                first_byte: Some(Duration::from_millis(1001)),
                ..Default::default()
            },
            trace_id: None,
            span_id: None,
        };
        assert_eq!(
            format_record(&rec),
            "499 GET /work HTTP/1.1 client_abort reason=client_closed stage=first_byte 1002ms \
             prop=200us upstream=demo ttfb=1001ms sent=0B client=127.0.0.1:5000 id=r1"
        );
        // tether's own answer to a gRPC request: the code beside the status it stands for.
        let grpc = RequestRecord {
            status: 504,
            outcome: Outcome::Timeout,
            abort_reason: Some(CancelReason::Deadline),
            grpc_status: Some(4),
            propagation: None,
            ..rec
        };
        assert!(
            format_record(&grpc)
                .starts_with("504 GET /work HTTP/1.1 timeout grpc-status=4 reason=deadline "),
            "{}",
            format_record(&grpc)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(human(Duration::from_micros(850)), "850us");
        assert_eq!(human(Duration::from_micros(2500)), "2.5ms");
        assert_eq!(human(Duration::from_millis(1002)), "1002ms");
        assert_eq!(human(Duration::from_secs(200)), "200.0s");
    }
}
