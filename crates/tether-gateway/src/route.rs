//! Host + path → route. First match wins, in configuration order. A route matches its path by
//! prefix (whole segments), exactly, or by a regular expression.

use std::sync::{Arc, OnceLock};

use http::HeaderValue;
use http::uri::PathAndQuery;

use crate::config::{HalfClose, RouteConfig, RouteTimeouts, TraceContext};
use crate::observe::metrics::{Metrics, RouteMetrics};
use crate::proxy::headers::Rewrite;

/// A route ready for matching.
#[derive(Debug)]
pub struct Route {
    /// Name for logs and metrics.
    pub name: Arc<str>,
    /// Lowercase; empty: any host.
    hosts: Box<[String]>,
    prefix: String,
    /// The path exactly, or a regular expression, in place of `prefix`.
    path: Option<Box<PathRule>>,
    /// With `path`: what the path sent upstream becomes.
    rewrite_path: Option<String>,
    /// Index into the worker's upstream list.
    pub upstream: usize,
    /// Timeouts.
    pub timeouts: RouteTimeouts,
    /// HTTP/1 half-close policy.
    pub half_close: HalfClose,
    /// Retry policy and budget.
    pub retry: crate::proxy::retry::RetryPolicy,
    /// Budget header name, if enabled.
    pub budget_header: Option<http::header::HeaderName>,
    /// W3C trace context handling.
    pub trace_context: TraceContext,
    /// Requests in flight at once, when limited (shared by every worker).
    pub in_flight: Option<Arc<crate::admission::Limit>>,
    /// The largest request body, when the route sets its own (else the listener's).
    pub max_body_bytes: Option<u64>,
    /// An idempotent request's declared body up to this size is read whole before it is sent.
    pub retry_body_bytes: u64,
    /// Request bodies are read ahead up to this size before an upstream connection is taken.
    pub request_buffer_bytes: u64,
    /// Where a body read ahead goes past its first MiB, if anywhere.
    pub request_buffer_dir: Option<Arc<std::path::Path>>,
    /// How far response bodies are read ahead of the client; 0: not at all.
    pub response_buffer_bytes: usize,
    /// Where copies of the route's requests go, when it mirrors them.
    pub mirror: Option<Box<crate::proxy::mirror::MirrorTarget>>,
    /// The auth service that checks each request first, when the route has one.
    pub auth: Option<Box<crate::proxy::auth::AuthTarget>>,
    /// Which requests get an access-log line.
    pub access_log: crate::config::AccessLogMode,
    /// When set, every request is answered with this redirect (and `upstream` is not used).
    pub redirect: Option<RedirectTemplate>,
    /// When set, every request is answered with this response (and `upstream` is not used).
    pub respond: Option<Box<FixedResponse>>,
    /// When set, requests are spread over these upstreams (and `upstream` is not used).
    split: Option<Box<Split>>,
    /// Methods and headers a request must have too, if any.
    condition: Option<Box<Condition>>,
    /// Requests per client over time, when limited (shared by every worker).
    pub rate_limit: Option<Arc<crate::admission::RateLimiter>>,
    /// Which clients the route serves, when it does not serve all.
    pub access: Option<Box<crate::admission::ClientAccess>>,
    /// Response compression, when on.
    pub compression: Option<Box<crate::config::Compression>>,
    /// Changes to upstream requests' headers.
    pub request_headers: Rewrite,
    /// Changes to responses' headers.
    pub response_headers: Rewrite,
    /// What replaces the matched prefix in the path sent upstream (no trailing `/`; "" is the
    /// root).
    rewrite_prefix: Option<String>,
    /// Its metric handles, made on its first request.
    metrics: OnceLock<Arc<RouteMetrics>>,
}

/// A route's requests spread over several upstreams by weight, in a smooth order (weights 3
/// and 1 give `a a b a`), every worker taking the next turn; or, for a request carrying the
/// split's key, always the same upstream for that key.
#[derive(Debug)]
struct Split {
    /// The upstreams' indexes.
    upstreams: Box<[usize]>,
    /// Positions in `upstreams`, one per unit of weight.
    order: Box<[u32]>,
    next: std::sync::atomic::AtomicUsize,
    /// What keeps a request on one upstream, when the split has a key.
    key: Option<crate::upstream::balance::Affinity>,
    /// Each target's hash seed (from its upstream's name: the same everywhere) and weight.
    seeds: Box<[(u64, u32)]>,
}

impl Split {
    fn new(
        targets: &[crate::config::SplitTarget],
        key: Option<&crate::config::HashKey>,
        upstream_index: &impl Fn(&str) -> Option<usize>,
    ) -> Option<Split> {
        let upstreams = targets
            .iter()
            .map(|t| upstream_index(&t.upstream))
            .collect::<Option<Box<[usize]>>>()?;
        let weights: Vec<u32> = targets.iter().map(|t| t.weight).collect();
        let order = crate::upstream::balance::schedule(&weights).unwrap_or_else(|| {
            (0..targets.len())
                .filter_map(|i| u32::try_from(i).ok())
                .collect()
        });
        if order.is_empty() {
            return None;
        }
        let key = match key {
            Some(k) => Some(crate::upstream::balance::Affinity::new(k)?),
            None => None,
        };
        let seeds = targets
            .iter()
            .map(|t| {
                let seed = crate::upstream::balance::stable_hash(t.upstream.as_bytes());
                (seed, t.weight)
            })
            .collect();
        Some(Split {
            upstreams,
            order,
            next: std::sync::atomic::AtomicUsize::new(0),
            key,
            seeds,
        })
    }

