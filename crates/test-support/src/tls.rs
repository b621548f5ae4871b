//! A throwaway PKI generated at test time: one CA, one server leaf for `localhost`, `127.0.0.1`
//! and `::1`, and one client leaf, with rustls configs for both ends. No key material lives in
//! the repository.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::BoxError;

/// ALPN id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A CA and a `localhost` leaf signed by it.
#[derive(Debug)]
pub struct TestPki {
    ca: CertificateDer<'static>,
    ca_pem: String,
    ca_key: PrivatePkcs8KeyDer<'static>,
    ca_params: CertificateParams,
    leaf: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    client_leaf: CertificateDer<'static>,
    client_key: PrivatePkcs8KeyDer<'static>,
}

impl Clone for TestPki {
    fn clone(&self) -> Self {
        TestPki {
            ca: self.ca.clone(),
            ca_pem: self.ca_pem.clone(),
            ca_key: self.ca_key.clone_key(),
            ca_params: self.ca_params.clone(),
            leaf: self.leaf.clone(),
            key: self.key.clone_key(),
            client_leaf: self.client_leaf.clone(),
            client_key: self.client_key.clone_key(),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestPki {
    /// Generates a fresh CA and leaf.
    pub fn generate() -> Result<TestPki, BoxError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tether test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_key_der = PrivatePkcs8KeyDer::from(ca_key.serialize_der());
        let issuer = Issuer::new(ca_params.clone(), ca_key);

        let leaf_key = KeyPair::generate()?;
        let mut leaf_params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])?;
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        leaf_params.use_authority_key_identifier_extension = true;
        leaf_params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;

        let client_key = KeyPair::generate()?;
        let mut client_params = CertificateParams::new(Vec::<String>::new())?;
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tether test client");
        client_params.use_authority_key_identifier_extension = true;
        client_params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        let client = client_params.signed_by(&client_key, &issuer)?;

        Ok(TestPki {
            ca: ca_cert.der().clone(),
            ca_pem: ca_cert.pem(),
            ca_key: ca_key_der,
            ca_params,
            leaf: leaf.der().clone(),
            key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
            client_leaf: client.der().clone(),
            client_key: PrivatePkcs8KeyDer::from(client_key.serialize_der()),
        })
    }

    /// The CA as the issuer of new certificates.
    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, BoxError> {
        let key = KeyPair::try_from(&PrivateKeyDer::Pkcs8(self.ca_key.clone_key()))?;
        Ok(Issuer::new(self.ca_params.clone(), key))
    }

    /// The CA certificate (a trust anchor for clients).
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.clone()
    }

    /// The CA certificate in PEM, for tools that read a CA file.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server's chain, leaf first.
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.leaf.clone()]
    }

    /// The leaf's private key.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// A server config presenting the leaf, offering `alpn` in preference order.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, BoxError> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.cert_chain(), self.key())?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// The client leaf's chain (a client certificate signed by the CA).
    pub fn client_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.client_leaf.clone()]
    }

    /// The client leaf's private key.
    pub fn client_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.client_key.clone_key())
    }

    /// A server config presenting the leaf that accepts only clients with a certificate the CA
    /// signed (mutual TLS), offering `alpn`.
    pub fn server_config_requiring_clients(
        &self,
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerConfig>, BoxError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.cert_chain(), self.key())?;
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// A client config trusting only the test CA, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, BoxError> {
        self.client_config_presenting(alpn, None)
    }

    /// [`TestPki::client_config`], presenting `cert` (a chain and its key) when the server
    /// asks for a client certificate.
    pub fn client_config_presenting(
        &self,
        alpn: &[&[u8]],
        cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Arc<ClientConfig>, BoxError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der())?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut cfg = match cert {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// A new server leaf for `names` (DNS names or IP addresses), with `common_name`, signed by
    /// the CA: its chain and key.
    pub fn issue(
        &self,
        names: &[&str],
        common_name: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), BoxError> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.use_authority_key_identifier_extension = true;
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshake_with_alpn() {
        let pki = TestPki::generate().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(&[ALPN_H2]).unwrap());
        let connector =
            tokio_rustls::TlsConnector::from(pki.client_config(&[ALPN_H2, ALPN_HTTP1]).unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let tls = acceptor.accept(s).await.unwrap();
            tls.get_ref().1.alpn_protocol().map(|p| p.to_vec())
        });
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, s).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(server.await.unwrap().as_deref(), Some(ALPN_H2));
    }
}
