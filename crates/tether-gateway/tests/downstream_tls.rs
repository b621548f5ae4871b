//! TLS termination beyond one certificate: the certificate chosen by the server name a client
//! asks for (SNI), and client certificates (mutual TLS) verified and passed on to the upstream
//! as `X-Forwarded-Client-Cert`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use test_support::TestPki;
use test_support::behavior::{Behavior, script};
use test_support::client::{H1Client, H2Client};
use test_support::tls::{ALPN_H2, ALPN_HTTP1};
use tether_gateway::config::{ClientAuth, ListenerTls, ServerTls};

const XFCC: &str = "x-forwarded-client-cert";

fn default_cert(pki: &TestPki) -> ServerTls {
    ServerTls {
        cert_chain: pki.cert_chain(),
        key: pki.key(),
    }
}

/// The values of header `n` the upstream saw on its request for `path`.
fn upstream_values(env: &Env, path: &str, n: &str) -> Vec<String> {
    let (_, headers) = env.log().requests(path).remove(0);
    headers
        .into_iter()
        .filter(|(k, _)| k == n)
        .map(|(_, v)| v)
        .collect()
}

/// A client's handshake succeeds only if the certificate it is served is valid for the name it
/// asked for: each name below is covered by exactly one of the listener's certificates.
#[tokio::test]
async fn the_server_name_a_client_asks_for_picks_the_certificate() {
    bounded(Duration::from_secs(30), async {
        let pki = TestPki::generate().unwrap();
        let issue = |names: &[&str], cn: &str| {
            let (cert_chain, key) = pki.issue(names, cn).unwrap();
            ServerTls { cert_chain, key }
        };
        let tls = ListenerTls {
            certificates: vec![
                default_cert(&pki),
                issue(&["a.test"], "a"),
                issue(&["*.b.test"], "any b"),
            ],
            client_auth: None,
        };
        let env = Env::with(Down::H2Tls, Up::H1, script(|_| Behavior::ok("ok")), |c| {
            c.listeners[0].tls = Some(tls);
        })
        .await;
        // 127.0.0.1: a client connecting by address sends no server name and gets the first.
        for name in ["a.test", "x.b.test", "LocalHost", "127.0.0.1"] {
            let tls = pki.client_config(&[ALPN_HTTP1]).unwrap();
            let mut c = H1Client::connect_tls_as(env.addr, tls, name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let (h, body) = c.get("/h1").await.unwrap();
            assert_eq!((h.status, &body[..]), (200, &b"ok"[..]), "{name}");
            let tls = pki.client_config(&[ALPN_H2]).unwrap();
            let mut c = H2Client::connect_tls_as(env.addr, tls, name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let (p, _) = c.get("/h2").await.unwrap();
            assert_eq!(p.status, 200, "{name}");
        }
        // Names no certificate covers get the first, which the client then refuses.
        for name in ["other.test", "b.test", "y.x.b.test"] {
            let tls = pki.client_config(&[ALPN_HTTP1]).unwrap();
            let e = H1Client::connect_tls_as(env.addr, tls, name)
                .await
                .err()
                .unwrap_or_else(|| panic!("{name}: a certificate for it was served"));
            assert!(e.to_string().contains("not valid for name"), "{name}: {e}");
        }
        env.stop().await;
    })
    .await
}

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn mutual_env(pki: &TestPki, required: bool) -> Env {
    let tls = ListenerTls {
        certificates: vec![default_cert(pki)],
        client_auth: Some(ClientAuth {
            ca: vec![pki.ca_der()],
            required,
        }),
    };
    Env::with(Down::H2Tls, Up::H1, script(|_| Behavior::ok("ok")), |c| {
        c.listeners[0].tls = Some(tls);
    })
    .await
}

#[tokio::test]
async fn a_verified_client_certificate_reaches_the_upstream_and_a_forged_one_does_not() {
    bounded(Duration::from_secs(30), async {
        let pki = TestPki::generate().unwrap();
        let env = mutual_env(&pki, true).await;
        let expected = format!(
            "Hash={};Subject=\"CN=tether test client\"",
            sha256_hex(pki.client_chain()[0].as_ref())
        );
        let with_cert = |alpn: &[u8]| {
            pki.client_config_presenting(&[alpn], Some((pki.client_chain(), pki.client_key())))
                .unwrap()
        };

        let mut c = H1Client::connect_tls_as(env.addr, with_cert(ALPN_HTTP1), "localhost")
            .await
            .unwrap();
        c.send_request("GET", "/h1", &[(XFCC, "Hash=forged")], None, b"")
            .await
            .unwrap();
        assert_eq!(c.read_final_head().await.unwrap().status, 200);
        assert_eq!(
            upstream_values(&env, "/h1", XFCC),
            std::slice::from_ref(&expected)
        );

        let mut c = H2Client::connect_tls_as(env.addr, with_cert(ALPN_H2), "localhost")
            .await
            .unwrap();
        let mut s = c
            .start("GET", "/h2", &[(XFCC, "Hash=forged")], true)
            .await
            .unwrap();
        assert_eq!(s.response().await.unwrap().status, 200);
        assert_eq!(
            upstream_values(&env, "/h2", XFCC),
            std::slice::from_ref(&expected)
        );
        // The access log names the session, and who the client was.
        for path in ["/h1", "/h2"] {
            let tls = env.record(path).await.tls.expect("a TLS session");
            assert_eq!(tls.version, "TLSv1.3", "{path}");
            assert!(tls.cipher.starts_with("TLS13_"), "{path}: {}", tls.cipher);
            assert_eq!(tls.server_name.as_deref(), Some("localhost"), "{path}");
            assert_eq!(
                tls.client_cert.as_ref().map(|v| v.to_str().unwrap()),
                Some(expected.as_str()),
                "{path}"
            );
        }

        // No certificate, or one from another CA: refused in the handshake (under TLS 1.3 the
        // client learns it at its first read), and nothing reaches the upstream.
        let stranger = TestPki::generate().unwrap();
        let others = [
            ("no certificate", pki.client_config(&[ALPN_HTTP1]).unwrap()),
            (
                "another CA's certificate",
                pki.client_config_presenting(
                    &[ALPN_HTTP1],
                    Some((stranger.client_chain(), stranger.client_key())),
                )
                .unwrap(),
            ),
        ];
        for (what, tls) in others {
            let refused = match H1Client::connect_tls_as(env.addr, tls, "localhost").await {
                Err(_) => true,
                Ok(mut c) => c.get("/refused").await.is_err(),
            };
            assert!(refused, "{what}: served");
        }
        assert!(env.log().requests("/refused").is_empty());
        env.stop().await;
    })
    .await
}

#[tokio::test]
async fn with_optional_client_certificates_a_client_without_one_is_served_without_the_header() {
    bounded(Duration::from_secs(30), async {
        let pki = TestPki::generate().unwrap();
        let env = mutual_env(&pki, false).await;
        let mut c = H1Client::connect_tls_as(
            env.addr,
            pki.client_config(&[ALPN_HTTP1]).unwrap(),
            "localhost",
        )
        .await
        .unwrap();
        c.send_request("GET", "/anon", &[(XFCC, "Hash=forged")], None, b"")
            .await
            .unwrap();
        assert_eq!(c.read_final_head().await.unwrap().status, 200);
        assert!(upstream_values(&env, "/anon", XFCC).is_empty());

        let tls = pki
            .client_config_presenting(&[ALPN_H2], Some((pki.client_chain(), pki.client_key())))
            .unwrap();
        let mut c = H2Client::connect_tls_as(env.addr, tls, "localhost")
            .await
            .unwrap();
        let (p, _) = c.get("/known").await.unwrap();
        assert_eq!(p.status, 200);
        let xfcc = upstream_values(&env, "/known", XFCC);
        assert!(
            xfcc.len() == 1 && xfcc[0].contains("Subject=\"CN=tether test client\""),
            "{xfcc:?}"
        );
        env.stop().await;
    })
    .await
}