    /// The next turn's upstream, or `hashed`'s: the target with the highest weighted score for
    /// that key (a weight of 0 is never chosen).
    fn pick(&self, hashed: Option<u64>) -> usize {
        let at = match hashed {
            Some(h) => self
                .seeds
                .iter()
                .enumerate()
                .filter(|(_, (_, w))| *w > 0)
                .map(|(i, &(seed, w))| (i, crate::upstream::balance::score(h, seed, w)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(0, |(i, _)| i),
            None => {
                let turn =
                    self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.order.len();
                self.order.get(turn).map_or(0, |&i| i as usize)
            }
        };
        self.upstreams.get(at).copied().unwrap_or(usize::MAX)
    }
}

impl Route {
    /// The upstream (index) of the route's next request: its own, or its split's choice.
    /// `key_of` reads a split's key from the request (a hash, or `None` without the key); it is
    /// called only for a split that has one.
    #[inline]
    pub fn next_upstream(
        &self,
        key_of: impl FnOnce(&crate::upstream::balance::Affinity) -> Option<u64>,
    ) -> usize {
        match &self.split {
            None => self.upstream,
            Some(split) => split.pick(split.key.as_ref().and_then(key_of)),
        }
    }

    /// Whether a response's `Location` may need mapping back: the route rewrites its prefix, or
    /// sends the upstream a `Host` of its own.
    pub fn maps_location(&self) -> bool {
        self.rewrite_prefix.is_some() || self.request_headers.host().is_some()
    }

    /// A response's `Location` as the client must see it, as nginx's default `proxy_redirect`
    /// maps it. An absolute URL to the `Host` the route sends the upstream instead of the
    /// client's (`http://app.internal/login`) loses its scheme and authority, so the client
    /// stays on the host it asked for (`/login`). When the route rewrites its prefix, a path under
    /// the upstream's prefix is then moved back under the route's (`/login` from an upstream
    /// behind `path_prefix = "/api"`, `rewrite_prefix = "/"` becomes `/api/login`). `None`:
    /// left as it is (other hosts, other paths, or nothing to map).
    pub fn client_location(&self, location: &HeaderValue) -> Option<HeaderValue> {
        let loc = location.to_str().ok()?;
        let own = self
            .request_headers
            .host()
            .and_then(|h| h.to_str().ok())
            .and_then(|host| without_origin(loc, host));
        let path = match own {
            Some(path) => path,
            None if loc.starts_with('/') && !loc.starts_with("//") => loc,
            None => return None,
        };
        let mapped = match self.rewrite_prefix.as_deref() {
            Some(to) => move_prefix(path, to, &self.prefix),
            None => None,
        };
        match (mapped, own) {
            (Some(m), _) => HeaderValue::from_str(&m).ok(),
            (None, Some(path)) => HeaderValue::from_str(path).ok(),
            (None, None) => None,
        }
    }

    /// The path and query to send upstream when the route rewrites its path: `path` (which the
    /// route matched) with the matched prefix replaced, or (with a path rule) the path given,
    /// its groups filled in, and the query kept. `None`: sent as it came.
    pub fn upstream_path(&self, path: &PathAndQuery) -> Option<PathAndQuery> {
        let moved = match (&self.rewrite_prefix, &self.rewrite_path, &self.path) {
            (Some(to), _, _) => move_prefix(path.as_str(), &self.prefix, to)?,
            (None, Some(to), Some(rule)) => {
                let mut out = rule.rewrite(path.path(), to);
                if let Some(q) = path.query() {
                    out.push('?');
                    out.push_str(q);
                }
                out
            }
            _ => return None,
        };
        PathAndQuery::from_maybe_shared(bytes::Bytes::from(moved)).ok()
    }

    /// Whether the route matches `path`.
    #[inline]
    fn matches_path(&self, path: &str) -> bool {
        match &self.path {
            None => prefix_matches(&self.prefix, path),
            Some(rule) => rule.matches(path),
        }
    }

    /// This route's metric handles in `metrics`.
    pub fn metrics(&self, metrics: &Metrics) -> Arc<RouteMetrics> {
        self.metrics
            .get_or_init(|| Arc::new(metrics.route(&self.name)))
            .clone()
    }
}

/// A route's fixed response, ready to send.
#[derive(Debug, Clone)]
pub struct FixedResponse {
    /// The status.
    pub status: http::StatusCode,
    /// The body.
    pub body: bytes::Bytes,
    /// Its type; `None` for an empty body.
    pub content_type: Option<http::HeaderValue>,
}

impl FixedResponse {
    /// Checks and prepares `respond`: a final status (200 to 599), no body where the status
    /// forbids one, a content type that is a valid header value.
    pub fn parse(respond: &crate::config::Respond) -> Result<FixedResponse, String> {
        if !(200..=599).contains(&respond.status) {
            return Err(format!(
                "status {} is not a final status (200 to 599)",
                respond.status
            ));
        }
        let status = http::StatusCode::from_u16(respond.status).map_err(|e| e.to_string())?;
        if matches!(respond.status, 204 | 304) && !respond.body.is_empty() {
            return Err(format!("a {} response has no body", respond.status));
        }
        let content_type = if respond.body.is_empty() {
            None
        } else {
            Some(
                http::HeaderValue::from_str(&respond.content_type).map_err(|_| {
                    format!("{:?} is not a valid content type", respond.content_type)
                })?,
            )
        };
        Ok(FixedResponse {
            status,
            body: bytes::Bytes::from(respond.body.clone().into_bytes()),
            content_type,
        })
    }
}

/// A route's redirect, its `Location` template parsed.
#[derive(Debug, Clone)]
pub struct RedirectTemplate {
    parts: Vec<Part>,
    /// The status answered.
    pub status: http::StatusCode,
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Host,
    Path,
    Uri,
}

impl RedirectTemplate {
    /// Checks and parses `redirect`: a 3xx status that redirects, and a template whose only
    /// placeholders are `{host}`, `{path}` and `{uri}`.
    pub fn parse(redirect: &crate::config::Redirect) -> Result<RedirectTemplate, String> {
        if ![301, 302, 303, 307, 308].contains(&redirect.status) {
            return Err(format!(
                "status {} is not a redirect (301, 302, 303, 307 or 308)",
                redirect.status
            ));
        }
        let status = http::StatusCode::from_u16(redirect.status).map_err(|e| e.to_string())?;
        let mut parts = Vec::new();
        let mut rest = redirect.to.as_str();
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(format!("{:?} has a '}}' without its '{{'", redirect.to));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("{:?} has a '{{' without its '}}'", redirect.to))?;
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            parts.push(match &rest[open + 1..open + close] {
                "host" => Part::Host,
                "path" => Part::Path,
                "uri" => Part::Uri,
                other => {
                    return Err(format!(
                        "{{{other}}} is not one of {{host}}, {{path}}, {{uri}}"
                    ));
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        let texts = parts.iter().filter_map(|p| match p {
            Part::Text(t) => Some(t),
            _ => None,
        });
        for t in texts {
            if HeaderValue::from_str(t).is_err() {
                return Err(format!(
                    "{:?} has a character no header can carry",
                    redirect.to
                ));
            }
        }
        if parts.is_empty() {
            return Err("the redirect's target is empty".into());
        }
        Ok(RedirectTemplate { parts, status })
    }

    /// The `Location` for a request to `host` (port dropped) with `uri`.
    pub fn location(&self, host: &[u8], uri: &http::Uri) -> Option<HeaderValue> {
        let mut out = Vec::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                Part::Host => out.extend_from_slice(without_port(host)),
                Part::Path => out.extend_from_slice(uri.path().as_bytes()),
                Part::Uri => out.extend_from_slice(
                    uri.path_and_query()
                        .map_or(b"/".as_slice(), |p| p.as_str().as_bytes()),
                ),
            }
        }
        HeaderValue::from_bytes(&out).ok()
    }
}

/// The routes of one listener.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Builds a router; `upstream_index` maps an upstream name to its index (validated config
    /// guarantees it exists, and that the header rules parse).
    pub fn new(routes: &[RouteConfig], upstream_index: impl Fn(&str) -> Option<usize>) -> Router {
        Router::reloaded(routes, None, upstream_index)
    }

    /// [`Router::new`] for a reload of `previous`: a route with the same name, host, prefix,
    /// methods and headers keeps its in-flight count (the requests it holds still count, under
    /// the new `max_in_flight`) and, when its `rate_limit` is unchanged, what each client has
    /// used.
    pub fn reloaded(
        routes: &[RouteConfig],
        previous: Option<&Router>,
        upstream_index: impl Fn(&str) -> Option<usize>,
    ) -> Router {
        let routes = routes
            .iter()
            .filter_map(|r| {
                let hosts: Box<[String]> = r.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
                let prefix = r.path_prefix.trim_end_matches('/').to_owned();
                let path = match (&r.path_exact, &r.path_regex) {
                    (Some(p), _) => Some(Box::new(PathRule::Exact(p.clone()))),
                    (None, Some(re)) => Some(Box::new(PathRule::regex(re).ok()?)),
                    (None, None) => None,
                };
                let condition = Condition::new(&r.methods, &r.match_headers)
                    .ok()?
                    .map(Box::new);
                // The same route: it matches the same requests, under the same name.
                let old = previous.and_then(|p| {
                    p.routes.iter().find(|o| {
                        *o.name == *r.name
                            && o.hosts == hosts
                            && o.prefix == prefix
                            && o.path == path
                            && o.condition == condition
                    })
                });
                Some(Route {
                    name: Arc::from(r.name.as_str()),
                    hosts,
                    prefix,
                    path,
                    rewrite_path: r.rewrite_path.clone(),
                    // A route that splits, redirects or responds has no upstream of its own;
                    // its index is never read.
                    upstream: if r.redirect.is_some() || r.respond.is_some() || !r.split.is_empty()
                    {
                        usize::MAX
                    } else {
                        upstream_index(&r.upstream)?
                    },
                    split: if r.split.is_empty() {
                        None
                    } else {
                        Some(Box::new(Split::new(
                            &r.split,
                            r.split_key.as_ref(),
                            &upstream_index,
                        )?))
                    },
                    respond: match &r.respond {
                        Some(respond) => Some(Box::new(FixedResponse::parse(respond).ok()?)),
                        None => None,
                    },
                    redirect: match &r.redirect {
                        Some(redirect) => Some(RedirectTemplate::parse(redirect).ok()?),
                        None => None,
                    },
                    timeouts: r.timeouts,
                    half_close: r.client_half_close,
                    retry: crate::proxy::retry::RetryPolicy::new(
                        r.max_retries,
                        r.retry_statuses.clone(),
                        r.retry_budget_ratio,
                        r.retry_budget_min_per_second,
                    ),
                    budget_header: r
                        .budget_header
                        .as_ref()
                        .and_then(|h| http::header::HeaderName::from_bytes(h.as_bytes()).ok()),
                    trace_context: r.trace_context,
                    max_body_bytes: r.max_body_bytes,
                    retry_body_bytes: r.retry_body_bytes,
                    request_buffer_bytes: r.request_buffer_bytes,
                    request_buffer_dir: r.request_buffer_dir.as_deref().map(Arc::from),
                    response_buffer_bytes: usize::try_from(r.response_buffer_bytes).ok()?,
                    mirror: match &r.mirror {
                        Some(m) => Some(Box::new(crate::proxy::mirror::MirrorTarget {
                            upstream: upstream_index(&m.upstream)?,
                            per_million: m.per_million,
                            in_flight: {
                                let max = m.max_in_flight as usize;
                                match old.and_then(|o| o.mirror.as_ref()) {
                                    Some(kept) => {
                                        kept.in_flight.set_max(max);
                                        kept.in_flight.clone()
                                    }
                                    None => crate::admission::Limit::new(max),
                                }
                            },
                        })),
                        None => None,
                    },
                    auth: match &r.auth {
                        Some(a) => {
                            let names = |list: &[String]| {
                                list.iter()
                                    .map(|h| {
                                        http::header::HeaderName::from_bytes(h.as_bytes()).ok()
                                    })
                                    .collect::<Option<_>>()
                            };
                            Some(Box::new(crate::proxy::auth::AuthTarget {
                                upstream: upstream_index(&a.upstream)?,
                                path: http::uri::PathAndQuery::try_from(a.path.as_str()).ok()?,
                                copy_headers: names(&a.copy_headers)?,
                                client_headers: names(&a.client_headers)?,
                                timeout: a.timeout,
                            }))
                        }
                        None => None,
                    },
                    access_log: r.access_log,
                    in_flight: r.max_in_flight.map(|n| {
                        match old.and_then(|o| o.in_flight.clone()) {
                            Some(kept) => {
                                kept.set_max(n.get());
                                kept
                            }
                            None => crate::admission::Limit::new(n.get()),
                        }
                    }),
                    rate_limit: r.rate_limit.as_ref().map(|limit| {
                        old.and_then(|o| o.rate_limit.clone())
                            .filter(|kept| kept.enforces(limit))
                            .unwrap_or_else(|| crate::admission::RateLimiter::new(limit))
                    }),
                    access: crate::admission::ClientAccess::of(r),
                    compression: r.compression.clone().map(Box::new),
                    request_headers: Rewrite::request(
                        &r.request_headers,
                        r.budget_header.as_deref(),
                    )
                    .ok()?,
                    response_headers: Rewrite::response(&r.response_headers).ok()?,
                    rewrite_prefix: r
                        .rewrite_prefix
                        .as_ref()
                        .map(|p| p.trim_end_matches('/').to_owned()),
                    condition,
                    metrics: OnceLock::new(),
                })
            })
            .collect();
        Router { routes }
    }

    /// The first route matching `host` (port ignored, case-insensitive) and `path`.
    pub fn select(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.select_host(host.map(str::as_bytes), path, None)
    }

    /// [`Router::select`] with the host as bytes (as a request carries it: no UTF-8 check) and
    /// the request's method and headers, for routes that match on them (without them, such
    /// routes do not match).
    pub fn select_host(
        &self,
        host: Option<&[u8]>,
        path: &str,
        request: Option<(&http::Method, &http::HeaderMap)>,
    ) -> Option<&Route> {
        let host = host.map(strip_port);
        self.routes.iter().find(|r| {
            let host_ok = r.hosts.is_empty()
                || host.is_some_and(|have| r.hosts.iter().any(|want| host_matches(want, have)));
            host_ok
                && r.matches_path(path)
                && r.condition.as_ref().is_none_or(|c| c.matches(request))
        })
    }
}

/// Whether a request's `host` (port stripped) is the route's `want`: that name, or with
/// `*.example.com` any name under `example.com` (not `example.com` itself), case aside.
fn host_matches(want: &str, host: &[u8]) -> bool {
    match want.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len()
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
        }
        None => want.as_bytes().eq_ignore_ascii_case(host),
    }
}

