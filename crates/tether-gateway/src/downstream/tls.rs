//! TLS termination: the certificate for the server name a client asks for (SNI), client
//! certificates (mutual TLS), and what a verified client certificate tells the upstream.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use http::HeaderValue;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::{ClientAuth, ListenerConfig, ListenerTls, ServerTls};

/// Why a listener's TLS settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A certificate was refused.
    #[error("certificate {} ({}): {source}", index + 1, if *index == 0 { "the default" } else { "chosen by server name" })]
    Certificate {
        /// Index in [`ListenerTls::certificates`].
        index: usize,
        /// Cause.
        source: CertificateError,
    },
    /// The client trust anchors were rejected.
    #[error("client_ca: {0}")]
    ClientCa(String),
    /// rustls refused the assembled configuration.
    #[error("{0}")]
    Config(#[from] rustls::Error),
}

/// Why one certificate cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The key is unreadable or not the leaf's.
    #[error("{0}")]
    Key(rustls::Error),
    /// A certificate other than the default covers no DNS name, so no client could be served it.
    #[error(
        "the leaf certificate has no DNS name among its subject alternative names, so no server name (SNI) selects it"
    )]
    NoDnsName,
}

/// Checks a certificate as a listener would serve it (the default one, or one chosen by server
/// name), returning it ready to serve and the DNS names it covers.
pub fn check_certificate(
    c: &ServerTls,
    default: bool,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, Vec<String>), CertificateError> {
    let key = CertifiedKey::from_der(c.cert_chain.clone(), c.key.clone_key(), provider)
        .map_err(CertificateError::Key)?;
    let names = c
        .cert_chain
        .first()
        .map(|leaf| dns_names(leaf.as_ref()))
        .unwrap_or_default();
    if names.is_empty() && !default {
        return Err(CertificateError::NoDnsName);
    }
    Ok((key, names))
}

/// The acceptor for a listener, or `None` for a cleartext one.
pub fn acceptor(l: &ListenerConfig) -> Result<Option<TlsAcceptor>, TlsSetupError> {
    let Some(tls) = &l.tls else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => builder.with_client_cert_verifier(
            client_verifier(auth, provider.clone()).map_err(TlsSetupError::ClientCa)?,
        ),
    };
    let mut sc = builder.with_cert_resolver(Arc::new(ByServerName::new(tls, &provider)?));
    sc.alpn_protocols = match (l.protocols.h2, l.protocols.http1) {
        (true, true) => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        (true, false) => vec![b"h2".to_vec()],
        _ => vec![b"http/1.1".to_vec()],
    };
    Ok(Some(TlsAcceptor::from(Arc::new(sc))))
}

/// The verifier of client certificates for `auth`; the error says why its trust anchors were
/// refused.
pub fn client_verifier(
    auth: &ClientAuth,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in &auth.ca {
        roots.add(ca.clone()).map_err(|e| e.to_string())?;
    }
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if !auth.required {
        verifier = verifier.allow_unauthenticated();
    }
    verifier.build().map_err(|e| e.to_string())
}

/// Picks a listener's certificate by the client's server name.
#[derive(Debug)]
struct ByServerName {
    /// In configuration order; the first is the default.
    certs: Vec<Arc<CertifiedKey>>,
    /// Lower-case DNS name → the first certificate naming it.
    exact: HashMap<String, usize>,
    /// `example.com` for `*.example.com` → the first certificate with that wildcard.
    wildcard: HashMap<String, usize>,
}

