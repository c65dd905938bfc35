//! The mTLS listener's side of the accept loop: the rustls server configuration (client
//! certificates required, verified against the trusted CAs), binding, and one handshake
//! with a time limit whose refusals are audited.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::peer::{VerifiedPeer, parse_client_cert};
use super::server_cert::ServerCertResolver;
use super::{CertAuthority, Mtls, TlsError};

/// Sessions kept for resumption (TLS 1.2 ids and TLS 1.3 stateful tickets).
const SESSION_CACHE: usize = 4096;

/// The server configuration: the server certificate from `resolver` (the CA's or
/// tailscaled's, swappable), and a client verifier that requires a certificate chaining to
/// one of the trusted CAs.
pub fn server_config(
    ca: &CertAuthority,
    resolver: Arc<ServerCertResolver>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(ca.root_store()?, provider.clone()).build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    // hyper serves HTTP/1.1 here.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
    Ok(Arc::new(config))
}

/// Bind every `[tls] listen` address.
pub async fn bind(mtls: &Mtls) -> std::io::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for addr in &mtls.config().listen {
        let l = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {addr} ([tls] listen): {e}"),
            )
        })?;
        listeners.push(l);
    }
    Ok(listeners)
}

impl Mtls {
    /// Complete the TLS handshake of an accepted connection within `[tls] handshake_timeout`.
    /// `None` when it failed; the failure is logged and audited, and the connection dropped.
    pub async fn handshake(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<(TlsStream<TcpStream>, Arc<VerifiedPeer>)> {
        let acceptor = TlsAcceptor::from(self.server_config.clone());
        let timeout = self.config().handshake_timeout;
        let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Err(_) => {
                self.refuse_handshake(peer, &format!("no handshake within {timeout:?}"))
                    .await;
                return None;
            }
            Ok(Err(e)) => {
                self.refuse_handshake(peer, &e.to_string()).await;
                return None;
            }
            Ok(Ok(s)) => s,
        };
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first());
        let Some(leaf) = leaf else {
            // The verifier requires a certificate; this is a belt to its braces.
            self.refuse_handshake(peer, "no client certificate").await;
            return None;
        };
        match parse_client_cert(leaf) {
            Ok(cert) => Some((stream, Arc::new(VerifiedPeer { cert }))),
            Err(m) => {
                self.refuse_handshake(peer, &m).await;
                None
            }
        }
    }
}
