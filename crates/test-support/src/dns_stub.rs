//! A stub DNS server on `127.0.0.1:0` (UDP) answering from a fixed table, for pointing a resolver
//! at names whose addresses the test chooses. Names not in the table get NXDOMAIN; a known name
//! asked for a type it has no address of gets an empty NOERROR answer. Answers carry TTL 0 so a
//! resolver asks again each time, and every query is logged with its arrival time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::BoxError;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_FORMERR: u8 = 1;

/// One query the stub received.
#[derive(Debug, Clone)]
pub struct Query {
    /// The name asked for, lowercase, without the trailing dot.
    pub name: String,
    /// Query type (1 = A, 28 = AAAA).
    pub qtype: u16,
    /// When it arrived.
    pub at: Instant,
}

/// A running stub DNS server; stops when dropped.
#[derive(Debug)]
pub struct DnsStub {
    addr: SocketAddr,
    table: Arc<Mutex<HashMap<String, Vec<IpAddr>>>>,
    queries: Arc<Mutex<Vec<Query>>>,
    task: JoinHandle<()>,
}

impl Drop for DnsStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsStub {
    /// Starts a stub answering `records` (name → addresses, in answer order).
    pub async fn start(records: &[(&str, Vec<IpAddr>)]) -> Result<DnsStub, BoxError> {
        let table: HashMap<String, Vec<IpAddr>> = records
            .iter()
            .map(|(n, a)| (n.trim_end_matches('.').to_ascii_lowercase(), a.clone()))
            .collect();
        let table = Arc::new(Mutex::new(table));
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = sock.local_addr()?;
        let queries = Arc::new(Mutex::new(Vec::new()));
        let log = queries.clone();
        let records = table.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let reply = {
                    let table = match records.lock() {
                        Ok(t) => t,
                        Err(p) => p.into_inner(),
                    };
                    answer(&buf[..n], &table, &log)
                };
                let Some(reply) = reply else {
                    continue;
                };
                let _ = sock.send_to(&reply, from).await;
            }
        });
        Ok(DnsStub {
            addr,
            table,
            queries,
            task,
        })
    }

    /// The address to configure as the resolver's nameserver.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers `name` with `addresses` from now on; `None` removes it (NXDOMAIN).
    pub fn set(&self, name: &str, addresses: Option<Vec<IpAddr>>) {
        let mut table = match self.table.lock() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match addresses {
            Some(a) => table.insert(name, a),
            None => table.remove(&name),
        };
    }

    /// Every query received so far.
    pub fn queries(&self) -> Vec<Query> {
        match self.queries.lock() {
            Ok(q) => q.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// The reply to one query message, or `None` for something that is not a query at all.
fn answer(
    msg: &[u8],
    table: &HashMap<String, Vec<IpAddr>>,
    log: &Mutex<Vec<Query>>,
) -> Option<Vec<u8>> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 {
        return None;
    }
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    let parsed = (qdcount == 1).then(|| question(msg)).flatten();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&msg[..2]);
    // QR, opcode and RD copied; AA set. RA set.
    out.push(0x80 | (msg[2] & 0x79) | 0x04);
    let Some((name, qtype, qend)) = parsed else {
        out.push(0x80 | RCODE_FORMERR);
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        return Some(out);
    };
    let entry = {
        let mut q = match log.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        q.push(Query {
            name: name.clone(),
            qtype,
            at: Instant::now(),
        });
        table.get(&name)
    };
    let answers: Vec<IpAddr> = entry
        .map(|ips| {
            ips.iter()
                .copied()
                .filter(|ip| match qtype {
                    TYPE_A => ip.is_ipv4(),
                    TYPE_AAAA => ip.is_ipv6(),
                    _ => false,
                })
                .collect()
        })
        .unwrap_or_default();
    out.push(0x80 | if entry.is_none() { RCODE_NXDOMAIN } else { 0 });
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&msg[12..qend]);
    for ip in answers {
        // A pointer to the question's name, at offset 12.
        out.extend_from_slice(&[0xc0, 0x0c]);
        let (t, data) = match ip {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        out.extend_from_slice(&t.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(&data);
    }
    Some(out)
}

/// The question's name (lowercase, dotted), type, and the offset just past the question.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*msg.get(i)?);
        i += 1;
        if len == 0 {
            break;
        }
        // Compression cannot appear in a question that starts the message.
        if len & 0xc0 != 0 {
            return None;
        }
        labels.push(String::from_utf8_lossy(msg.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    // Type and class.
    let end = i + 4;
    if msg.len() < end {
        return None;
    }
    Some((labels.join("."), qtype, end))
}