impl ByServerName {
    fn new(tls: &ListenerTls, provider: &CryptoProvider) -> Result<ByServerName, TlsSetupError> {
        let mut by = ByServerName {
            certs: Vec::with_capacity(tls.certificates.len()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for (index, c) in tls.certificates.iter().enumerate() {
            let (key, names) = check_certificate(c, index == 0, provider)
                .map_err(|source| TlsSetupError::Certificate { index, source })?;
            for name in names {
                let name = name.to_ascii_lowercase();
                let name = name.trim_end_matches('.');
                match name.strip_prefix("*.") {
                    Some(parent) => by.wildcard.entry(parent.to_owned()).or_insert(index),
                    None => by.exact.entry(name.to_owned()).or_insert(index),
                };
            }
            by.certs.push(Arc::new(key));
        }
        Ok(by)
    }

    /// The index of the certificate for `name`, if one covers it.
    fn lookup(&self, name: &str) -> Option<usize> {
        let lower;
        let mut name = name.trim_end_matches('.');
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            name = &lower;
        }
        if let Some(&i) = self.exact.get(name) {
            return Some(i);
        }
        // A wildcard stands for exactly one label (RFC 6125 §6.4.3).
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).copied()
    }
}

impl ResolvesServerCert for ByServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let i = hello
            .server_name()
            .and_then(|n| self.lookup(n))
            .unwrap_or(0);
        self.certs.get(i).cloned()
    }
}

/// The DNS names among a certificate's subject alternative names (none if it cannot be read).
fn dns_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

/// What a client's TLS handshake settled: for the access log, and the client certificate for
/// the upstream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSession {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// The cipher suite (`TLS13_AES_128_GCM_SHA256`, ...).
    pub cipher: &'static str,
    /// The server name the client asked for (SNI), if it sent one.
    pub server_name: Option<Box<str>>,
    /// The `X-Forwarded-Client-Cert` element of the certificate the client presented, if it
    /// presented one (verified: the listener asks only when it has trust anchors).
    pub client_cert: Option<HeaderValue>,
}

impl TlsSession {
    /// The session of a connection whose handshake is done.
    pub fn of(conn: &rustls::ServerConnection) -> TlsSession {
        TlsSession {
            version: match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "unknown",
            },
            cipher: conn
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str())
                .unwrap_or("unknown"),
            server_name: conn.server_name().map(Box::from),
            client_cert: forwarded_client_cert(conn),
        }
    }
}

/// The `X-Forwarded-Client-Cert` element for the verified certificate a client presented, in
/// Envoy's format: `Hash=<SHA-256 of the DER, hex>;Subject="<RFC 4514 name>"`, then a `URI=` and
/// a `DNS=` for each such subject alternative name. `None` when the client sent none.
pub fn forwarded_client_cert(conn: &rustls::ServerConnection) -> Option<HeaderValue> {
    let leaf = conn.peer_certificates()?.first()?;
    let der = leaf.as_ref();
    let mut out = String::with_capacity(256);
    out.push_str("Hash=");
    for b in ring::digest::digest(&ring::digest::SHA256, der).as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
        out.push_str(";Subject=");
        quoted(&mut out, &rfc4514(cert.subject()));
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                let (key, v) = match n {
                    x509_parser::extensions::GeneralName::URI(u) => ("URI", *u),
                    x509_parser::extensions::GeneralName::DNSName(d) => ("DNS", *d),
                    _ => continue,
                };
                // A name that is not visible ASCII has no place in a header: left out.
                if !v.bytes().all(|b| b.is_ascii_graphic()) {
                    continue;
                }
                out.push(';');
                out.push_str(key);
                out.push('=');
                if v.contains([',', ';', '=', '"']) {
                    quoted(&mut out, v);
                } else {
                    out.push_str(v);
                }
            }
        }
    }
    HeaderValue::from_str(&out).ok()
}

/// Appends `v` as a quoted string, with `"` and `\` escaped.
fn quoted(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// A distinguished name as RFC 4514 writes it: the last RDN first, `,` between RDNs and `+`
/// within one. Values that are not text are `#` and their DER in hex; characters outside
/// printable ASCII are escaped as `\XX` per byte, so the result is always ASCII.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    for (i, rdn) in name.iter_rdn().collect::<Vec<_>>().iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match x509_parser::objects::oid2abbrev(attr.attr_type(), registry) {
                Ok(short) => out.push_str(short),
                Err(_) => out.push_str(&attr.attr_type().to_id_string()),
            }
            out.push('=');
            match attr.as_str() {
                Ok(v) => escape_value(&mut out, v),
                Err(_) => {
                    out.push('#');
                    for b in attr.attr_value().data.iter() {
                        let _ = write!(out, "{b:02x}");
                    }
                }
            }
        }
    }
    out
}

