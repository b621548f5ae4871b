use std::path::Path;

use super::*;

const GOOD: &str = r#"
workers = 2

[admin]
address = "127.0.0.1:9901"

[[listeners]]
address = "127.0.0.1:8080"
protocols = ["http1", "h2c"]

  [[listeners.routes]]
  host = "api.example.com"
  path_prefix = "/api"
  upstream = "app"
  timeout = "30s"
  first_byte_timeout = "off"
  client_half_close = "continue"

  [[listeners.routes]]
  upstream = "app"
  name = "fallback"
  max_retries = 0

[[upstreams]]
name = "app"
addresses = ["127.0.0.1:9000", "[::1]:9000", "app.internal:80"]
protocol = "h2c"
idle_timeout = "2s"
"#;

fn err(src: &str) -> Located {
    match parse(src, Path::new(".")) {
        Ok(_) => panic!("config was accepted"),
        Err(e) => e,
    }
}

/// Asserts that `src` is refused at `key` with a message containing `why`.
fn refused(src: &str, key: &str, why: &str) {
    let e = err(src);
    assert_eq!(e.key, key, "{e:?}");
    assert!(e.message.contains(why), "{e:?}");
}

#[test]
fn good_config_converts() {
    let l = parse(GOOD, Path::new(".")).unwrap();
    let c = &l.config;
    assert_eq!(c.workers.map(|w| w.get()), Some(2));
    assert_eq!(l.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    let r = &c.listeners[0].routes;
    assert_eq!(r[0].timeouts.total, Some(Duration::from_secs(30)));
    assert_eq!(r[0].timeouts.first_byte, None);
    assert_eq!(r[0].client_half_close, HalfClose::Continue);
    assert_eq!(r[0].name, "app");
    assert_eq!(r[0].hosts, ["api.example.com"]);
    assert!(r[1].hosts.is_empty());
    assert_eq!(r[1].name, "fallback");
    assert_eq!(r[1].path_prefix, "/");
    assert_eq!(r[0].max_retries, 2);
    assert_eq!(r[1].max_retries, 0);
    assert!(c.listeners[0].trusted_peers.is_empty());
    let u = &c.upstreams[0];
    assert_eq!(u.protocol, UpstreamProtocol::H2c);
    assert_eq!(u.addresses[1].host, "::1");
    assert_eq!(u.addresses[2].to_string(), "app.internal:80");
    assert_eq!(u.idle_timeout, Duration::from_secs(2));
}

#[test]
fn unknown_key_names_key_and_line() {
    let src = GOOD.replace(
        "  name = \"fallback\"",
        "  name = \"fallback\"\n  retries = 3",
    );
    let e = err(&src);
    assert_eq!(e.key, "listeners[0].routes[1].retries", "{e:?}");
    assert_eq!(e.line, 22, "{e:?}");
    assert!(e.message.contains("unknown field"), "{e:?}");
}

#[test]
fn unknown_top_level_table() {
    let e = err("[metrics]\nport = 1\n");
    assert_eq!(e.key, "metrics", "{e:?}");
    assert_eq!(e.line, 1, "{e:?}");
}

#[test]
fn bad_duration_names_key_and_line() {
    let src = GOOD.replace("timeout = \"30s\"", "timeout = \"30 seconds\"");
    let e = err(&src);
    assert_eq!(e.key, "listeners[0].routes[0].timeout", "{e:?}");
    assert_eq!(e.line, 15, "{e:?}");
}

#[test]
fn wrong_type_names_key_and_line() {
    let src = GOOD.replace("timeout = \"30s\"", "timeout = 30");
    let e = err(&src);
    assert_eq!(e.key, "listeners[0].routes[0].timeout", "{e:?}");
    assert_eq!(e.line, 15, "{e:?}");
}

#[test]
fn bad_enum_value_names_key_and_line() {
    let src = GOOD.replace("protocol = \"h2c\"", "protocol = \"spdy\"");
    let e = err(&src);
    assert_eq!(e.key, "upstreams[0].protocol", "{e:?}");
    assert_eq!(e.line, 27, "{e:?}");
}

#[test]
fn missing_field_names_key() {
    let src = GOOD.replace("  upstream = \"app\"\n  name", "  name");
    let e = err(&src);
    assert_eq!(e.key, "listeners[0].routes[1].upstream", "{e:?}");
    assert!(e.message.contains("missing field"), "{e:?}");
}

#[test]
fn validation_error_maps_to_line() {
    let src = GOOD.replace(
        "  upstream = \"app\"\n  name",
        "  upstream = \"nope\"\n  name",
    );
    let e = err(&src);
    assert_eq!(e.key, "listeners[0].routes[1].upstream", "{e:?}");
    assert_eq!(e.line, 20, "{e:?}");
    assert!(e.message.contains("nope"), "{e:?}");
}

#[test]
fn validation_error_without_key_in_file_uses_ancestor() {
    let e = err("[[listeners]]\naddress = \"127.0.0.1:0\"\n");
    assert_eq!(e.key, "listeners[0].routes", "{e:?}");
    assert_eq!(e.line, 1, "{e:?}");
    let e = err("workers = 1\n");
    assert_eq!(e.key, "listeners", "{e:?}");
    assert_eq!(e.line, 1, "{e:?}");
}

#[test]
fn syntax_error_has_line() {
    let e = err("workers = 1\n\n[[listeners]\naddress = 1\n");
    assert_eq!(e.line, 3, "{e:?}");
    assert!(!e.message.contains('\n'));
}

#[test]
fn protocol_mismatch_with_cleartext() {
    let src = GOOD.replace(
        "protocols = [\"http1\", \"h2c\"]",
        "protocols = [\"http1\", \"h2\"]",
    );
    let e = err(&src);
    assert_eq!(e.key, "listeners[0].protocols[1]", "{e:?}");
    assert_eq!(e.line, 9, "{e:?}");
}

#[test]
fn bad_upstream_address() {
    for bad in ["127.0.0.1", "::1:80", "[::1]80", "host:0", ":80", "h:99999"] {
        let src = GOOD.replace("\"app.internal:80\"", &format!("{bad:?}"));
        let e = err(&src);
        assert_eq!(e.key, "upstreams[0].addresses[2]", "{bad}: {e:?}");
        assert_eq!(e.line, 26, "{bad}: {e:?}");
    }
}

#[test]
fn missing_cert_file_names_key() {
    let src = GOOD.replace(
        "protocols = [\"http1\", \"h2c\"]",
        "tls = { cert = \"/nonexistent/cert.pem\", key = \"/nonexistent/key.pem\" }",
    );
    let e = err(&src);
    assert_eq!(e.key, "listeners[0].tls.cert", "{e:?}");
    assert_eq!(e.line, 9, "{e:?}");
}

#[test]
fn zero_timeout_suggests_off() {
    let src = GOOD.replace("timeout = \"30s\"", "timeout = \"0s\"");
    let e = err(&src);
    assert!(e.message.contains("\"off\""), "{e:?}");
}

#[test]
fn split_and_render_round_trip() {
    for k in [
        "listeners[0].routes[1].upstream",
        "admin.address",
        "upstreams[3]",
    ] {
        assert_eq!(render(&split_key(k)), k);
    }
}

#[test]
fn line_of_offsets() {
    let idx = SpanIndex::build("a = 1\nb = 2\n");
    assert_eq!(idx.line_of(0), 1);
    assert_eq!(idx.line_of(5), 1);
    assert_eq!(idx.line_of(6), 2);
    assert_eq!(idx.line_of_key("b"), 2);
    assert_eq!(idx.line_of_key("missing.x"), 1);
}

#[test]
fn trusted_peers_parse_and_name_bad_entries() {
    let src = GOOD.replace(
        "protocols = [\"http1\", \"h2c\"]",
        "protocols = [\"http1\", \"h2c\"]\ntrusted_peers = [\"10.0.0.0/8\", \"::1\"]",
    );
    let l = parse(&src, Path::new(".")).unwrap();
    let peers = &l.config.listeners[0].trusted_peers;
    assert_eq!(peers.len(), 2);
    assert!(peers[0].contains("10.9.8.7".parse().unwrap()));
    let e = err(&src.replace("\"::1\"", "\"10.0.0.0/40\""));
    assert_eq!(e.key, "listeners[0].trusted_peers[1]", "{e:?}");
    assert_eq!(e.line, 10, "{e:?}");
}

const HARDENED: &str = r#"
[[listeners]]
address = "127.0.0.1:8080"

  [listeners.dead_peer]
  arm_after = "500ms"
  keepalive_idle = "2s"
  keepalive_probes = 3
  write_timeout = "off"
  h2_ping_interval = "5s"

  [listeners.limits]
  max_connections = 100
  backlog = 64
  max_body_bytes = 1048576
  header_read_timeout = "5s"
  park_idle_after = "2s"
  h2_reset_burst = 0

  [[listeners.routes]]
  upstream = "app"
  max_in_flight = 10

[[upstreams]]
name = "app"
addresses = ["127.0.0.1:9000"]
"#;

#[test]
fn dead_peer_and_limits_convert() {
    let l = parse(HARDENED, Path::new(".")).unwrap();
    let lc = &l.config.listeners[0];
    assert_eq!(lc.dead_peer.arm_after, Duration::from_millis(500));
    let ka = lc.dead_peer.tcp_keepalive.unwrap();
    assert_eq!(ka.idle, Duration::from_secs(2));
    assert_eq!(ka.interval, Duration::from_secs(1));
    assert_eq!(ka.probes, 3);
    assert_eq!(lc.dead_peer.write_timeout, None);
    assert_eq!(lc.dead_peer.h2_ping_interval, Some(Duration::from_secs(5)));
    assert_eq!(lc.limits.max_connections.map(|n| n.get()), Some(100));
    assert_eq!(lc.limits.backlog, 64);
    assert_eq!(lc.limits.max_body_bytes, Some(1 << 20));
    assert_eq!(lc.limits.header_read_timeout, Duration::from_secs(5));
    assert_eq!(lc.limits.park_idle_after, Some(Duration::from_secs(2)));
    assert_eq!(lc.limits.h2_reset_budget, None);
    assert_eq!(lc.routes[0].max_in_flight.map(|n| n.get()), Some(10));
}

#[test]
fn park_idle_after_off_default_and_too_short() {
    let off = HARDENED.replace("park_idle_after = \"2s\"", "park_idle_after = \"off\"");
    let l = parse(&off, Path::new(".")).unwrap();
    assert_eq!(l.config.listeners[0].limits.park_idle_after, None);
    let default = HARDENED.replace("  park_idle_after = \"2s\"\n", "");
    let l = parse(&default, Path::new(".")).unwrap();
    assert_eq!(
        l.config.listeners[0].limits.park_idle_after,
        Some(tether_gateway::downstream::h1::PARK_AFTER)
    );
    // Checked by the gateway's validation, and still placed on its line in the file.
    let short = HARDENED.replace("park_idle_after = \"2s\"", "park_idle_after = \"20ms\"");
    let e = err(&short);
    assert_eq!(e.key, "listeners[0].limits.park_idle_after");
    assert_eq!(e.line, 17, "{e:?}");
    assert!(e.message.contains("100ms"), "{e:?}");
}

#[test]
fn client_connection_lifetimes_convert_and_bad_ones_name_their_key() {
    let with = |v: &str| {
        HARDENED.replace(
            "  h2_reset_burst = 0\n",
            &format!("  h2_reset_burst = 0\n  {v}\n"),
        )
    };
    let l = parse(HARDENED, Path::new(".")).unwrap();
    let limits = l.config.listeners[0].limits;
    assert_eq!(
        (
            limits.max_requests_per_connection,
            limits.max_connection_age
        ),
        (None, None)
    );
    let l = parse(
        &with("max_requests_per_connection = 1000\n  max_connection_age = \"1h\""),
        Path::new("."),
    )
    .unwrap();
    let limits = l.config.listeners[0].limits;
    assert_eq!(
        (
            limits.max_requests_per_connection,
            limits.max_connection_age
        ),
        (
            std::num::NonZeroU32::new(1000),
            Some(Duration::from_secs(3600))
        )
    );
    for (bad, key, why) in [
        (
            "max_requests_per_connection = 0",
            "max_requests_per_connection",
            "at least 1",
        ),
        (
            "max_connection_age = \"0s\"",
            "max_connection_age",
            "greater than zero",
        ),
        ("max_connection_age = \"a while\"", "max_connection_age", ""),
    ] {
        let e = err(&with(bad));
        assert_eq!(e.key, format!("listeners[0].limits.{key}"), "{e:?}");
        assert!(e.message.contains(why), "{e:?}");
    }
}

#[test]
fn sub_second_keepalive_is_refused_with_its_key() {
    let src = HARDENED.replace("keepalive_idle = \"2s\"", "keepalive_idle = \"500ms\"");
    let e = err(&src);
    assert_eq!(e.key, "listeners[0].dead_peer.keepalive_idle");
}

#[test]
fn header_rules_convert_and_bad_ones_name_their_key_and_line() {
    let src = GOOD.replace(
        "  name = \"fallback\"\n",
        "  name = \"fallback\"\n  request_headers = { remove = [\"Forwarded\"], set = { host = \"app.internal\", x-env = \"prod\" } }\n  response_headers = { add = { via = \"1.1 tether\" } }\n",
    );
    let cfg = parse(&src, Path::new(".")).unwrap();
    let r = &cfg.config.listeners[0].routes[1];
    assert_eq!(r.request_headers.remove, ["Forwarded"]);
    assert_eq!(
        r.request_headers.set,
        [
            ("host".to_owned(), "app.internal".to_owned()),
            ("x-env".to_owned(), "prod".to_owned())
        ]
    );
    assert_eq!(
        r.response_headers.add,
        [("via".to_owned(), "1.1 tether".to_owned())]
    );
    assert!(cfg.config.listeners[0].routes[0].request_headers.is_empty());

    let bad = GOOD.replace(
        "  name = \"fallback\"\n",
        "  name = \"fallback\"\n  response_headers = { set = { transfer-encoding = \"chunked\" } }\n",
    );
    let e = err(&bad);
    assert_eq!(e.key, "listeners[0].routes[1].response_headers", "{e:?}");
    assert_eq!(e.line, 22, "{e:?}");
    assert!(e.message.contains("transfer-encoding"), "{e:?}");
    let bad = GOOD.replace(
        "  name = \"fallback\"\n",
        "  name = \"fallback\"\n  request_headers = { sett = {} }\n",
    );
    assert!(err(&bad).message.contains("unknown field"));
}

#[test]
fn rewrite_prefix_converts_and_a_bad_one_names_its_key() {
    let src = GOOD.replace(
        "  path_prefix = \"/api\"\n",
        "  path_prefix = \"/api\"\n  rewrite_prefix = \"/\"\n",
    );
    let cfg = parse(&src, Path::new(".")).unwrap();
    assert_eq!(
        cfg.config.listeners[0].routes[0].rewrite_prefix.as_deref(),
        Some("/")
    );
    assert_eq!(cfg.config.listeners[0].routes[1].rewrite_prefix, None);
    for bad in ["v2", "/v2?x=1", "/a b"] {
        let src = GOOD.replace(
            "  path_prefix = \"/api\"\n",
            &format!("  path_prefix = \"/api\"\n  rewrite_prefix = {bad:?}\n"),
        );
        let e = err(&src);
        assert_eq!(
            e.key, "listeners[0].routes[0].rewrite_prefix",
            "{bad}: {e:?}"
        );
        assert!(e.message.contains("must be a path"), "{bad}: {e:?}");
    }
}

#[test]
fn mirror_converts_with_defaults_and_bad_ones_name_their_key() {
    let with = |m: &str| {
        GOOD.replace(
            "  path_prefix = \"/api\"\n",
            &format!("  path_prefix = \"/api\"\n  mirror = {m}\n"),
        )
    };
    let cfg = parse(&with("{ upstream = \"app\" }"), Path::new(".")).unwrap();
    let m = cfg.config.listeners[0].routes[0].mirror.clone().unwrap();
    assert_eq!(
        (m.upstream.as_str(), m.per_million, m.max_in_flight),
        ("app", 1_000_000, 100)
    );
    let cfg = parse(
        &with("{ upstream = \"app\", share = 0.25, max_in_flight = 7 }"),
        Path::new("."),
    )
    .unwrap();
    let m = cfg.config.listeners[0].routes[0].mirror.clone().unwrap();
    assert_eq!((m.per_million, m.max_in_flight), (250_000, 7));
    let route = "listeners[0].routes[0].mirror";
    refused(
        &with("{ upstream = \"nope\" }"),
        &format!("{route}.upstream"),
        "no upstream named",
    );
    refused(
        &with("{ upstream = \"app\", share = 2.0 }"),
        &format!("{route}.share"),
        "not a share",
    );
    refused(
        &with("{ upstream = \"app\", shar = 1 }"),
        &format!("{route}.shar"),
        "unknown field",
    );
}

#[test]
fn auth_converts_with_defaults_and_bad_ones_name_their_key() {
    let with = |a: &str| {
        GOOD.replace(
            "  path_prefix = \"/api\"\n",
            &format!("  path_prefix = \"/api\"\n  auth = {a}\n"),
        )
    };
    let cfg = parse(
        &with("{ upstream = \"app\", path = \"/verify\" }"),
        Path::new("."),
    )
    .unwrap();
    let a = cfg.config.listeners[0].routes[0].auth.clone().unwrap();
    assert_eq!(
        (a.upstream.as_str(), a.path.as_str(), a.timeout),
        ("app", "/verify", Duration::from_secs(5))
    );
    assert!(a.copy_headers.is_empty());
    let cfg = parse(
        &with("{ upstream = \"app\", path = \"/v\", copy_headers = [\"x-user\"], client_headers = [\"Set-Cookie\"], timeout = \"250ms\" }"),
        Path::new("."),
    )
    .unwrap();
    let a = cfg.config.listeners[0].routes[0].auth.clone().unwrap();
    assert_eq!(
        (a.copy_headers, a.client_headers, a.timeout),
        (
            vec!["x-user".to_owned()],
            vec!["Set-Cookie".to_owned()],
            Duration::from_millis(250)
        )
    );
    let route = "listeners[0].routes[0].auth";
    refused(
        &with("{ upstream = \"app\" }"),
        &format!("{route}.path"),
        "missing field `path`",
    );
    refused(
        &with("{ upstream = \"app\", path = \"/v\", timeout = \"soon\" }"),
        &format!("{route}.timeout"),
        "",
    );
    refused(
        &with("{ upstream = \"app\", path = \"/v\", copy_headers = [\"host\"] }"),
        &format!("{route}.copy_headers"),
        "describes the message",
    );
}

#[test]
fn request_buffer_dir_is_a_directory_and_lets_bodies_past_memory() {
    let dir = tempfile::tempdir().unwrap();
    let with = |v: &str| {
        GOOD.replace(
            "  path_prefix = \"/api\"\n",
            &format!("  path_prefix = \"/api\"\n{v}\n"),
        )
    };
    let src = with(&format!(
        "  request_buffer_bytes = 1073741824\n  request_buffer_dir = {:?}",
        dir.path().display().to_string()
    ));
    let cfg = parse(&src, Path::new(".")).unwrap();
    let r = &cfg.config.listeners[0].routes[0];
    assert_eq!(r.request_buffer_bytes, 1 << 30);
    assert_eq!(r.request_buffer_dir.as_deref(), Some(dir.path()));
    // Relative to the configuration's directory.
    let cfg = parse(
        &with("  request_buffer_bytes = 1073741824\n  request_buffer_dir = \".\""),
        dir.path(),
    )
    .unwrap();
    assert_eq!(
        cfg.config.listeners[0].routes[0]
            .request_buffer_dir
            .as_deref(),
        Some(dir.path().join(".").as_path())
    );
    refused(
        &with(
            "  request_buffer_bytes = 1073741824\n  request_buffer_dir = \"/nonexistent/bodies\"",
        ),
        "listeners[0].routes[0].request_buffer_dir",
        "is not a directory",
    );
    refused(
        &with("  request_buffer_bytes = 1073741824"),
        "listeners[0].routes[0].request_buffer_bytes",
        "request_buffer_dir",
    );
    refused(
        &src.replace("1073741824", "5000000000"),
        "listeners[0].routes[0].request_buffer_bytes",
        "4 GiB",
    );
    refused(
        &src.replace("request_buffer_bytes = 1073741824\n", ""),
        "listeners[0].routes[0].request_buffer_dir",
        "reads none",
    );
}

#[test]
fn response_buffer_bytes_converts_and_is_held_to_memory() {
    let src = GOOD.replace(
        "  path_prefix = \"/api\"\n",
        "  path_prefix = \"/api\"\n  response_buffer_bytes = 262144\n",
    );
    let cfg = parse(&src, Path::new(".")).unwrap();
    assert_eq!(
        cfg.config.listeners[0].routes[0].response_buffer_bytes,
        256 * 1024
    );
    assert_eq!(cfg.config.listeners[0].routes[1].response_buffer_bytes, 0);
    refused(
        &src.replace("262144", "16777217"),
        "listeners[0].routes[0].response_buffer_bytes",
        "held in memory",
    );
}

#[test]
fn a_route_host_is_one_or_a_list_and_each_is_checked() {
    let with = |h: &str| GOOD.replace("  host = \"api.example.com\"", &format!("  host = {h}"));
    let cfg = parse(
        &with("[\"example.com\", \"*.example.com\"]"),
        Path::new("."),
    )
    .unwrap();
    assert_eq!(
        cfg.config.listeners[0].routes[0].hosts,
        ["example.com", "*.example.com"]
    );
    refused(
        &with("\"\""),
        "listeners[0].routes[0].host",
        "must not be empty",
    );
    refused(
        &with("[]"),
        "listeners[0].routes[0].host",
        "must not be empty",
    );
    refused(
        &with("[\"example.com\", \"a:80\"]"),
        "listeners[0].routes[0].host",
        "not a host name",
    );
}

#[test]
fn request_buffer_bytes_converts() {
    let src = GOOD.replace(
        "  path_prefix = \"/api\"\n",
        "  path_prefix = \"/api\"\n  request_buffer_bytes = 1048576\n",
    );
    let cfg = parse(&src, Path::new(".")).unwrap();
    assert_eq!(
        cfg.config.listeners[0].routes[0].request_buffer_bytes,
        1 << 20
    );
    assert_eq!(cfg.config.listeners[0].routes[1].request_buffer_bytes, 0);
    refused(
        &src.replace("1048576", "16777217"),
        "listeners[0].routes[0].request_buffer_bytes",
        "16 MiB",
    );
}

#[test]
fn path_and_path_regex_convert_and_bad_ones_name_their_key() {
    let with = |keys: &str| GOOD.replace("  path_prefix = \"/api\"\n", keys);
    let cfg = parse(
        &with("  path_regex = '/u/([0-9]+)'\n  rewrite_path = '/users/$1'\n"),
        Path::new("."),
    )
    .unwrap();
    let r = &cfg.config.listeners[0].routes[0];
    assert_eq!(r.path_regex.as_deref(), Some("/u/([0-9]+)"));
    assert_eq!(r.rewrite_path.as_deref(), Some("/users/$1"));
    assert_eq!(r.path_prefix, "/");
    let cfg = parse(&with("  path = \"/status\"\n"), Path::new(".")).unwrap();
    assert_eq!(
        cfg.config.listeners[0].routes[0].path_exact.as_deref(),
        Some("/status")
    );
    let route = "listeners[0].routes[0]";
    for (keys, key, why) in [
        (
            "  path_prefix = \"/api\"\n  path = \"/status\"\n",
            "path_prefix",
            "one of them",
        ),
        (
            "  path_regex = '/('\n",
            "path_regex",
            "not a regular expression",
        ),
        (
            "  path_regex = '/u/([0-9]+)'\n  rewrite_path = '/users/$2'\n",
            "rewrite_path",
            "no such group",
        ),
        (
            "  path_prefix = \"/api\"\n  rewrite_path = \"/v2\"\n",
            "rewrite_path",
            "use rewrite_prefix",
        ),
    ] {
        refused(&with(keys), &format!("{route}.{key}"), why);
    }
}

#[test]
fn health_checks_convert_with_defaults_and_bad_ones_name_their_key() {
    let src = GOOD.replace(
        "idle_timeout = \"2s\"\n",
        "idle_timeout = \"2s\"\nhealth_check = { path = \"/healthz\", interval = \"1s\", unhealthy_after = 3 }\n",
    );
    let cfg = parse(&src, Path::new(".")).unwrap();
    let h = cfg.config.upstreams[0].health_check.clone().unwrap();
    assert_eq!(h.path, "/healthz");
    assert_eq!(h.interval, Duration::from_secs(1));
    assert_eq!(h.timeout, Duration::from_secs(2));
    assert_eq!((h.unhealthy_after, h.healthy_after), (3, 2));
    assert!(h.expect_status.is_empty() && h.expect_body.is_none() && h.headers.is_empty());

    let src = GOOD.replace(
        "idle_timeout = \"2s\"\n",
        "idle_timeout = \"2s\"\nhealth_check = { path = \"/ready\", expect_status = [204, \"3xx\"], expect_body = \"ok\", headers = { host = \"app.internal\", authorization = \"Bearer t\" } }\n",
    );
    let h = parse(&src, Path::new(".")).unwrap().config.upstreams[0]
        .health_check
        .clone()
        .unwrap();
    assert_eq!(h.expect_status, [204..=204, 300..=399]);
    assert_eq!(h.expect_body.as_deref(), Some("ok"));
    assert_eq!(
        h.headers,
        [
            ("authorization".to_owned(), "Bearer t".to_owned()),
            ("host".to_owned(), "app.internal".to_owned())
        ]
    );
    for (bad, key, why) in [
        (
            "path = \"/h\", expect_status = [200, 99]",
            "upstreams[0].health_check.expect_status[1]",
            "99 is not a status",
        ),
        (
            "path = \"/h\", expect_status = [\"6xx\"]",
            "upstreams[0].health_check.expect_status[0]",
            "\"6xx\" is not a status",
        ),
        (
            "path = \"/h\", expect_status = [2.5]",
            "upstreams[0].health_check.expect_status[0]",
            "a status (200) or a class",
        ),
        (
            "path = \"/h\", expect_body = \"\"",
            "upstreams[0].health_check.expect_body",
            "must not be empty",
        ),
        (
            "path = \"/h\", headers = { connection = \"close\" }",
            "upstreams[0].health_check.headers",
            "describes the connection",
        ),
        (
            "path = \"/h\", headers = { host = \"a b\" }",
            "upstreams[0].health_check.headers",
            "is not a host",
        ),
        (
            "path = \"healthz\"",
            "upstreams[0].health_check.path",
            "must be a path",
        ),
        (
            "path = \"/h\", interval = \"0s\"",
            "upstreams[0].health_check.interval",
            "greater than zero",
        ),
        (
            "path = \"/h\", healthy_after = 0",
            "upstreams[0].health_check.healthy_after",
            "at least 1",
        ),
        (
            "interval = \"1s\"",
            "upstreams[0].health_check.path",
            "required: the path to GET, or grpc_service",
        ),
        (
            "path = \"/h\", grpc_service = \"\"",
            "upstreams[0].health_check.grpc_service",
            "give path or grpc_service",
        ),
        (
            "grpc_service = \"\", expect_body = \"ok\"",
            "upstreams[0].health_check.expect_body",
            "not used by a gRPC health check",
        ),
        (
            "grpc_service = \"\", expect_status = [200]",
            "upstreams[0].health_check.expect_status",
            "not used by a gRPC health check",
        ),
    ] {
        let src = GOOD.replace(
            "idle_timeout = \"2s\"\n",
            &format!("idle_timeout = \"2s\"\nhealth_check = {{ {bad} }}\n"),
        );
        let e = err(&src);
        assert_eq!(e.key, key, "{bad}: {e:?}");
        assert!(e.message.contains(why), "{bad}: {e:?}");
    }
}

#[test]
fn a_grpc_health_check_converts_and_needs_http2() {
    let with = |protocol: &str| {
        GOOD.replace(
            "protocol = \"h2c\"\nidle_timeout = \"2s\"\n",
            &format!(
                "protocol = \"{protocol}\"\nidle_timeout = \"2s\"\nhealth_check = {{ grpc_service = \"app.Users\", interval = \"1s\" }}\n"
            ),
        )
    };
    let h = parse(&with("h2c"), Path::new("."))
        .unwrap()
        .config
        .upstreams[0]
        .health_check
        .clone()
        .unwrap();
    assert_eq!(h.grpc.as_deref(), Some("app.Users"));
    assert_eq!(h.path, "/grpc.health.v1.Health/Check");
    assert_eq!(h.interval, Duration::from_secs(1));
    refused(
        &with("http1"),
        "upstreams[0].health_check.grpc_service",
        "only with protocol = \"h2\" or \"h2c\"",
    );
}

#[test]
fn slow_start_converts_and_bad_ones_name_their_key() {
    let with = |v: &str| {
        GOOD.replace(
            "protocol = \"h2c\"\n",
            &format!("protocol = \"h2c\"\nslow_start = {v}\n"),
        )
    };
    let cfg = parse(&with("\"30s\""), Path::new(".")).unwrap();
    assert_eq!(
        cfg.config.upstreams[0].slow_start,
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        parse(GOOD, Path::new(".")).unwrap().config.upstreams[0].slow_start,
        None
    );
    refused(&with("\"0s\""), "upstreams[0].slow_start", "from 1ms to 1h");
    refused(&with("\"2h\""), "upstreams[0].slow_start", "from 1ms to 1h");
    refused(&with("\"soon\""), "upstreams[0].slow_start", "");
}

#[test]
fn backup_addresses_convert_and_bad_ones_name_their_key() {
    let cfg = parse(GOOD, Path::new(".")).unwrap();
    assert!(cfg.config.upstreams[0].backups.is_empty());
    let src = GOOD.replace(
        "\"app.internal:80\"",
        "{ address = \"app.internal:80\", backup = true }",
    );
    let cfg = parse(&src, Path::new(".")).unwrap();
    let u = &cfg.config.upstreams[0];
    assert_eq!(u.backups, [false, false, true]);
    assert!(u.weights.is_empty(), "a backup alone sets no weight");

    let e = err(&GOOD.replace(
        "\"app.internal:80\"",
        "{ address = \"app.internal:80\", backup = \"yes\" }",
    ));
    assert_eq!(e.key, "upstreams[0].addresses[2].backup", "{e:?}");
    let every = GOOD.replace(
        "[\"127.0.0.1:9000\", \"[::1]:9000\", \"app.internal:80\"]",
        "[{ address = \"127.0.0.1:9000\", backup = true }]",
    );
    refused(
        &every,
        "upstreams[0].addresses",
        "every address is a backup",
    );
    let hashed = src.replace(
        "protocol = \"h2c\"\n",
        "protocol = \"h2c\"\nbalance = \"hash\"\n",
    );
    refused(&hashed, "upstreams[0].balance", "no use for backups");
}

#[test]
fn balance_and_weights_convert_and_bad_ones_name_their_key() {
    let cfg = parse(GOOD, Path::new(".")).unwrap();
    let u = &cfg.config.upstreams[0];
    assert_eq!(u.balance, Balance::RoundRobin);
    assert!(u.weights.is_empty());

    let src = GOOD
        .replace("\"[::1]:9000\"", "{ address = \"[::1]:9000\", weight = 5 }")
        .replace(
            "protocol = \"h2c\"\n",
            "protocol = \"h2c\"\nbalance = \"least_requests\"\n",
        );
    let cfg = parse(&src, Path::new(".")).unwrap();
    let u = &cfg.config.upstreams[0];
    assert_eq!(u.balance, Balance::LeastRequests);
    assert_eq!(u.weights, [1, 5, 1]);
    assert_eq!(u.addresses[1].to_string(), "[::1]:9000");

    for (bad, key, why) in [
        (
            "{ address = \"[::1]:9000\", weight = 0 }",
            "upstreams[0].addresses[1].weight",
            "from 1 to 100",
        ),
        (
            "{ address = \"[::1]:9000\", weight = 101 }",
            "upstreams[0].addresses[1].weight",
            "from 1 to 100",
        ),
        (
            "{ address = \"[::1]:9000\", wieght = 2 }",
            "upstreams[0].addresses[1].wieght",
            "unknown field `wieght`",
        ),
        (
            "{ weight = 2 }",
            "upstreams[0].addresses[1].address",
            "missing field `address`",
        ),
        ("7", "upstreams[0].addresses[1]", "\"host:port\" or"),
        (
            "{ address = \"[::1]\", weight = 2 }",
            "upstreams[0].addresses[1]",
            "",
        ),
    ] {
        let e = err(&GOOD.replace("\"[::1]:9000\"", bad));
        assert_eq!(e.key, key, "{bad}: {e:?}");
        assert!(e.message.contains(why), "{bad}: {e:?}");
        assert_eq!(e.line, 26, "{bad}: {e:?}");
    }
    let e = err(&GOOD.replace(
        "protocol = \"h2c\"\n",
        "protocol = \"h2c\"\nbalance = \"fastest\"\n",
    ));
    assert_eq!(e.key, "upstreams[0].balance", "{e:?}");
    assert!(e.message.contains("least_requests"), "{e:?}");
}

#[test]
fn rate_limits_convert_with_defaults_and_bad_ones_name_their_key() {
    let with = |rl: &str| {
        GOOD.replace(
            "  max_retries = 0\n",
            &format!("  max_retries = 0\n  rate_limit = {{ {rl} }}\n"),
        )
    };
    let limit = |settings: &str| {
        let cfg = parse(&with(settings), Path::new(".")).unwrap();
        cfg.config.listeners[0].routes[1].rate_limit.clone()
    };
    assert_eq!(
        limit("requests = 100"),
        Some(RateLimit {
            requests: 100,
            per: Duration::from_secs(1),
            burst: 0,
            queue: 0,
            key: None,
        })
    );
    let rl = limit("requests = 5, per = \"1m\", burst = 10").unwrap();
    assert_eq!((rl.per, rl.burst), (Duration::from_secs(60), 10));
    let rl = limit("requests = 5, burst = 1, queue = 20").unwrap();
    assert_eq!((rl.burst, rl.queue), (1, 20));
    let rl = limit("requests = 5, key = \"header:X-Api-Key\"").unwrap();
    assert_eq!(rl.key, Some(HashKey::Header("x-api-key".into())));
    for (bad, key, why) in [
        (
            "requests = 1, key = \"api-key\"",
            "rate_limit.key",
            "is not one of",
        ),
        (
            "requests = 1, key = \"header:a b\"",
            "rate_limit.key",
            "not a header name",
        ),
        ("requests = 0", "rate_limit.requests", "at least 1"),
        (
            "requests = 1, queue = 1000001",
            "rate_limit.queue",
            "at most",
        ),
        ("requests = 1, queue = -1", "rate_limit.queue", ""),
        (
            "requests = 1, per = \"0s\"",
            "rate_limit.per",
            "greater than zero",
        ),
        ("requests = 1, per = \"2d\"", "rate_limit.per", ""),
        (
            "requests = 1, per = \"25h\"",
            "rate_limit.per",
            "at most 24h",
        ),
        (
            "requests = 1, burst = 2000000",
            "rate_limit.burst",
            "at most",
        ),
        ("per = \"1s\"", "rate_limit.requests", "missing field"),
        ("requests = 1, rate = 2", "rate_limit.rate", "unknown field"),
    ] {
        refused(&with(bad), &format!("listeners[0].routes[1].{key}"), why);
    }
}

#[test]
fn redirect_routes_convert_and_bad_ones_name_their_key() {
    let with = |route: &str| {
        GOOD.replace(
            "  [[listeners.routes]]\n  upstream = \"app\"\n  name = \"fallback\"\n",
            &format!("  [[listeners.routes]]\n{route}\n  name = \"fallback\"\n"),
        )
    };
    let cfg = parse(
        &with("  redirect = { to = \"https://{host}{uri}\" }"),
        Path::new("."),
    )
    .unwrap();
    let r = &cfg.config.listeners[0].routes[1];
    assert_eq!(r.redirect, Some(Redirect::new("https://{host}{uri}")));
    assert_eq!((r.upstream.as_str(), r.name.as_str()), ("", "fallback"));
    let cfg = parse(
        &with("  redirect = { to = \"/new\", status = 302 }")
            .replace("  name = \"fallback\"\n", ""),
        Path::new("."),
    )
    .unwrap();
    let r = &cfg.config.listeners[0].routes[1];
    assert_eq!(r.redirect.as_ref().map(|r| r.status), Some(302));
    assert_eq!(r.name, "redirect");
    for (route, key, why) in [
        (
            "  upstream = \"app\"\n  redirect = { to = \"/x\" }",
            "redirect",
            "not both",
        ),
        ("  timeout = \"1s\"", "upstream", "missing field"),
        (
            "  redirect = { to = \"/x\", status = 200 }",
            "redirect",
            "not a redirect",
        ),
        (
            "  redirect = { to = \"https://{hots}/\" }",
            "redirect",
            "{hots}",
        ),
        (
            "  redirect = { status = 301 }",
            "redirect.to",
            "missing field",
        ),
    ] {
        refused(&with(route), &format!("listeners[0].routes[1].{key}"), why);
    }
}

#[test]
fn a_routes_access_log_setting_converts() {
    let with = |v: &str| {
        GOOD.replace(
            "  name = \"fallback\"\n",
            &format!("  name = \"fallback\"\n  access_log = \"{v}\"\n"),
        )
    };
    for (v, mode) in [
        ("all", AccessLogMode::All),
        ("errors", AccessLogMode::Errors),
        ("off", AccessLogMode::Off),
    ] {
        let cfg = parse(&with(v), Path::new(".")).unwrap();
        let r = &cfg.config.listeners[0].routes;
        assert_eq!(
            (r[0].access_log, r[1].access_log),
            (AccessLogMode::All, mode)
        );
    }
    let e = err(&with("some"));
    assert_eq!(e.key, "listeners[0].routes[1].access_log");
    assert!(e.message.contains("errors"), "{e:?}");
}

#[test]
fn a_routes_access_log_sample_converts_and_bad_shares_are_refused() {
    let with = |extra: &str| {
        GOOD.replace(
            "  name = \"fallback\"\n",
            &format!("  name = \"fallback\"\n{extra}\n"),
        )
    };
    for (src, per_million) in [
        ("  access_log_sample = 0.05", 50_000),
        ("  access_log = \"all\"\n  access_log_sample = 1", 1_000_000),
        ("  access_log_sample = 0.000001", 1),
    ] {
        let cfg = parse(&with(src), Path::new(".")).unwrap();
        assert_eq!(
            cfg.config.listeners[0].routes[1].access_log,
            AccessLogMode::Sampled { per_million },
            "{src}"
        );
    }
    let key = "listeners[0].routes[1].access_log_sample";
    refused(&with("  access_log_sample = 0"), key, "from 0.000001 to 1");
    refused(
        &with("  access_log_sample = 1.5"),
        key,
        "from 0.000001 to 1",
    );
    refused(
        &with("  access_log_sample = -0.1"),
        key,
        "from 0.000001 to 1",
    );
    refused(
        &with("  access_log_sample = 0.0000001"),
        key,
        "at least 0.000001",
    );
    refused(
        &with("  access_log = \"errors\"\n  access_log_sample = 0.5"),
        key,
        "none are logged to sample",
    );
}

#[test]
fn a_routes_body_limit_converts() {
    let src = GOOD.replace(
        "  name = \"fallback\"\n",
        "  name = \"fallback\"\n  max_body_bytes = 104857600\n",
    );
    let cfg = parse(&src, Path::new(".")).unwrap();
    let r = &cfg.config.listeners[0].routes;
    assert_eq!(
        (r[0].max_body_bytes, r[1].max_body_bytes),
        (None, Some(104_857_600))
    );
    let e = err(&GOOD.replace(
        "  name = \"fallback\"\n",
        "  name = \"fallback\"\n  max_body_bytes = -1\n",
    ));
    assert_eq!(e.key, "listeners[0].routes[1].max_body_bytes");
}

#[test]
fn a_routes_retry_body_bytes_converts_within_its_bound() {
    let with = |n: &str| {
        GOOD.replace(
            "  name = \"fallback\"\n",
            &format!("  name = \"fallback\"\n  retry_body_bytes = {n}\n"),
        )
    };
    let cfg = parse(&with("0"), Path::new(".")).unwrap();
    let r = &cfg.config.listeners[0].routes;
    assert_eq!(
        (r[0].retry_body_bytes, r[1].retry_body_bytes),
        (tether_gateway::config::DEFAULT_RETRY_BODY_BYTES, 0)
    );
    refused(
        &with("16777217"),
        "listeners[0].routes[1].retry_body_bytes",
        "at most",
    );
}

#[test]
fn split_routes_convert_and_bad_ones_name_their_key() {
    let with = |route: &str| {
        GOOD.replace(
            "  [[listeners.routes]]\n  upstream = \"app\"\n  name = \"fallback\"\n",
            &format!("  [[listeners.routes]]\n{route}\n"),
        ) + "\n[[upstreams]]\nname = \"canary\"\naddresses = [\"127.0.0.1:9001\"]\n"
    };
    let cfg = parse(
        &with(
            "  split = [{ upstream = \"app\", weight = 95 }, { upstream = \"canary\", weight = 5 }]",
        ),
        Path::new("."),
    )
    .unwrap();
    let r = &cfg.config.listeners[0].routes[1];
    assert_eq!(
        r.split,
        vec![
            SplitTarget {
                upstream: "app".into(),
                weight: 95
            },
            SplitTarget {
                upstream: "canary".into(),
                weight: 5
            },
        ]
    );
    assert_eq!((r.upstream.as_str(), r.name.as_str()), ("", "app"));
    assert_eq!(r.split_key, None);
    let two =
        "  split = [{ upstream = \"app\", weight = 1 }, { upstream = \"canary\", weight = 1 }]";
    let cfg = parse(
        &with(&format!("{two}\n  split_key = \"cookie:uid\"")),
        Path::new("."),
    )
    .unwrap();
    assert_eq!(
        cfg.config.listeners[0].routes[1].split_key,
        Some(HashKey::Cookie("uid".into()))
    );
    for (route, key, why) in [
        (
            format!("{two}\n  split_key = \"session\""),
            "split_key",
            "is not one of",
        ),
        (
            format!("{two}\n  split_key = \"header:\""),
            "split_key",
            "not a header name",
        ),
        (
            format!("{two}\n  split_key = \"cookie:\""),
            "split_key",
            "not a cookie name",
        ),
        (
            "  upstream = \"app\"\n  split_key = \"client_ip\"".to_owned(),
            "split_key",
            "has no split",
        ),
    ] {
        refused(&with(&route), &format!("listeners[0].routes[1].{key}"), why);
    }
    for (route, key, why) in [
        (
            "  upstream = \"app\"\n  split = [{ upstream = \"canary\", weight = 1 }]",
            "split",
            "one of them",
        ),
        ("  split = []", "split", "at least one"),
        (
            "  split = [{ upstream = \"app\", weight = 1 }, { upstream = \"nope\", weight = 1 }]",
            "split[1].upstream",
            "no upstream named",
        ),
        (
            "  split = [{ upstream = \"app\", weight = 1 }, { upstream = \"app\", weight = 1 }]",
            "split[1].upstream",
            "already in the split",
        ),
        (
            "  split = [{ upstream = \"app\", weight = 101 }]",
            "split[0].weight",
            "from 0 to 100",
        ),
        (
            "  split = [{ upstream = \"app\", weight = 0 }]",
            "split",
            "above 0",
        ),
        (
            "  split = [{ upstream = \"app\" }]",
            "split[0].weight",
            "missing field `weight`",
        ),
    ] {
        refused(&with(route), &format!("listeners[0].routes[1].{key}"), why);
    }
}

#[test]
fn a_fixed_response_body_comes_from_a_file_beside_the_config() {
    let dir = std::env::temp_dir().join(format!("tether-body-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("maintenance.html"), "<h1>back soon</h1>").unwrap();
    std::fs::write(dir.join("big.txt"), vec![b'x'; 1024 * 1024 + 1]).unwrap();
    std::fs::write(dir.join("binary.txt"), [0xff, 0xfe]).unwrap();
    let with = |respond: &str| {
        GOOD.replace(
            "  [[listeners.routes]]\n  upstream = \"app\"\n  name = \"fallback\"\n",
            &format!("  [[listeners.routes]]\n  respond = {{ {respond} }}\n"),
        )
    };
    let cfg = parse(
        &with("status = 503, body_file = \"maintenance.html\""),
        &dir,
    )
    .unwrap();
    let r = cfg.config.listeners[0].routes[1].respond.clone().unwrap();
    assert_eq!(
        (r.status, r.body.as_str(), r.content_type.as_str()),
        (503, "<h1>back soon</h1>", "text/html; charset=utf-8")
    );
    // A type given wins over the file's name.
    let cfg = parse(
        &with("body_file = \"maintenance.html\", content_type = \"text/plain\""),
        &dir,
    )
    .unwrap();
    let r = cfg.config.listeners[0].routes[1].respond.clone().unwrap();
    assert_eq!(r.content_type, "text/plain");
    let key = "listeners[0].routes[1].respond.body_file";
    for (respond, why) in [
        ("body_file = \"missing.html\"", "cannot read"),
        ("body_file = \"big.txt\"", "larger than 1 MiB"),
        ("body_file = \"binary.txt\"", "not UTF-8"),
        ("body = \"x\", body_file = \"maintenance.html\"", "not both"),
    ] {
        let e = parse(&with(respond), &dir).unwrap_err();
        assert_eq!(e.key, key, "{e:?}");
        assert!(e.message.contains(why), "{e:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn respond_routes_convert_and_bad_ones_name_their_key() {
    let with = |route: &str| {
        GOOD.replace(
            "  [[listeners.routes]]\n  upstream = \"app\"\n  name = \"fallback\"\n",
            &format!("  [[listeners.routes]]\n{route}\n"),
        )
    };
    let cfg = parse(
        &with("  respond = { status = 503, body = \"down for maintenance\" }"),
        Path::new("."),
    )
    .unwrap();
    let r = &cfg.config.listeners[0].routes[1];
    assert_eq!(r.respond, Some(Respond::new(503, "down for maintenance")));
    assert_eq!((r.upstream.as_str(), r.name.as_str()), ("", "respond"));
    let cfg = parse(
        &with("  respond = { body = \"{}\", content_type = \"application/json\" }"),
        Path::new("."),
    )
    .unwrap();
    let r = cfg.config.listeners[0].routes[1].respond.clone().unwrap();
    assert_eq!(
        (r.status, r.body.as_str(), r.content_type.as_str()),
        (200, "{}", "application/json")
    );
    for (route, key, why) in [
        (
            "  upstream = \"app\"\n  respond = { status = 403 }",
            "respond",
            "one of them",
        ),
        (
            "  redirect = { to = \"/x\" }\n  respond = { status = 403 }",
            "respond",
            "one of them",
        ),
        ("  respond = { status = 101 }", "respond", "final status"),
        ("  respond = { status = 700 }", "respond", "final status"),
        (
            "  respond = { status = 204, body = \"x\" }",
            "respond",
            "no body",
        ),
        (
            "  respond = { body = \"x\", content_type = \"a\\nb\" }",
            "respond",
            "content type",
        ),
        (
            "  respond = { stauts = 200 }",
            "respond.stauts",
            "unknown field",
        ),
        ("  timeout = \"1s\"", "upstream", "respond"),
    ] {
        refused(&with(route), &format!("listeners[0].routes[1].{key}"), why);
    }
}

#[test]
fn fail_statuses_convert_and_bad_ones_name_their_key() {
    let with = |v: &str| {
        GOOD.replace(
            "idle_timeout = \"2s\"\n",
            &format!("idle_timeout = \"2s\"\nfail_statuses = {v}\n"),
        )
    };
    let cfg = parse(&with("[502, 503, 504]"), Path::new(".")).unwrap();
    assert_eq!(cfg.config.upstreams[0].fail_statuses, [502, 503, 504]);
    let e = err(&with("[503, 42]"));
    assert_eq!(e.key, "upstreams[0].fail_statuses[1]", "{e:?}");
    assert!(e.message.contains("from 100 to 599"), "{e:?}");
    let e = err(&with("[\"5xx\"]"));
    assert_eq!(e.key, "upstreams[0].fail_statuses[0]", "{e:?}");
}

#[test]
fn connection_lifetimes_convert_and_bad_ones_name_their_key() {
    let with = |v: &str| {
        GOOD.replace(
            "idle_timeout = \"2s\"\n",
            &format!("idle_timeout = \"2s\"\n{v}\n"),
        )
    };
    let u = &parse(GOOD, Path::new(".")).unwrap().config.upstreams[0];
    assert_eq!(
        (u.max_requests_per_connection, u.max_connection_age),
        (None, None)
    );
    let cfg = parse(
        &with("max_requests_per_connection = 1000\nmax_connection_age = \"10m\""),
        Path::new("."),
    )
    .unwrap();
    let u = &cfg.config.upstreams[0];
    assert_eq!(
        (u.max_requests_per_connection, u.max_connection_age),
        (
            std::num::NonZeroU32::new(1000),
            Some(Duration::from_secs(600))
        )
    );
    for (bad, key, why) in [
        (
            "max_requests_per_connection = 0",
            "max_requests_per_connection",
            "at least 1",
        ),
        (
            "max_requests_per_connection = -3",
            "max_requests_per_connection",
            "",
        ),
        (
            "max_connection_age = \"0s\"",
            "max_connection_age",
            "greater than zero",
        ),
        ("max_connection_age = \"soon\"", "max_connection_age", ""),
    ] {
        let e = err(&with(bad));
        assert_eq!(e.key, format!("upstreams[0].{key}"), "{e:?}");
        assert!(e.message.contains(why), "{e:?}");
    }
}

#[test]
fn discovery_converts_with_its_default_interval_and_bad_settings_name_their_key() {
    let with = |v: &str| {
        GOOD.replace(
            "idle_timeout = \"2s\"\n",
            &format!("idle_timeout = \"2s\"\n{v}\n"),
        )
    };
    let found = |src: &str| parse(src, Path::new(".")).unwrap().config.upstreams[0].discovery;
    assert_eq!(found(GOOD), None);
    assert_eq!(
        found(&with("discovery = \"dns\"")),
        Some(Discovery {
            interval: Duration::from_secs(5),
            srv: false,
        })
    );
    assert_eq!(
        found(&with("discovery = \"dns\"\ndiscovery_interval = \"30s\"")),
        Some(Discovery {
            interval: Duration::from_secs(30),
            srv: false,
        })
    );
    // SRV names are written without ports; IP addresses keep theirs.
    let srv =
        with("discovery = \"srv\"").replace("\"app.internal:80\"", "\"_http._tcp.app.internal.\"");
    let cfg = parse(&srv, Path::new(".")).unwrap().config;
    assert!(cfg.upstreams[0].discovery.is_some_and(|d| d.srv));
    let a = &cfg.upstreams[0].addresses[2];
    assert_eq!((a.host.as_str(), a.port), ("_http._tcp.app.internal", 0));
    assert_eq!(cfg.upstreams[0].addresses[0].port, 9000);
    refused(
        &with("discovery = \"srv\""),
        "upstreams[0].addresses[2]",
        "write it without one",
    );
    refused(
        &srv.replace("_http._tcp.app.internal.", "_http._tcp.app..internal"),
        "upstreams[0].addresses[2]",
        "not a DNS name",
    );
    for (bad, key, why) in [
        ("discovery = \"consul\"", "discovery", ""),
        (
            "discovery_interval = \"30s\"",
            "discovery_interval",
            "only used with discovery",
        ),
        (
            "discovery = \"dns\"\ndiscovery_interval = \"10ms\"",
            "discovery_interval",
            "at least 100ms",
        ),
        (
            "discovery = \"dns\"\ndiscovery_interval = \"often\"",
            "discovery_interval",
            "",
        ),
    ] {
        refused(&with(bad), &format!("upstreams[0].{key}"), why);
    }
    let literals = with("discovery = \"dns\"").replace(", \"app.internal:80\"", "");
    refused(
        &literals,
        "upstreams[0].discovery",
        "every address here is an IP",
    );
}

#[test]
fn an_upstreams_proxy_protocol_converts_and_is_for_http1_only() {
    use tether_gateway::config::ProxyProtocolVersion;
    let with = |protocol: &str, v: &str| {
        GOOD.replace(
            "protocol = \"h2c\"\n",
            &format!("protocol = \"{protocol}\"\nproxy_protocol = \"{v}\"\n"),
        )
    };
    assert_eq!(
        parse(GOOD, Path::new(".")).unwrap().config.upstreams[0].proxy_protocol,
        None
    );
    for (v, version) in [
        ("v1", ProxyProtocolVersion::V1),
        ("v2", ProxyProtocolVersion::V2),
    ] {
        let cfg = parse(&with("http1", v), Path::new(".")).unwrap();
        assert_eq!(cfg.config.upstreams[0].proxy_protocol, Some(version));
    }
    let e = err(&with("http1", "v3"));
    assert_eq!(e.key, "upstreams[0].proxy_protocol", "{e:?}");
    let e = err(&with("h2c", "v2"));
    assert_eq!(e.key, "upstreams[0].proxy_protocol", "{e:?}");
    assert!(
        e.message.contains("only with protocol = \"http1\""),
        "{e:?}"
    );
}

#[test]
fn proxy_protocol_is_off_unless_asked_for() {
    let cfg = parse(GOOD, Path::new(".")).unwrap();
    assert!(!cfg.config.listeners[0].proxy_protocol);
    let src = GOOD.replace(
        "protocols = [\"http1\", \"h2c\"]\n",
        "protocols = [\"http1\", \"h2c\"]\nproxy_protocol = true\n",
    );
    assert!(parse(&src, Path::new(".")).unwrap().config.listeners[0].proxy_protocol);
    let e = err(&GOOD.replace(
        "protocols = [\"http1\", \"h2c\"]\n",
        "protocols = [\"http1\", \"h2c\"]\nproxy_protocol = \"v2\"\n",
    ));
    assert_eq!(e.key, "listeners[0].proxy_protocol", "{e:?}");
}

#[test]
fn route_conditions_convert_and_bad_ones_name_their_key() {
    let with = |extra: &str| {
        GOOD.replace(
            "  max_retries = 0\n",
            &format!("  max_retries = 0\n  {extra}\n"),
        )
    };
    let cfg = parse(
        &with("methods = [\"GET\", \"HEAD\"]\n  match_headers = { x-canary = \"1\", traceparent = \"*\" }"),
        Path::new("."),
    )
    .unwrap();
    let r = &cfg.config.listeners[0].routes[1];
    assert_eq!(r.methods, ["GET", "HEAD"]);
    assert_eq!(
        r.match_headers,
        [
            ("traceparent".to_owned(), "*".to_owned()),
            ("x-canary".to_owned(), "1".to_owned())
        ]
    );
    for (extra, key, why) in [
        ("methods = [\"get\"]", "methods", "upper case"),
        (
            "match_headers = { \"a b\" = \"1\" }",
            "match_headers",
            "not a valid header name",
        ),
    ] {
        refused(&with(extra), &format!("listeners[0].routes[1].{key}"), why);
    }
}

#[test]
fn an_upstream_client_certificate_needs_both_files_and_they_must_load() {
    let with = |tls: &str| {
        GOOD.replace(
            "protocol = \"h2c\"\n",
            &format!("protocol = \"h2\"\ntls = {{ {tls} }}\n"),
        )
    };
    let cfg = parse(&with("server_name = \"app.internal\""), Path::new(".")).unwrap();
    assert!(
        cfg.config.upstreams[0]
            .tls
            .as_ref()
            .unwrap()
            .client_cert
            .is_none()
    );
    for (tls, key, why) in [
        ("cert = \"c.pem\"", "tls.key", "needs its key"),
        (
            "key = \"k.pem\"",
            "tls.cert",
            "needs its client certificate",
        ),
        (
            "cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\"",
            "tls.cert",
            "cannot load certificates",
        ),
    ] {
        let e = err(&with(tls));
        assert_eq!(e.key, format!("upstreams[0].{key}"), "{tls}: {e:?}");
        assert!(e.message.contains(why), "{tls}: {e:?}");
    }
}

#[test]
fn client_rules_convert_and_bad_ones_name_their_key() {
    let with = |rules: &str| {
        GOOD.replace(
            "  max_retries = 0\n",
            &format!("  max_retries = 0\n{rules}"),
        )
    };
    let cfg = parse(
        &with("  allow_clients = [\"10.0.0.0/8\", \"::1\"]\n  deny_clients = [\"10.6.6.6\"]\n"),
        Path::new("."),
    )
    .unwrap();
    let r = &cfg.config.listeners[0].routes[1];
    let text =
        |v: &[tether_gateway::config::IpNet]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    assert_eq!(text(&r.allow_clients), ["10.0.0.0/8", "::1/128"]);
    assert_eq!(text(&r.deny_clients), ["10.6.6.6/32"]);
    for (bad, key, why) in [
        (
            "  allow_clients = []\n",
            "allow_clients",
            "refuse every client",
        ),
        (
            "  allow_clients = [\"10.0.0.0/33\"]\n",
            "allow_clients[0]",
            "",
        ),
        (
            "  deny_clients = [\"::1\", \"nope\"]\n",
            "deny_clients[1]",
            "",
        ),
    ] {
        refused(&with(bad), &format!("listeners[0].routes[1].{key}"), why);
    }
}

#[test]
fn compression_takes_defaults_and_bad_settings_name_their_key() {
    use tether_gateway::config::{Compression, ContentCoding};
    let with = |c: &str| {
        GOOD.replace(
            "  max_retries = 0\n",
            &format!("  max_retries = 0\n  compression = {{ {c} }}\n"),
        )
    };
    let cfg = parse(&with(""), Path::new(".")).unwrap();
    assert_eq!(
        cfg.config.listeners[0].routes[1].compression,
        Some(Compression::default())
    );
    let cfg = parse(
        &with("encodings = [\"gzip\"], types = [\"Text/*\"], min_bytes = 0"),
        Path::new("."),
    )
    .unwrap();
    let c = cfg.config.listeners[0].routes[1]
        .compression
        .clone()
        .unwrap();
    assert_eq!(
        (c.encodings, c.types, c.min_bytes),
        (vec![ContentCoding::Gzip], vec!["text/*".to_owned()], 0)
    );
    let cfg = parse(
        &with("encodings = [\"zstd\", \"br\", \"gzip\"]"),
        Path::new("."),
    )
    .unwrap();
    assert_eq!(
        cfg.config.listeners[0].routes[1]
            .compression
            .as_ref()
            .unwrap()
            .encodings,
        [
            ContentCoding::Zstd,
            ContentCoding::Brotli,
            ContentCoding::Gzip
        ]
    );
    for (bad, key, why) in [
        (
            "encodings = [\"gzip\", \"deflate\"]",
            "compression.encodings[1]",
            "unknown encoding",
        ),
        ("encodings = []", "compression.encodings", "at least one"),
        ("types = [\"html\"]", "compression.types[0]", "media type"),
        ("level = 9", "compression.level", "unknown field"),
    ] {
        refused(&with(bad), &format!("listeners[0].routes[1].{key}"), why);
    }
}

#[test]
fn streams_per_connection_convert_for_http2_upstreams_only() {
    let cfg = parse(GOOD, Path::new(".")).unwrap();
    assert_eq!(
        cfg.config.upstreams[0].max_streams_per_connection.get(),
        100
    );
    let with = |extra: &str| {
        GOOD.replace(
            "protocol = \"h2c\"\n",
            &format!("protocol = \"h2c\"\nmax_streams_per_connection = {extra}\n"),
        )
    };
    let cfg = parse(&with("250"), Path::new(".")).unwrap();
    assert_eq!(
        cfg.config.upstreams[0].max_streams_per_connection.get(),
        250
    );
    let e = err(&with("0"));
    assert_eq!(e.key, "upstreams[0].max_streams_per_connection");
    assert!(e.message.contains("at least 1"), "{e:?}");
    let h1 = with("8").replace("protocol = \"h2c\"", "protocol = \"http1\"");
    let e = err(&h1);
    assert_eq!(e.key, "upstreams[0].max_streams_per_connection");
    assert!(e.message.contains("only used with"), "{e:?}");
}

#[test]
fn an_endpoint_cap_and_its_queue_timeout_convert_and_bad_ones_name_their_key() {
    let with = |extra: &str| {
        GOOD.replace(
            "protocol = \"h2c\"\n",
            &format!("protocol = \"h2c\"\n{extra}"),
        )
    };
    let cfg = parse(
        &with("max_in_flight_per_endpoint = 8\nqueue_timeout = \"0s\"\n"),
        Path::new("."),
    )
    .unwrap();
    let u = &cfg.config.upstreams[0];
    assert_eq!(u.max_in_flight_per_endpoint.map(|n| n.get()), Some(8));
    assert_eq!(u.queue_timeout, Duration::ZERO);
    for (bad, key, why) in [
        (
            "max_in_flight_per_endpoint = 0\n",
            "max_in_flight_per_endpoint",
            "at least 1",
        ),
        (
            "queue_timeout = \"1s\"\n",
            "queue_timeout",
            "only used with",
        ),
        (
            "max_in_flight_per_endpoint = 1\nqueue_timeout = \"soon\"\n",
            "queue_timeout",
            "",
        ),
    ] {
        let e = err(&with(bad));
        assert_eq!(e.key, format!("upstreams[0].{key}"), "{bad}: {e:?}");
        assert!(e.message.contains(why), "{bad}: {e:?}");
    }
}
