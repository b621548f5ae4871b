//! Certificates made at start-up: a private CA and a `localhost` leaf it signed. The gateway's
//! listener and the h2 upstream present the leaf; the bench client and the gateway trust the CA.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tether_gateway::config::{ServerTls, UpstreamTls};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::BoxError;

/// The name every certificate is issued for and every client asks for.
pub const SERVER_NAME: &str = "localhost";

/// The generated CA and leaf.
#[derive(Debug)]
pub struct Material {
    ca: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Material {
    /// Generates a fresh CA and a leaf for [`SERVER_NAME`] and `127.0.0.1`.
    pub fn generate() -> Result<Self, BoxError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate()?;
        let leaf_params =
            CertificateParams::new(vec![SERVER_NAME.to_string(), "127.0.0.1".to_string()])?;
        let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;
        Ok(Material {
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
            key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        })
    }

    /// TLS termination settings for a gateway listener.
    pub fn listener(&self) -> ServerTls {
        ServerTls {
            cert_chain: vec![self.leaf.clone()],
            key: PrivateKeyDer::Pkcs8(self.key.clone_key()),
        }
    }

    /// How the gateway reaches the TLS upstream: verified against the private CA.
    pub fn upstream(&self) -> UpstreamTls {
        UpstreamTls {
            server_name: Some(SERVER_NAME.to_string()),
            ca: vec![self.ca.clone()],
            insecure_skip_verify: false,
            client_cert: None,
        }
    }

    /// An acceptor for the h2 upstream, offering only ALPN `h2`.
    pub fn acceptor(&self) -> Result<TlsAcceptor, BoxError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.leaf.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// A connector for the bench's h2 client, asking for ALPN `h2` and trusting the CA.
    pub fn connector(&self) -> Result<TlsConnector, BoxError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone())?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// The server name the bench client sends as SNI.
pub fn server_name() -> Result<ServerName<'static>, BoxError> {
    Ok(ServerName::try_from(SERVER_NAME)?)
}
