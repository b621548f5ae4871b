//! Name resolution for upstream addresses, with its own timeout and typed failures.
//!
//! By default the system resolver (`getaddrinfo`, so `/etc/hosts` and nsswitch apply) runs on
//! Tokio's blocking pool; SRV records, which it does not know, are asked of the nameservers in
//! `/etc/resolv.conf`. With nameservers configured, tether queries them itself (UDP then TCP)
//! and does not read the system configuration: that is how tests point it at a stub DNS server on
//! loopback, and how deployments pin a resolver.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// How names are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Nameservers to query directly (`ip:port`); empty means the system resolver.
    pub nameservers: Vec<SocketAddr>,
    /// Longest a lookup may take. Default 5 s.
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// Why a name did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The name does not exist (NXDOMAIN, no such host).
    #[error("name not found")]
    NotFound(#[source] Option<Box<dyn std::error::Error + Send + Sync>>),
    /// The resolver did not answer in time (or answered "try again").
    #[error("lookup timed out")]
    Timeout,
    /// Any other resolver failure.
    #[error("lookup failed: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl DnsError {
    /// The conventional name for the failure: `ENOTFOUND`, `EAI_AGAIN` or `EAI_FAIL`.
    pub fn code(&self) -> &'static str {
        match self {
            DnsError::NotFound(_) => "ENOTFOUND",
            DnsError::Timeout => "EAI_AGAIN",
            DnsError::Failed(_) => "EAI_FAIL",
        }
    }
}

/// A resolver.
#[derive(Clone)]
pub struct Resolver {
    hickory: Option<TokioResolver>,
    timeout: Duration,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("system", &self.hickory.is_none())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Resolver {
    /// Builds a resolver for `config`.
    pub fn new(config: &DnsConfig) -> Result<Resolver, DnsError> {
        if config.nameservers.is_empty() {
            return Ok(Resolver {
                hickory: None,
                timeout: config.timeout,
            });
        }
        let servers = config
            .nameservers
            .iter()
            .map(|a| {
                let mut udp = ConnectionConfig::new(ProtocolConfig::Udp);
                udp.port = a.port();
                let mut tcp = ConnectionConfig::new(ProtocolConfig::Tcp);
                tcp.port = a.port();
                let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                ns.connections = vec![udp, tcp];
                ns
            })
            .collect();
        let mut opts = ResolverOpts::default();
        opts.timeout = config.timeout;
        opts.attempts = 1;
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .map_err(|e| DnsError::Failed(Box::new(e)))?;
        Ok(Resolver {
            hickory: Some(resolver),
            timeout: config.timeout,
        })
    }

    /// The addresses of `host`, in the resolver's order. IP literals are returned as they are.
    pub async fn lookup(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DnsError> {
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let found = match &self.hickory {
            Some(r) => match tokio::time::timeout(self.timeout, r.lookup_ip(host)).await {
                Ok(Ok(ips)) => ips
                    .iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect::<Vec<_>>(),
                Ok(Err(e)) => return Err(hickory_error(e)),
                Err(_) => return Err(DnsError::Timeout),
            },
            None => match tokio::time::timeout(self.timeout, tokio::net::lookup_host((host, port)))
                .await
            {
                Ok(Ok(addrs)) => addrs.collect(),
                Ok(Err(e)) => return Err(system_error(e)),
                Err(_) => return Err(DnsError::Timeout),
            },
        };
        if found.is_empty() {
            return Err(DnsError::NotFound(None));
        }
        Ok(found)
    }

    /// The SRV records of `name`, sorted (by priority first). A record whose target is `.` (the
    /// service is not offered there, RFC 2782) is left out. Without nameservers configured, the
    /// system's (`/etc/resolv.conf`) are queried: `getaddrinfo` knows no SRV records.
    pub async fn services(&self, name: &str) -> Result<Vec<ServiceRecord>, DnsError> {
        let system;
        let resolver = match &self.hickory {
            Some(r) => r,
            None => {
                let mut opts = ResolverOpts::default();
                opts.timeout = self.timeout;
                system = TokioResolver::builder_tokio()
                    .map_err(|e| DnsError::Failed(Box::new(e)))?
                    .with_options(opts)
                    .build()
                    .map_err(|e| DnsError::Failed(Box::new(e)))?;
                &system
            }
        };
        let lookup = match tokio::time::timeout(self.timeout, resolver.srv_lookup(name)).await {
            Ok(Ok(lookup)) => lookup,
            Ok(Err(e)) => return Err(hickory_error(e)),
            Err(_) => return Err(DnsError::Timeout),
        };
        let mut found: Vec<ServiceRecord> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) if !srv.target.is_root() => Some(ServiceRecord {
                    priority: srv.priority,
                    weight: srv.weight,
                    port: srv.port,
                    target: srv
                        .target
                        .to_utf8()
                        .trim_end_matches('.')
                        .to_ascii_lowercase(),
                }),
                _ => None,
            })
            .collect();
        found.sort_unstable();
        found.dedup();
        if found.is_empty() {
            return Err(DnsError::NotFound(None));
        }
        Ok(found)
    }
}

/// One SRV record: where an instance of a service is, and its place among the others.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRecord {
    /// Lower first: targets of a higher priority only when none of a lower one can serve.
    pub priority: u16,
    /// A target's share among those of its priority.
    pub weight: u16,
    /// The port the service listens on there.
    pub port: u16,
    /// The host, lowercase, without the trailing dot.
    pub target: String,
}

/// A hickory failure as one of tether's.
fn hickory_error(e: hickory_resolver::net::NetError) -> DnsError {
    if e.is_nx_domain() || e.is_no_records_found() {
        DnsError::NotFound(Some(Box::new(e)))
    } else if matches!(e, hickory_resolver::net::NetError::Timeout) {
        DnsError::Timeout
    } else {
        DnsError::Failed(Box::new(e))
    }
}

/// getaddrinfo's failures reach Rust only as text; tell "no such name" from "try again" for the
/// operator's benefit.
fn system_error(e: io::Error) -> DnsError {
    let text = e.to_string();
    if text.contains("Temporary failure") || text.contains("try again") {
        DnsError::Timeout
    } else if text.contains("not known")
        || text.contains("No address")
        || text.contains("no such host")
    {
        DnsError::NotFound(Some(Box::new(e)))
    } else {
        DnsError::Failed(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_skip_the_resolver() {
        let r = Resolver::new(&DnsConfig::default()).unwrap();
        assert_eq!(
            r.lookup("127.0.0.1", 80).await.unwrap(),
            vec!["127.0.0.1:80".parse().unwrap()]
        );
        assert_eq!(
            r.lookup("::1", 80).await.unwrap(),
            vec!["[::1]:80".parse().unwrap()]
        );
    }

    #[tokio::test]
    async fn unanswered_nameserver_times_out() {
        // A bound UDP socket that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let r = Resolver::new(&DnsConfig {
            nameservers: vec![silent.local_addr().unwrap()],
            timeout: Duration::from_millis(300),
        })
        .unwrap();
        let e = r.lookup("example.test", 80).await.unwrap_err();
        assert_eq!(e.code(), "EAI_AGAIN", "{e:?}");
    }
}