/// How a route matches a path other than by prefix.
#[derive(Debug)]
pub enum PathRule {
    /// This path, exactly.
    Exact(String),
    /// A regular expression the whole path matches (anchored at both ends).
    Regex(regex::Regex),
}

impl PartialEq for PathRule {
    fn eq(&self, other: &PathRule) -> bool {
        match (self, other) {
            (PathRule::Exact(a), PathRule::Exact(b)) => a == b,
            (PathRule::Regex(a), PathRule::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl PathRule {
    /// `pattern` as a rule the whole path must match; `Err` says why it is not a regular
    /// expression.
    pub fn regex(pattern: &str) -> Result<PathRule, String> {
        regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
            .size_limit(1 << 20)
            .build()
            .map(PathRule::Regex)
            .map_err(|e| match e {
                regex::Error::Syntax(s) => format!("not a regular expression: {s}"),
                regex::Error::CompiledTooBig(_) => "too large a regular expression".to_owned(),
                e => e.to_string(),
            })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathRule::Exact(p) => p == path,
            PathRule::Regex(re) => re.is_match(path),
        }
    }

    /// `to` with its group references filled in from `path` (which the rule matched).
    fn rewrite(&self, path: &str, to: &str) -> String {
        let mut out = String::new();
        match self {
            PathRule::Regex(re) => match re.captures(path) {
                Some(caps) => caps.expand(to, &mut out),
                None => out.push_str(&template_text(to)),
            },
            PathRule::Exact(_) => out.push_str(&template_text(to)),
        }
        out
    }

    /// Whether every group `to` refers to is one of the rule's: `Err` names one that is not.
    pub fn check_template(&self, to: &str) -> Result<(), String> {
        for group in template_refs(to) {
            let known = match (self, group.parse::<usize>()) {
                (PathRule::Regex(re), Ok(i)) => i < re.captures_len(),
                (PathRule::Regex(re), Err(_)) => re.capture_names().flatten().any(|n| n == group),
                (PathRule::Exact(_), _) => false,
            };
            if !known {
                return Err(format!("${group}: the path rule has no such group"));
            }
        }
        Ok(())
    }
}

/// A piece of a rewrite template: literal text, or a reference to a group (`$1`, `$name` or
/// `${name}`; `$$` is a literal `$`, as is a `$` that names nothing), as the regex crate's
/// `Captures::expand` reads them.
enum Piece<'a> {
    Text(&'a str),
    Group(&'a str),
}

/// Rewrite template `to`, piece by piece.
fn template_pieces(to: &str) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut rest = to;
    while let Some(i) = rest.find('$') {
        pieces.push(Piece::Text(&rest[..i]));
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            pieces.push(Piece::Text("$"));
            rest = after;
        } else if let Some(braced) = rest.strip_prefix('{') {
            let end = braced.find('}').unwrap_or(braced.len());
            pieces.push(Piece::Group(&braced[..end]));
            rest = braced.get(end + 1..).unwrap_or("");
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            pieces.push(if end == 0 {
                Piece::Text("$")
            } else {
                Piece::Group(&rest[..end])
            });
            rest = &rest[end..];
        }
    }
    pieces.push(Piece::Text(rest));
    pieces
}

/// The group references in rewrite template `to`.
fn template_refs(to: &str) -> Vec<&str> {
    template_pieces(to)
        .into_iter()
        .filter_map(|p| match p {
            Piece::Group(g) => Some(g),
            Piece::Text(_) => None,
        })
        .collect()
}

/// Rewrite template `to` with its group references left out: its literal text.
pub fn template_text(to: &str) -> String {
    template_pieces(to)
        .into_iter()
        .filter_map(|p| match p {
            Piece::Text(t) => Some(t),
            Piece::Group(_) => None,
        })
        .collect()
}

/// What else a route asks of a request: one of its methods, and every header it names (with
/// the value given, or any value for `*`).
#[derive(Debug, PartialEq)]
struct Condition {
    methods: Vec<http::Method>,
    headers: Vec<(http::HeaderName, Option<HeaderValue>)>,
}

impl Condition {
    /// `None` when there is nothing to ask; `Err` says what in the configuration is wrong.
    fn new(methods: &[String], headers: &[(String, String)]) -> Result<Option<Condition>, String> {
        if methods.is_empty() && headers.is_empty() {
            return Ok(None);
        }
        let methods = methods
            .iter()
            .map(|m| {
                if m.bytes().any(|b| b.is_ascii_lowercase()) {
                    // Methods are case-sensitive: "get" would never match a GET.
                    return Err(format!(
                        "{m:?}: methods are upper case ({:?})",
                        m.to_ascii_uppercase()
                    ));
                }
                http::Method::from_bytes(m.as_bytes()).map_err(|_| format!("{m:?} is not a method"))
            })
            .collect::<Result<_, _>>()?;
        let headers = headers
            .iter()
            .map(|(n, v)| {
                let value = match v.as_str() {
                    "*" => None,
                    v => Some(crate::proxy::headers::header_value(n, v)?),
                };
                Ok::<_, String>((crate::proxy::headers::header_name(n)?, value))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(Condition { methods, headers }))
    }

    fn matches(&self, request: Option<(&http::Method, &http::HeaderMap)>) -> bool {
        let Some((method, headers)) = request else {
            return false;
        };
        (self.methods.is_empty() || self.methods.contains(method))
            && self.headers.iter().all(|(name, want)| match want {
                None => headers.contains_key(name),
                Some(v) => headers.get_all(name).iter().any(|h| h == v),
            })
    }
}

/// Checks a route's `methods` and `match_headers`.
pub fn check_condition(methods: &[String], headers: &[(String, String)]) -> Result<(), String> {
    Condition::new(methods, headers).map(|_| ())
}

/// `path` with its prefix `from` replaced by `to` (both without a trailing `/`; "" is the root),
/// when `from` covers whole segments of it: what follows is nothing, a `/`, a query or a fragment.
/// `None` for any other path (`/v20` under `/v2`, or `OPTIONS *`).
fn move_prefix(path: &str, from: &str, to: &str) -> Option<String> {
    let rest = path.strip_prefix(from)?;
    if rest.starts_with('/') {
        return Some(format!("{to}{rest}"));
    }
    if !(rest.is_empty() || rest.starts_with(['?', '#'])) {
        return None;
    }
    let base = if to.is_empty() { "/" } else { to };
    Some(format!("{base}{rest}"))
}

/// The path-absolute part of `url` when it is an `http` or `https` URL to `host` (compared
/// case-insensitively, port included as written): `http://app.internal/a?b` gives `/a?b`, and
/// `http://app.internal` gives `/`.
fn without_origin<'a>(url: &'a str, host: &str) -> Option<&'a str> {
    let scheme_end = url.find("://")?;
    let scheme = &url[..scheme_end];
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let rest = &url[scheme_end + 3..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if !rest[..end].eq_ignore_ascii_case(host) {
        return None;
    }
    match &rest[end..] {
        "" => Some("/"),
        path if path.starts_with('/') => Some(path),
        // `http://host?x`: a query on the root.
        _ => None,
    }
}

/// `host` without its port, an IPv6 literal keeping its brackets (as it goes in a URL).
fn without_port(host: &[u8]) -> &[u8] {
    if host.starts_with(b"[") {
        let end = host
            .iter()
            .position(|&b| b == b']')
            .map_or(host.len(), |i| i + 1);
        return &host[..end];
    }
    strip_port(host)
}

fn strip_port(host: &[u8]) -> &[u8] {
    if let Some(rest) = host.strip_prefix(b"[") {
        // [v6]:port
        return rest.split(|&b| b == b']').next().unwrap_or(rest);
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(i) if host[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
        _ => host,
    }
}

/// `prefix` has no trailing slash ("" is the root); matches whole segments.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(weights: &[u32]) -> Split {
        let targets: Vec<crate::config::SplitTarget> = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| crate::config::SplitTarget {
                upstream: format!("u{i}"),
                weight,
            })
            .collect();
        let key = crate::config::HashKey::Path;
        Split::new(&targets, Some(&key), &|n: &str| n[1..].parse().ok()).unwrap()
    }

