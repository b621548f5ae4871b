//! DNS discovery: the names of upstreams with [`Discovery`](crate::config::Discovery) looked up
//! periodically, each address found becoming an endpoint of its own. An SRV name (Consul,
//! Kubernetes, any service registry that speaks DNS) gives hosts and ports, each host's addresses
//! the endpoints, its records' weights their shares and their priorities which are backups.
//!
//! The configuration as written keeps its names; [`expand`] derives the one the workers run,
//! where each discovered name stands for one pinned address per answer. The gateway looks the
//! names up again every interval and publishes a new expansion when an answer changes; a failed
//! lookup keeps the addresses found before (an upstream must not lose every endpoint because its
//! resolver hiccuped), and a name never answered yet stays one endpoint resolved when connecting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::config::{Balance, Config, MAX_WEIGHT, UpstreamAddress};
use crate::upstream::dns::{DnsError, Resolver, ServiceRecord};

/// A discovered name and what is looked up for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Query {
    /// The name, lowercase.
    pub name: String,
    /// SRV records (else A and AAAA).
    pub srv: bool,
}

/// What a name's last successful lookup found, sorted and without duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Its addresses.
    Addresses(Vec<IpAddr>),
    /// Its SRV records, each with its target's addresses.
    Services(Vec<(ServiceRecord, Vec<IpAddr>)>),
}

/// What each discovered name had at its last successful lookup.
pub type Answers = HashMap<Query, Answer>;

/// The names to look up (each once), and how often: the shortest interval of the upstreams
/// using them. None when no upstream discovers.
pub fn names(config: &Config) -> Option<(Vec<Query>, Duration)> {
    let mut names: Vec<Query> = Vec::new();
    let mut every: Option<Duration> = None;
    for u in &config.upstreams {
        let Some(d) = u.discovery else { continue };
        every = Some(every.map_or(d.interval, |e| e.min(d.interval)));
        for a in u.addresses.iter().filter(|a| a.is_name()) {
            let q = Query {
                name: a.host.to_ascii_lowercase(),
                srv: d.srv,
            };
            if !names.contains(&q) {
                names.push(q);
            }
        }
    }
    Some((names, every?))
}

/// Looks every name up at once.
pub async fn lookup(
    resolver: &Resolver,
    names: &[Query],
) -> Vec<(Query, Result<Answer, DnsError>)> {
    let mut lookups = tokio::task::JoinSet::new();
    for q in names {
        let (resolver, q) = (resolver.clone(), q.clone());
        lookups.spawn(async move {
            let found = if q.srv {
                services(&resolver, &q.name).await.map(Answer::Services)
            } else {
                addresses(&resolver, &q.name).await.map(Answer::Addresses)
            };
            (q, found)
        });
    }
    let mut found = Vec::with_capacity(names.len());
    while let Some(done) = lookups.join_next().await {
        // A lookup task cannot panic short of a bug in the resolver; its name is looked up
        // again next round.
        if let Ok(f) = done {
            found.push(f);
        }
    }
    found
}

/// The addresses of `name`, sorted, without duplicates.
async fn addresses(resolver: &Resolver, name: &str) -> Result<Vec<IpAddr>, DnsError> {
    let mut ips: Vec<IpAddr> = resolver
        .lookup(name, 0)
        .await?
        .iter()
        .map(|a| a.ip())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    Ok(ips)
}

/// The SRV records of `name`, each with its target's addresses. A target that does not exist
/// is left out; any other failure fails the whole lookup, so that a resolver's hiccup does not
/// take endpoints away.
async fn services(
    resolver: &Resolver,
    name: &str,
) -> Result<Vec<(ServiceRecord, Vec<IpAddr>)>, DnsError> {
    let records = resolver.services(name).await?;
    let mut targets: HashMap<&str, Vec<IpAddr>> = HashMap::new();
    for r in &records {
        if targets.contains_key(r.target.as_str()) {
            continue;
        }
        let ips = match addresses(resolver, &r.target).await {
            Ok(ips) => ips,
            Err(DnsError::NotFound(_)) => Vec::new(),
            Err(e) => return Err(e),
        };
        targets.insert(&r.target, ips);
    }
    Ok(records
        .iter()
        .filter_map(|r| {
            let ips = targets.get(r.target.as_str())?;
            (!ips.is_empty()).then(|| (r.clone(), ips.clone()))
        })
        .collect())
}

