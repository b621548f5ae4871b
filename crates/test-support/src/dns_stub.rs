//! A stub DNS server on `127.0.0.1:0` (UDP) answering from a fixed table, for pointing a resolver
//! at names whose addresses (A, AAAA) and services (SRV) the test chooses. Names not in the
//! table get NXDOMAIN; a known name asked for a type it has no record of gets an empty NOERROR
//! answer. Answers carry TTL 0 so a
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
const TYPE_SRV: u16 = 33;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_FORMERR: u8 = 1;

/// One query the stub received.
#[derive(Debug, Clone)]
pub struct Query {
    /// The name asked for, lowercase, without the trailing dot.
    pub name: String,
    /// Query type (1 = A, 28 = AAAA, 33 = SRV).
    pub qtype: u16,
    /// When it arrived.
    pub at: Instant,
}

/// One SRV record: priority, weight, port, target.
pub type Srv = (u16, u16, u16, String);

/// What the stub answers: each name's addresses, and its SRV records.
#[derive(Debug, Default)]
struct Table {
    addresses: HashMap<String, Vec<IpAddr>>,
    services: HashMap<String, Vec<Srv>>,
}

/// A running stub DNS server; stops when dropped.
#[derive(Debug)]
pub struct DnsStub {
    addr: SocketAddr,
    table: Arc<Mutex<Table>>,
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
        let addresses: HashMap<String, Vec<IpAddr>> =
            records.iter().map(|(n, a)| (key(n), a.clone())).collect();
        let table = Arc::new(Mutex::new(Table {
            addresses,
            services: HashMap::new(),
        }));
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
        match addresses {
            Some(a) => table.addresses.insert(key(name), a),
            None => table.addresses.remove(&key(name)),
        };
    }

    /// Answers `name`'s SRV queries with `records` from now on; `None` removes them.
    pub fn set_services(&self, name: &str, records: Option<Vec<Srv>>) {
        let mut table = match self.table.lock() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        match records {
            Some(r) => table.services.insert(key(name), r),
            None => table.services.remove(&key(name)),
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

/// A table key: lowercase, without the trailing dot.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The reply to one query message, or `None` for something that is not a query at all.
fn answer(msg: &[u8], table: &Table, log: &Mutex<Vec<Query>>) -> Option<Vec<u8>> {
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
        (
            table.addresses.get(&name),
            table.services.get(&name).filter(|_| qtype == TYPE_SRV),
        )
    };
    let known = entry.0.is_some() || table.services.contains_key(&name);
    let mut answers: Vec<(u16, Vec<u8>)> = entry
        .0
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| match (qtype, ip) {
                    (TYPE_A, IpAddr::V4(v4)) => Some((TYPE_A, v4.octets().to_vec())),
                    (TYPE_AAAA, IpAddr::V6(v6)) => Some((TYPE_AAAA, v6.octets().to_vec())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    for (priority, weight, port, target) in entry.1.into_iter().flatten() {
        let mut data = Vec::new();
        for v in [priority, weight, port] {
            data.extend_from_slice(&v.to_be_bytes());
        }
        for label in target
            .trim_end_matches('.')
            .split('.')
            .filter(|l| !l.is_empty())
        {
            data.push(label.len() as u8);
            data.extend_from_slice(label.as_bytes());
        }
        data.push(0);
        answers.push((TYPE_SRV, data));
    }
    out.push(0x80 | if known { 0 } else { RCODE_NXDOMAIN });
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&msg[12..qend]);
    for (t, data) in answers {
        // A pointer to the question's name, at offset 12.
        out.extend_from_slice(&[0xc0, 0x0c]);
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