    #[test]
    fn a_keyed_split_keeps_each_key_on_one_upstream_by_weight() {
        let keys: Vec<u64> = (0..20_000u32)
            .map(|k| crate::upstream::balance::stable_hash(&k.to_le_bytes()))
            .collect();
        let canary5 = split(&[95, 5]);
        let picks5: Vec<usize> = keys.iter().map(|&k| canary5.pick(Some(k))).collect();
        // The same key, the same upstream.
        assert!(
            keys.iter()
                .zip(&picks5)
                .all(|(&k, &p)| canary5.pick(Some(k)) == p)
        );
        let share = picks5.iter().filter(|&&p| p == 1).count();
        assert!((700..=1300).contains(&share), "{share} of 20000");
        // Raising the canary's weight moves keys towards it only.
        let canary10 = split(&[90, 10]);
        let picks10: Vec<usize> = keys.iter().map(|&k| canary10.pick(Some(k))).collect();
        assert!(picks5.iter().zip(&picks10).all(|(&a, &b)| a == b || b == 1));
        assert!(picks10.iter().filter(|&&p| p == 1).count() > share);
        // A weight of 0 gets no key; requests without a key take turns.
        let drained = split(&[1, 0]);
        assert!(keys.iter().all(|&k| drained.pick(Some(k)) == 0));
        let even = split(&[1, 1]);
        let turns: Vec<usize> = (0..4).map(|_| even.pick(None)).collect();
        assert_eq!(turns.iter().filter(|&&p| p == 0).count(), 2, "{turns:?}");
    }

