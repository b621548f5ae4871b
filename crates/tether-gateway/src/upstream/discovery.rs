//! DNS discovery: the names of upstreams with [`Discovery`](crate::config::Discovery) looked up
//! periodically, each address found becoming an endpoint of its own.
//!
//! The configuration as written keeps its names; [`expand`] derives the one the workers run,
//! where each discovered name stands for one pinned address per answer. The gateway looks the
//! names up again every interval and publishes a new expansion when an answer changes; a failed
//! lookup keeps the addresses found before (an upstream must not lose every endpoint because its
//! resolver hiccuped), and a name never answered yet stays one endpoint resolved when connecting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use crate::config::{Config, UpstreamAddress};
use crate::upstream::dns::{DnsError, Resolver};

/// The addresses each discovered name had at its last successful lookup, sorted.
pub type Answers = HashMap<String, Vec<IpAddr>>;

/// The names to look up (lowercase, each once), and how often: the shortest interval of the
/// upstreams using them. None when no upstream discovers.
pub fn names(config: &Config) -> Option<(Vec<String>, Duration)> {
    let mut names: Vec<String> = Vec::new();
    let mut every: Option<Duration> = None;
    for u in &config.upstreams {
        let Some(d) = u.discovery else { continue };
        every = Some(every.map_or(d.interval, |e| e.min(d.interval)));
        for a in u.addresses.iter().filter(|a| a.is_name()) {
            let name = a.host.to_ascii_lowercase();
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Some((names, every?))
}

/// Looks every name up at once; each answer sorted and without duplicates.
pub async fn lookup(
    resolver: &Resolver,
    names: &[String],
) -> Vec<(String, Result<Vec<IpAddr>, DnsError>)> {
    let mut lookups = tokio::task::JoinSet::new();
    for n in names {
        let (resolver, n) = (resolver.clone(), n.clone());
        lookups.spawn(async move {
            let found = resolver.lookup(&n, 0).await.map(|addrs| {
                let mut ips: Vec<IpAddr> = addrs.iter().map(|a| a.ip()).collect();
                ips.sort_unstable();
                ips.dedup();
                ips
            });
            (n, found)
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

/// Records `found` in `answers`: successful lookups replace a name's addresses, failed ones
/// keep them (and are logged, and passed to `failed`). True when any name's addresses changed.
pub fn learn(
    answers: &mut Answers,
    found: Vec<(String, Result<Vec<IpAddr>, DnsError>)>,
    failed: impl Fn(&str),
) -> bool {
    let mut changed = false;
    for (name, result) in found {
        match result {
            Ok(ips) => {
                if answers.get(&name) != Some(&ips) {
                    tracing::info!(name = %name, addresses = ?ips, "discovered endpoints changed");
                    answers.insert(name, ips);
                    changed = true;
                }
            }
            Err(e) => {
                failed(&name);
                tracing::warn!(
                    name = %name,
                    error = %e,
                    code = e.code(),
                    kept = answers.get(&name).map_or(0, Vec::len),
                    "discovery lookup failed; keeping the addresses found before"
                );
            }
        }
    }
    changed
}

/// `config` with each discovered name replaced by one endpoint per address in `answers` (in
/// address order, each with its name's weight and backup flag). Names without an answer, IP literals and
/// upstreams without discovery are left as written.
pub fn expand(config: &Config, answers: &Answers) -> Config {
    let mut out = config.clone();
    for u in out.upstreams.iter_mut().filter(|u| u.discovery.is_some()) {
        // An address written twice is one endpoint; one address under two names is two (each
        // names itself in TLS).
        let mut endpoints: Vec<(UpstreamAddress, (u32, bool))> = Vec::new();
        for (i, a) in u.addresses.iter().enumerate() {
            let weight = u.weights.get(i).copied().unwrap_or(1);
            let backup = u.backups.get(i).copied().unwrap_or(false);
            let found = a
                .is_name()
                .then(|| answers.get(&a.host.to_ascii_lowercase()))
                .flatten()
                .filter(|ips| !ips.is_empty());
            let expanded: Vec<UpstreamAddress> = match found {
                Some(ips) => ips
                    .iter()
                    .map(|ip| UpstreamAddress {
                        host: a.host.clone(),
                        port: a.port,
                        pinned: Some(*ip),
                    })
                    .collect(),
                None => vec![a.clone()],
            };
            for e in expanded {
                if !endpoints.iter().any(|(b, _)| *b == e) {
                    endpoints.push((e, (weight, backup)));
                }
            }
        }
        let (had_weights, had_backups) = (!u.weights.is_empty(), !u.backups.is_empty());
        let (addresses, marks): (Vec<_>, Vec<_>) = endpoints.into_iter().unzip();
        let (weights, backups): (Vec<_>, Vec<_>) = marks.into_iter().unzip();
        u.addresses = addresses;
        u.weights = if had_weights { weights } else { Vec::new() };
        u.backups = if had_backups { backups } else { Vec::new() };
    }
    out
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
        });
        Config::new(vec![listener], vec![u])
    }

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn each_address_of_a_name_becomes_a_pinned_endpoint_with_its_weight_and_backup_flag() {
        let mut c = upstream(&["App.test:80", "10.0.0.9:81", "db.test:82"], vec![3, 1, 2]);
        c.upstreams[0].backups = vec![false, false, true];
        let answers: Answers = [
            ("app.test".to_owned(), ips(&["10.0.0.1", "10.0.0.2"])),
            ("db.test".to_owned(), Vec::new()),
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
            ("a.test".to_owned(), ips(&["10.0.0.1"])),
            ("b.test".to_owned(), ips(&["10.0.0.1", "10.0.0.2"])),
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
            vec![("a.test".into(), Ok(ips(&["10.0.0.1"])))],
            |_| {}
        ));
        assert!(!learn(
            &mut answers,
            vec![("a.test".into(), Err(DnsError::Timeout))],
            |n| assert_eq!(n, "a.test")
        ));
        assert_eq!(answers["a.test"], ips(&["10.0.0.1"]));
        assert!(!learn(
            &mut answers,
            vec![("a.test".into(), Ok(ips(&["10.0.0.1"])))],
            |_| {}
        ));
        assert!(learn(
            &mut answers,
            vec![("a.test".into(), Ok(Vec::new()))],
            |_| {}
        ));
    }

    #[test]
    fn names_are_collected_once_with_the_shortest_interval() {
        let mut c = upstream(&["a.test:80", "A.test:81", "10.0.0.1:80"], Vec::new());
        let mut other = c.upstreams[0].clone();
        other.name = "v".into();
        other.discovery = Some(Discovery {
            interval: Duration::from_millis(300),
        });
        other.addresses = vec![UpstreamAddress::new("b.test", 80)];
        c.upstreams.push(other);
        let (n, every) = names(&c).unwrap();
        assert_eq!(n, ["a.test", "b.test"]);
        assert_eq!(every, Duration::from_millis(300));
        c.upstreams.iter_mut().for_each(|u| u.discovery = None);
        assert!(names(&c).is_none());
    }
}