/// One attribute value, escaped per RFC 4514 §2.4.
fn escape_value(out: &mut String, v: &str) {
    let bytes = v.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let special = matches!(b, b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\')
            || (i == 0 && (b == b'#' || b == b' '))
            || (i + 1 == bytes.len() && b == b' ');
        if special {
            out.push('\\');
            out.push(char::from(b));
        } else if (0x20..0x7f).contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "\\{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert(names: &[&str], cn: &str) -> ServerTls {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let c = params.self_signed(&key).unwrap();
        ServerTls {
            cert_chain: vec![c.der().clone()],
            key: rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        }
    }

    fn resolver(certs: Vec<ServerTls>) -> Result<ByServerName, TlsSetupError> {
        let tls = ListenerTls {
            certificates: certs,
            client_auth: None,
        };
        ByServerName::new(&tls, &rustls::crypto::ring::default_provider())
    }

    #[test]
    fn the_server_name_picks_exact_names_before_wildcards_and_the_first_is_the_default() {
        let by = resolver(vec![
            cert(&["default.test"], "default"),
            cert(&["*.example.test", "api.other.test"], "wild"),
            cert(&["www.example.test"], "www"),
            cert(&["api.other.test"], "second"),
        ])
        .unwrap();
        assert_eq!(by.lookup("default.test"), Some(0));
        assert_eq!(
            by.lookup("www.example.test"),
            Some(2),
            "exact beats wildcard"
        );
        assert_eq!(
            by.lookup("WWW.Example.Test."),
            Some(2),
            "case and a final dot"
        );
        assert_eq!(by.lookup("shop.example.test"), Some(1));
        assert_eq!(by.lookup("example.test"), None, "a wildcard needs a label");
        assert_eq!(
            by.lookup("a.b.example.test"),
            None,
            "a wildcard is one label"
        );
        assert_eq!(
            by.lookup("api.other.test"),
            Some(1),
            "the first certificate naming it"
        );
        assert_eq!(by.lookup("unknown.test"), None);
    }

    #[test]
    fn a_later_certificate_without_dns_names_is_refused() {
        let err = resolver(vec![cert(&["a.test"], "a"), cert(&[], "nameless")]).unwrap_err();
        assert!(
            matches!(
                err,
                TlsSetupError::Certificate {
                    index: 1,
                    source: CertificateError::NoDnsName
                }
            ),
            "{err}"
        );
        // The default needs none: it is served to every client no other certificate names.
        resolver(vec![cert(&[], "nameless")]).unwrap();
    }

    #[test]
    fn a_key_that_is_not_the_leafs_is_refused() {
        let mut a = cert(&["a.test"], "a");
        a.key = cert(&["b.test"], "b").key;
        let err = resolver(vec![a]).unwrap_err();
        assert!(
            matches!(
                err,
                TlsSetupError::Certificate {
                    index: 0,
                    source: CertificateError::Key(_)
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn names_are_written_last_rdn_first_with_special_characters_escaped() {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CountryName, "US");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme, \"Inc\"");
        params
            .distinguished_name
            .push(DnType::CommonName, " #svc+1 é");
        params.subject_alt_names = vec![SanType::URI("spiffe://acme.test/svc".try_into().unwrap())];
        let key = KeyPair::generate().unwrap();
        let c = params.self_signed(&key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(c.der()).unwrap();
        assert_eq!(
            rfc4514(parsed.subject()),
            r#"CN=\ #svc\+1 \C3\A9,O=Acme\, \"Inc\",C=US"#
        );
    }
}