    fn router() -> Router {
        let mut api = RouteConfig::new("/api", "api");
        api.hosts = vec!["API.example.com".into()];
        let rest = RouteConfig::new("/", "web");
        Router::new(&[api, rest], |n| match n {
            "api" => Some(0),
            "web" => Some(1),
            _ => None,
        })
    }

    #[test]
    fn a_route_matches_any_of_its_hosts_a_wildcard_every_name_under_it_and_not_itself() {
        let mut tenants = RouteConfig::new("/", "tenants");
        tenants.hosts = vec!["*.App.example.com".into(), "app.example.org".into()];
        let r = Router::new(&[tenants, RouteConfig::new("/", "web")], |n| {
            ["tenants", "web"].iter().position(|u| *u == n)
        });
        let upstream = |host: &str| r.select(Some(host), "/").map(|r| r.upstream);
        assert_eq!(upstream("acme.app.example.com"), Some(0));
        assert_eq!(upstream("a.b.APP.example.com:8443"), Some(0));
        assert_eq!(upstream("app.example.com"), Some(1));
        assert_eq!(upstream("xapp.example.com"), Some(1));
        assert_eq!(upstream(".app.example.com"), Some(1));
        // Any of the route's hosts.
        assert_eq!(upstream("APP.example.org"), Some(0));
        assert_eq!(upstream("www.app.example.org"), Some(1));
    }

