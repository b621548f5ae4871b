//! A stub DNS server on `127.0.0.1:0` (UDP) answering from a fixed table, so a resolver can be
//! pointed at names whose addresses the test chooses. A known name gets its A or AAAA records
//! (an empty NOERROR answer for a family it has none of); any other name gets NXDOMAIN. Answers
//! carry TTL 0, so resolvers ask again each time. Every query is logged.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::BoxError;

/// One question the stub was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsQuery {
    /// The name, lowercase, without the trailing dot.
    pub name: String,
    /// `A`, `AAAA`, ...
    pub qtype: String,
}

/// A running stub DNS server; stops when dropped.
#[derive(Debug)]
pub struct DnsStub {
    addr: SocketAddr,
    queries: Arc<Mutex<Vec<DnsQuery>>>,
    task: JoinHandle<()>,
}

impl Drop for DnsStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsStub {
    /// Starts a stub answering `records` (name → addresses, answered in this order).
    pub async fn start(records: &[(&str, Vec<IpAddr>)]) -> Result<DnsStub, BoxError> {
        let table: HashMap<String, Vec<IpAddr>> = records
            .iter()
            .map(|(n, a)| (normalize(n), a.clone()))
            .collect();
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = sock.local_addr()?;
        let queries = Arc::new(Mutex::new(Vec::new()));
        let log = queries.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let Some(reply) = answer(&buf[..n], &table, &log) else {
                    continue;
                };
                let _ = sock.send_to(&reply, from).await;
            }
        });
        Ok(DnsStub {
            addr,
            queries,
            task,
        })
    }

    /// The address to give a resolver as its nameserver.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every question asked so far.
    pub fn queries(&self) -> Vec<DnsQuery> {
        match self.queries.lock() {
            Ok(q) => q.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The reply to one datagram; `None` for anything that is not a parseable query.
fn answer(
    packet: &[u8],
    table: &HashMap<String, Vec<IpAddr>>,
    log: &Mutex<Vec<DnsQuery>>,
) -> Option<Vec<u8>> {
    let req = Message::from_vec(packet).ok()?;
    if req.message_type != MessageType::Query {
        return None;
    }
    let mut resp = Message::response(req.id, req.op_code);
    resp.metadata.recursion_desired = req.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    if req.op_code != OpCode::Query || req.queries.len() != 1 {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp.to_vec().ok();
    }
    let q = req.queries[0].clone();
    let name = normalize(&q.name().to_ascii());
    if let Ok(mut l) = log.lock() {
        l.push(DnsQuery {
            name: name.clone(),
            qtype: q.query_type().to_string(),
        });
    }
    match table.get(&name) {
        None => resp.metadata.response_code = ResponseCode::NXDomain,
        Some(addrs) => {
            for ip in addrs {
                let rdata = match (ip, q.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                resp.add_answer(Record::from_rdata(q.name().clone(), 0, rdata));
            }
        }
    }
    resp.add_query(q);
    resp.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    async fn ask(stub: &DnsStub, name: &str, qtype: RecordType) -> Message {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&q.to_vec().unwrap(), stub.addr())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) =
            tokio::time::timeout(std::time::Duration::from_secs(2), sock.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(r.id, q.id);
        r
    }

    #[tokio::test]
    async fn answers_known_names_and_nxdomain() {
        let stub = DnsStub::start(&[(
            "app.test",
            vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        )])
        .await
        .unwrap();
        let a = ask(&stub, "app.test.", RecordType::A).await;
        assert_eq!(a.response_code, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        let aaaa = ask(&stub, "APP.test.", RecordType::AAAA).await;
        assert_eq!(aaaa.answers.len(), 1);
        let nx = ask(&stub, "missing.test.", RecordType::A).await;
        assert_eq!(nx.response_code, ResponseCode::NXDomain);
        assert_eq!(
            stub.queries()
                .iter()
                .map(|q| q.name.as_str())
                .collect::<Vec<_>>(),
            ["app.test", "app.test", "missing.test"]
        );
    }
}