/// Records `found` in `answers`: successful lookups replace a name's answer, failed ones keep
/// it (and are logged, and passed to `failed`). True when any name's answer changed.
pub fn learn(
    answers: &mut Answers,
    found: Vec<(Query, Result<Answer, DnsError>)>,
    failed: impl Fn(&str),
) -> bool {
    let mut changed = false;
    for (q, result) in found {
        match result {
            Ok(answer) => {
                if answers.get(&q) != Some(&answer) {
                    tracing::info!(name = %q.name, found = ?answer, "discovered endpoints changed");
                    answers.insert(q, answer);
                    changed = true;
                }
            }
            Err(e) => {
                failed(&q.name);
                tracing::warn!(
                    name = %q.name,
                    error = %e,
                    code = e.code(),
                    "discovery lookup failed; keeping the endpoints found before"
                );
            }
        }
    }
    changed
}

/// An endpoint an entry of `addresses` stands for, with its weight and backup flag.
type Expanded = (UpstreamAddress, (u32, bool));

/// `config` with each discovered name replaced by one endpoint per address in `answers` (in
/// address order, each with its name's weight and backup flag; an SRV name's endpoints in its
/// records' order, weighted by them, those of all but the first priority backups). Names
/// without an answer, IP literals and upstreams without discovery are left as written.
pub fn expand(config: &Config, answers: &Answers) -> Config {
    let mut out = config.clone();
    for u in out.upstreams.iter_mut() {
        let Some(d) = u.discovery else { continue };
        let hash = matches!(u.balance, Balance::Hash(_));
        // An address written twice is one endpoint; one address under two names is two (each
        // names itself in TLS).
        let mut endpoints: Vec<Expanded> = Vec::new();
        let mut weighted = !u.weights.is_empty();
        for (i, a) in u.addresses.iter().enumerate() {
            let weight = u.weights.get(i).copied().unwrap_or(1);
            let backup = u.backups.get(i).copied().unwrap_or(false);
            let query = Query {
                name: a.host.to_ascii_lowercase(),
                srv: d.srv,
            };
            let expanded: Vec<Expanded> = match a.is_name().then(|| answers.get(&query)).flatten() {
                Some(Answer::Addresses(ips)) if !ips.is_empty() => ips
                    .iter()
                    .map(|ip| (pinned(&a.host, a.port, *ip), (weight, backup)))
                    .collect(),
                Some(Answer::Services(found)) if !found.is_empty() => {
                    let shares = service_weights(found);
                    weighted |= shares.windows(2).any(|w| w[0] != w[1]);
                    let first = found[0].0.priority;
                    found
                        .iter()
                        .zip(shares)
                        // `hash` has no use for backups: it keeps to the first priority.
                        .filter(|((r, _), _)| !hash || r.priority == first)
                        .flat_map(|((r, ips), share)| {
                            let later = backup || r.priority != first;
                            ips.iter()
                                .map(move |ip| (pinned(&r.target, r.port, *ip), (share, later)))
                        })
                        .collect()
                }
                _ => vec![(a.clone(), (weight, backup))],
            };
            for e in expanded {
                if !endpoints.iter().any(|(b, _)| *b == e.0) {
                    endpoints.push(e);
                }
            }
        }
        let had_backups = !u.backups.is_empty() || endpoints.iter().any(|(_, (_, b))| *b);
        let (addresses, marks): (Vec<_>, Vec<_>) = endpoints.into_iter().unzip();
        let (weights, backups): (Vec<_>, Vec<_>) = marks.into_iter().unzip();
        u.addresses = addresses;
        u.weights = if weighted { weights } else { Vec::new() };
        u.backups = if had_backups { backups } else { Vec::new() };
    }
    out
}