    #[test]
    fn exact_and_regex_paths_match_whole_paths_and_rewrite_from_groups() {
        let mut exact = RouteConfig::new("/", "web");
        exact.path_exact = Some("/status".into());
        exact.rewrite_path = Some("/health".into());
        let mut re = RouteConfig::new("/", "web");
        re.path_regex = Some("/u/(?<id>[0-9]+)(/.*)?".into());
        re.rewrite_path = Some("/users/${id}$2".into());
        let r = Router::new(&[exact, re, RouteConfig::new("/", "api")], |n| {
            ["web", "api"].iter().position(|u| *u == n)
        });
        let upstream = |path: &str| r.select(None, path).map(|r| r.upstream);
        assert_eq!(upstream("/status"), Some(0));
        assert_eq!(upstream("/status/x"), Some(1), "exact, not a prefix");
        assert_eq!(upstream("/u/7"), Some(0));
        assert_eq!(upstream("/u/7/orders"), Some(0));
        assert_eq!(upstream("/u/me"), Some(1));
        assert_eq!(upstream("/x/u/7"), Some(1), "anchored at the start");
        assert_eq!(upstream("/u/7x"), Some(1), "and at the end");
        let sent = |path: &'static str| {
            let route = r.select(None, path.split('?').next().unwrap()).unwrap();
            route
                .upstream_path(&PathAndQuery::from_static(path))
                .map(|p| p.as_str().to_owned())
        };
        assert_eq!(sent("/status?v=1").as_deref(), Some("/health?v=1"));
        assert_eq!(
            sent("/u/7/orders?p=2").as_deref(),
            Some("/users/7/orders?p=2")
        );
        assert_eq!(sent("/u/7").as_deref(), Some("/users/7"));
        assert_eq!(sent("/other"), None);
    }

    #[test]
    fn rewrite_templates_name_groups_the_rule_has() {
        let rule = PathRule::regex("/(?<a>x)(y)").unwrap();
        assert!(rule.check_template("/$1/${a}/$2/$$/$a").is_ok());
        assert!(rule.check_template("/$3").unwrap_err().contains("$3"));
        assert!(rule.check_template("/${b}").unwrap_err().contains("$b"));
        // `$1a` is the group named `1a`, as the regex crate reads it.
        assert!(rule.check_template("/$1a").is_err());
        assert!(PathRule::Exact("/s".into()).check_template("/$1").is_err());
        assert_eq!(template_text("/a/$1/${x}b/$$/$"), "/a//b/$/$");
        assert!(
            PathRule::regex("/(")
                .unwrap_err()
                .contains("not a regular expression")
        );
        assert_eq!(
            PathRule::regex("/a").unwrap(),
            PathRule::regex("/a").unwrap()
        );
    }

    #[test]
    fn host_and_prefix_select_first_match() {
        let r = router();
        assert_eq!(
            r.select(Some("api.example.com:8080"), "/api/x")
                .map(|r| r.upstream),
            Some(0)
        );
        assert_eq!(
            r.select(Some("api.example.com"), "/api")
                .map(|r| r.upstream),
            Some(0)
        );
        assert_eq!(
            r.select(Some("api.example.com"), "/apix")
                .map(|r| r.upstream),
            Some(1)
        );
        assert_eq!(
            r.select(Some("other"), "/api/x").map(|r| r.upstream),
            Some(1)
        );
        assert_eq!(r.select(None, "/api/x").map(|r| r.upstream), Some(1));
    }

    /// One route under `prefix` that rewrites it to `to`.
    fn rewriting(prefix: &str, to: &str) -> Router {
        let mut c = RouteConfig::new(prefix, "web");
        c.rewrite_prefix = Some(to.into());
        Router::new(&[c], |_| Some(0))
    }

    #[test]
    fn a_rewritten_prefix_replaces_the_matched_one() {
        let rewritten = |prefix: &str, to: &str, path: &'static str| {
            let r = rewriting(prefix, to);
            let route = r.select(None, path).expect("route matches");
            route
                .upstream_path(&PathAndQuery::from_static(path))
                .map(|p| p.as_str().to_owned())
        };
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(rewritten("/api", "/", "/api/users?x=1"), some("/users?x=1"));
        assert_eq!(rewritten("/api/", "/", "/api"), some("/"));
        assert_eq!(rewritten("/api", "/", "/api?x=1"), some("/?x=1"));
        assert_eq!(rewritten("/api", "/v2", "/api/users"), some("/v2/users"));
        assert_eq!(rewritten("/api", "/v2/", "/api"), some("/v2"));
        assert_eq!(rewritten("/api", "/v2", "/api?q"), some("/v2?q"));
        assert_eq!(rewritten("/", "/base", "/x/y"), some("/base/x/y"));
        assert_eq!(rewritten("/", "/", "/x"), some("/x"));
        assert_eq!(rewritten("/", "/base", "*"), None);
        let plain = Router::new(&[RouteConfig::new("/api", "web")], |_| Some(0));
        let route = plain.select(None, "/api/x").unwrap();
        assert!(
            route
                .upstream_path(&PathAndQuery::from_static("/api/x"))
                .is_none()
        );
    }

    #[test]
    fn a_redirect_under_the_rewritten_prefix_moves_back_under_the_routes() {
        let moved = |prefix: &str, to: &str, location: &'static str| {
            let r = rewriting(prefix, to);
            let route = r
                .select(None, if prefix == "/" { "/" } else { prefix })
                .unwrap();
            route
                .client_location(&HeaderValue::from_static(location))
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            moved("/api", "/", "/login?next=%2F"),
            some("/api/login?next=%2F")
        );
        assert_eq!(moved("/api", "/", "/"), some("/api/"));
        assert_eq!(moved("/api", "/v2", "/v2/items/3"), some("/api/items/3"));
        assert_eq!(moved("/api", "/v2", "/v2"), some("/api"));
        assert_eq!(moved("/api", "/v2", "/v2?x"), some("/api?x"));
        assert_eq!(moved("/", "/base", "/base/x"), some("/x"));
        assert_eq!(moved("/", "/base", "/base"), some("/"));
        // Not under the upstream's prefix, not a path, or another host: left alone.
        assert_eq!(moved("/api", "/v2", "/v20/x"), None);
        assert_eq!(moved("/api", "/v2", "/other"), None);
        assert_eq!(moved("/api", "/", "https://example.com/x"), None);
        assert_eq!(moved("/api", "/", "//example.com/x"), None);
        assert_eq!(moved("/api", "/", "relative/x"), None);
    }

    #[test]
    fn a_redirect_to_the_host_the_route_sends_stays_on_the_clients() {
        let mapped = |to: Option<&str>, location: &'static str| {
            let mut c = RouteConfig::new("/api", "web");
            c.rewrite_prefix = to.map(Into::into);
            c.request_headers
                .set
                .push(("host".into(), "App.Internal:8080".into()));
            let r = Router::new(&[c], |_| Some(0));
            let route = r.select(None, "/api").unwrap();
            assert!(route.maps_location());
            route
                .client_location(&HeaderValue::from_static(location))
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            mapped(None, "http://app.internal:8080/login?next=%2F"),
            some("/login?next=%2F")
        );
        assert_eq!(mapped(None, "HTTPS://APP.INTERNAL:8080"), some("/"));
        assert_eq!(mapped(None, "http://app.internal:8080#top"), None);
        // With the prefix rewritten, the path then moves back under the route's.
        assert_eq!(
            mapped(Some("/"), "http://app.internal:8080/login"),
            some("/api/login")
        );
        assert_eq!(
            mapped(Some("/v2"), "http://app.internal:8080/v2/x"),
            some("/api/x")
        );
        assert_eq!(
            mapped(Some("/v2"), "http://app.internal:8080/x"),
            some("/x")
        );
        assert_eq!(mapped(Some("/"), "/login"), some("/api/login"));
        // Other hosts, ports and schemes are left alone, and so are paths without a rewrite.
        assert_eq!(mapped(None, "http://app.internal/login"), None);
        assert_eq!(mapped(None, "http://app.internal:8080.evil/x"), None);
        assert_eq!(mapped(None, "http://other:8080/login"), None);
        assert_eq!(mapped(None, "ftp://app.internal:8080/x"), None);
        assert_eq!(mapped(None, "/login"), None);
        let plain = Router::new(&[RouteConfig::new("/api", "web")], |_| Some(0));
        assert!(!plain.select(None, "/api").unwrap().maps_location());
    }

    #[test]
    fn a_redirect_template_fills_in_the_request_and_bad_ones_are_refused() {
        let t = |to: &str| {
            RedirectTemplate::parse(&crate::config::Redirect::new(to)).map(|t| {
                let uri: http::Uri = "/a/b?c=1".parse().unwrap();
                let v = t.location(b"Example.test:8080", &uri).unwrap();
                v.to_str().unwrap().to_owned()
            })
        };
        assert_eq!(
            t("https://{host}{uri}").unwrap(),
            "https://Example.test/a/b?c=1"
        );
        assert_eq!(
            t("https://new.example{path}").unwrap(),
            "https://new.example/a/b"
        );
        assert_eq!(t("/static").unwrap(), "/static");
        assert_eq!(t("https://[{host}]x").unwrap(), "https://[Example.test]x");
        for bad in [
            "https://{hots}/",
            "https://{host",
            "https://host}/",
            "",
            "a\nb",
        ] {
            assert!(t(bad).is_err(), "{bad:?}");
        }
        let mut r = crate::config::Redirect::new("/x");
        r.status = 200;
        assert!(
            RedirectTemplate::parse(&r)
                .unwrap_err()
                .contains("not a redirect")
        );
        // An IPv6 host keeps its brackets.
        let t = RedirectTemplate::parse(&crate::config::Redirect::new("https://{host}/")).unwrap();
        let uri: http::Uri = "/".parse().unwrap();
        assert_eq!(t.location(b"[::1]:8443", &uri).unwrap(), "https://[::1]/");
    }

    #[test]
    fn routes_can_ask_for_methods_and_headers() {
        let mut canary = RouteConfig::new("/", "canary");
        canary.match_headers = vec![("x-canary".into(), "1".into())];
        let mut writes = RouteConfig::new("/", "writes");
        writes.methods = vec!["POST".into(), "PUT".into()];
        let mut traced = RouteConfig::new("/", "traced");
        traced.methods = vec!["GET".into()];
        traced.match_headers = vec![("traceparent".into(), "*".into())];
        let all = [canary, writes, traced, RouteConfig::new("/", "rest")];
        let r = Router::new(&all, |u| {
            ["canary", "writes", "traced", "rest"]
                .iter()
                .position(|n| *n == u)
        });
        let pick = |method: &str, headers: &[(&'static str, &'static str)]| {
            let mut h = http::HeaderMap::new();
            for (n, v) in headers {
                h.append(*n, HeaderValue::from_static(v));
            }
            let m = http::Method::from_bytes(method.as_bytes()).unwrap();
            r.select_host(None, "/x", Some((&m, &h)))
                .map(|r| r.upstream)
        };
        assert_eq!(pick("GET", &[("x-canary", "1")]), Some(0));
        assert_eq!(
            pick("POST", &[("x-canary", "0"), ("x-canary", "1")]),
            Some(0)
        );
        assert_eq!(pick("POST", &[("x-canary", "2")]), Some(1));
        assert_eq!(pick("GET", &[("traceparent", "00-ab")]), Some(2));
        assert_eq!(pick("HEAD", &[("traceparent", "00-ab")]), Some(3));
        assert_eq!(pick("GET", &[]), Some(3));
        // Without the request's method and headers, conditional routes do not match.
        assert_eq!(r.select(None, "/x").map(|r| r.upstream), Some(3));
        for (methods, headers) in [
            (vec!["get".to_owned()], vec![]),
            (vec!["G T".to_owned()], vec![]),
            (vec![], vec![("bad name".to_owned(), "1".to_owned())]),
            (vec![], vec![("x".to_owned(), "a\nb".to_owned())]),
        ] {
            assert!(
                check_condition(&methods, &headers).is_err(),
                "{methods:?} {headers:?}"
            );
        }
    }

    #[test]
    fn a_reload_keeps_a_routes_in_flight_count_and_unchanged_rate_limit() {
        use crate::config::RateLimit;
        use std::time::Duration;
        use tokio::time::Instant;
        let hourly = |requests| {
            Some(RateLimit {
                requests,
                per: Duration::from_secs(3600),
                burst: 0,
                queue: 0,
                key: None,
            })
        };
        let mut c = RouteConfig::new("/api", "web");
        c.max_in_flight = std::num::NonZeroUsize::new(2);
        c.rate_limit = hourly(1);
        let old = Router::new(std::slice::from_ref(&c), |_| Some(0));
        let _held = old.routes[0]
            .in_flight
            .as_ref()
            .unwrap()
            .try_acquire()
            .unwrap();
        let limiter = |r: &Router| r.routes[0].rate_limit.clone().unwrap();
        limiter(&old).check(7, Instant::now()).unwrap();

        // Lowered to one: the request still held fills it. Client 7 has used its allowance.
        c.max_in_flight = std::num::NonZeroUsize::new(1);
        let new = Router::reloaded(std::slice::from_ref(&c), Some(&old), |_| Some(0));
        assert!(
            new.routes[0]
                .in_flight
                .as_ref()
                .unwrap()
                .try_acquire()
                .is_none()
        );
        assert!(limiter(&new).check(7, Instant::now()).is_err());

        // A changed rate starts afresh; so does a route that is not the same one.
        c.rate_limit = hourly(2);
        let changed = Router::reloaded(std::slice::from_ref(&c), Some(&new), |_| Some(0));
        assert!(limiter(&changed).check(7, Instant::now()).is_ok());
        let mut other = c.clone();
        other.path_prefix = "/other".into();
        let moved = Router::reloaded(&[other], Some(&changed), |_| Some(0));
        assert!(
            moved.routes[0]
                .in_flight
                .as_ref()
                .unwrap()
                .try_acquire()
                .is_some()
        );
    }

    #[test]
    fn no_match_is_none() {
        let mut only = RouteConfig::new("/only", "web");
        only.hosts = vec!["a".into()];
        let r = Router::new(&[only], |_| Some(0));
        assert!(r.select(Some("a"), "/other").is_none());
        assert!(r.select(Some("[::1]:80"), "/only").is_none());
    }
}