fn pinned(host: &str, port: u16, ip: IpAddr) -> UpstreamAddress {
    UpstreamAddress {
        host: host.to_owned(),
        port,
        pinned: Some(ip),
    }
}

/// Each record's weight as tether's (1 to [`MAX_WEIGHT`]), relative to the heaviest of its
/// priority: SRV weights run to 65535, and a weight of 0 still gets a little (RFC 2782).
fn service_weights(found: &[(ServiceRecord, Vec<IpAddr>)]) -> Vec<u32> {
    found
        .iter()
        .map(|(r, _)| {
            let heaviest = found
                .iter()
                .filter(|(o, _)| o.priority == r.priority)
                .map(|(o, _)| u32::from(o.weight))
                .max()
                .unwrap_or(0);
            if heaviest == 0 {
                return MAX_WEIGHT;
            }
            (u32::from(r.weight) * MAX_WEIGHT).div_ceil(heaviest).max(1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Discovery, ListenerConfig, RouteConfig, UpstreamConfig, UpstreamProtocol};

    fn upstream(addresses: &[&str], weights: Vec<u32>) -> Config {
        let listener = ListenerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            vec![RouteConfig::new("/", "u")],
        );
        let mut u = UpstreamConfig::new(
            "u",
            addresses
                .iter()
                .map(|a| {
                    let (h, p) = a.rsplit_once(':').unwrap();
                    UpstreamAddress::new(h, p.parse().unwrap())
                })
                .collect(),
            UpstreamProtocol::Http1,
        );
        u.weights = weights;
        u.discovery = Some(Discovery {
            interval: Duration::from_secs(1),
            srv: false,
        });
        Config::new(vec![listener], vec![u])
    }

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn a(name: &str) -> Query {
        Query {
            name: name.into(),
            srv: false,
        }
    }

    fn found(s: &[&str]) -> Answer {
        Answer::Addresses(ips(s))
    }

    fn service(
        priority: u16,
        weight: u16,
        port: u16,
        target: &str,
        at: &[&str],
    ) -> (ServiceRecord, Vec<IpAddr>) {
        (
            ServiceRecord {
                priority,
                weight,
                port,
                target: target.into(),
            },
            ips(at),
        )
    }

    #[test]
    fn each_address_of_a_name_becomes_a_pinned_endpoint_with_its_weight_and_backup_flag() {
        let mut c = upstream(&["App.test:80", "10.0.0.9:81", "db.test:82"], vec![3, 1, 2]);
        c.upstreams[0].backups = vec![false, false, true];
        let answers: Answers = [
            (a("app.test"), found(&["10.0.0.1", "10.0.0.2"])),
            (a("db.test"), found(&[])),
        ]
        .into();
        let out = expand(&c, &answers);
        let u = &out.upstreams[0];
        let shown: Vec<String> = u.addresses.iter().map(ToString::to_string).collect();
        // An empty answer leaves the name as written, resolved when connecting.
        assert_eq!(
            shown,
            [
                "App.test/10.0.0.1:80",
                "App.test/10.0.0.2:80",
                "10.0.0.9:81",
                "db.test:82"
            ]
        );
        assert_eq!(u.weights, [3, 3, 1, 2]);
        assert_eq!(u.backups, [false, false, false, true]);
        assert_eq!(u.addresses[0].host, "App.test", "TLS still names the host");
        assert!(out.validate().is_ok(), "{:?}", out.validate());
    }

    #[test]
    fn one_address_under_two_names_is_two_endpoints_and_unweighted_stays_unweighted() {
        let c = upstream(&["a.test:80", "b.test:80"], Vec::new());
        let answers: Answers = [
            (a("a.test"), found(&["10.0.0.1"])),
            (a("b.test"), found(&["10.0.0.1", "10.0.0.2"])),
        ]
        .into();
        let u = &expand(&c, &answers).upstreams[0];
        assert_eq!(u.addresses.len(), 3, "{:?}", u.addresses);
        assert!(u.weights.is_empty() && u.backups.is_empty());
    }

    #[test]
    fn a_failed_lookup_keeps_the_addresses_found_before() {
        let mut answers = Answers::new();
        assert!(learn(
            &mut answers,
            vec![(a("a.test"), Ok(found(&["10.0.0.1"])))],
            |_| {}
        ));
        assert!(!learn(
            &mut answers,
            vec![(a("a.test"), Err(DnsError::Timeout))],
            |n| assert_eq!(n, "a.test")
        ));
        assert_eq!(answers[&a("a.test")], found(&["10.0.0.1"]));
        assert!(!learn(
            &mut answers,
            vec![(a("a.test"), Ok(found(&["10.0.0.1"])))],
            |_| {}
        ));
        assert!(learn(
            &mut answers,
            vec![(a("a.test"), Ok(found(&[])))],
            |_| {}
        ));
    }

    /// An SRV name's records: each target's addresses endpoints at the record's port, weighted
    /// by the record (relative to the heaviest of its priority), the later priority's backups.
    #[test]
    fn an_srv_name_becomes_its_targets_addresses_with_their_weights_and_priorities() {
        let mut c = upstream(&["10.0.0.9:81"], Vec::new());
        c.upstreams[0]
            .addresses
            .push(UpstreamAddress::new("_http._tcp.app.test", 0));
        c.upstreams[0].discovery = Some(Discovery {
            interval: Duration::from_secs(1),
            srv: true,
        });
        let srv = Query {
            name: "_http._tcp.app.test".into(),
            srv: true,
        };
        let answers: Answers = [(
            srv.clone(),
            Answer::Services(vec![
                service(10, 60000, 8080, "a.test", &["10.0.0.1", "10.0.0.2"]),
                service(10, 20000, 8081, "b.test", &["10.0.0.3"]),
                service(20, 0, 9090, "c.test", &["10.0.0.4"]),
            ]),
        )]
        .into();
        let out = expand(&c, &answers);
        let u = &out.upstreams[0];
        let shown: Vec<String> = u.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "10.0.0.9:81",
                "a.test/10.0.0.1:8080",
                "a.test/10.0.0.2:8080",
                "b.test/10.0.0.3:8081",
                "c.test/10.0.0.4:9090"
            ]
        );
        assert_eq!(u.weights, [1, 100, 100, 34, 100]);
        assert_eq!(u.backups, [false, false, false, false, true]);
        assert!(out.validate().is_ok(), "{:?}", out.validate());

        // `hash` keeps to the first priority; equal weights leave the upstream unweighted.
        c.upstreams[0].balance = Balance::Hash(crate::config::HashKey::ClientIp);
        let answers: Answers = [(
            srv,
            Answer::Services(vec![
                service(10, 5, 8080, "a.test", &["10.0.0.1"]),
                service(10, 5, 8081, "b.test", &["10.0.0.3"]),
                service(20, 5, 9090, "c.test", &["10.0.0.4"]),
            ]),
        )]
        .into();
        let out = expand(&c, &answers);
        let u = &out.upstreams[0];
        assert_eq!(u.addresses.len(), 3, "{:?}", u.addresses);
        assert!(u.weights.is_empty() && u.backups.is_empty());
        assert!(out.validate().is_ok(), "{:?}", out.validate());
    }

    #[test]
    fn names_are_collected_once_with_the_shortest_interval() {
        let mut c = upstream(&["a.test:80", "A.test:81", "10.0.0.1:80"], Vec::new());
        let mut other = c.upstreams[0].clone();
        other.name = "v".into();
        other.discovery = Some(Discovery {
            interval: Duration::from_millis(300),
            srv: true,
        });
        other.addresses = vec![UpstreamAddress::new("b.test", 80)];
        c.upstreams.push(other);
        let (n, every) = names(&c).unwrap();
        let srv = |name: &str| Query {
            name: name.into(),
            srv: true,
        };
        assert_eq!(n, [a("a.test"), srv("b.test")]);
        assert_eq!(every, Duration::from_millis(300));
        c.upstreams.iter_mut().for_each(|u| u.discovery = None);
        assert!(names(&c).is_none());
    }
}
