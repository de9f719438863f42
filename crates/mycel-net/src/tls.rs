//! TLS 1.3 for TCP connections, as the libp2p TLS handshake specifies it (protocol
//! `/tls/1.0.0`, ALPN `libp2p`, one self-signed certificate per side carrying the host key's
//! signature), but preferring AES-GCM where the CPU has AES instructions.
//!
//! libp2p-tls (and Noise) offer ChaCha20-Poly1305 first. Encryption runs on one connection's
//! task, one core per direction, so the cipher bounds a single connection's throughput: on
//! this project's machines ChaCha20-Poly1305 moves ~0.75 GB/s over one stream and AES-128-GCM
//! ~1.2 GB/s (`examples/stream_speed.rs`). Everything else, the certificate and its checks,
//! comes from libp2p-tls, so this interoperates with stock libp2p peers in both directions:
//! as a dialer we list AES first and servers follow the client's order; as a listener we pick
//! by our own order.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{AsyncRead, AsyncWrite, FutureExt};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::Keypair;
use libp2p::tls::certificate;
use libp2p::PeerId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs::cipher_suite::{
    TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CommonState, DigitallySignedStruct, DistinguishedName, SignatureScheme, SupportedCipherSuite,
};

/// The TLS security upgrade (`/tls/1.0.0`).
#[derive(Clone)]
pub struct Config {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("tls::Config")
            .field("suites", &suites())
            .finish()
    }
}

/// Why a TLS upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate for our key could not be made.
    #[error("cannot make the TLS certificate: {0}")]
    Certificate(#[from] certificate::GenError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The handshake failed (including a certificate that fails libp2p's checks).
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    /// The peer's certificate is not a libp2p certificate.
    #[error("the peer's TLS certificate: {0}")]
    BadCertificate(#[from] certificate::ParseError),
    /// The peer did not present exactly one certificate.
    #[error("the peer presented {0} certificates; libp2p requires exactly one")]
    CertificateCount(usize),
}

/// The cipher suites in our order of preference: AES-GCM first where the CPU accelerates it.
fn suites() -> Vec<SupportedCipherSuite> {
    let aes = [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384];
    if aes_accelerated() {
        aes.into_iter()
            .chain([TLS13_CHACHA20_POLY1305_SHA256])
            .collect()
    } else {
        std::iter::once(TLS13_CHACHA20_POLY1305_SHA256)
            .chain(aes)
            .collect()
    }
}

fn aes_accelerated() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The name of the suite a TLS session agreed on (for tests and logs).
pub fn negotiated_suite(state: &CommonState) -> Option<String> {
    state
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
}

impl Config {
    /// A configuration whose certificate carries `identity`'s signature.
    pub fn new(identity: &Keypair) -> Result<Self, TlsError> {
        let (cert, key) = certificate::generate(identity)?;
        let provider = Arc::new(CryptoProvider {
            cipher_suites: suites(),
            ..rustls::crypto::aws_lc_rs::default_provider()
        });
        let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        // Our own resolver: rustls's `with_single_cert` parses the certificate with webpki,
        // which refuses libp2p's critical extension.
        let signing = provider.key_provider.load_private_key(key)?;
        let ours = Arc::new(OurCertificate(Arc::new(rustls::sign::CertifiedKey::new(
            vec![cert],
            signing,
        ))));
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Libp2pVerifier))
            .with_client_cert_resolver(ours.clone());
        client.alpn_protocols = vec![ALPN.to_vec()];
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(Arc::new(Libp2pVerifier))
            .with_cert_resolver(ours);
        server.alpn_protocols = vec![ALPN.to_vec()];
        server.ignore_client_order = true;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

const ALPN: &[u8] = b"libp2p";

/// Encrypted bytes rustls may hold before the socket takes them (its default is 64 KiB).
/// A whole yamux frame ([`crate::mux::FRAME_SIZE`]) then goes to the socket in one `writev`
/// instead of four or more.
const SEND_BUFFER: usize = crate::mux::FRAME_SIZE + 64 * 1024;

/// Presents our one certificate, whatever the peer asks for.
#[derive(Debug)]
struct OurCertificate(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for OurCertificate {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for OurCertificate {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once("/tls/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, futures_rustls::TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            let mut stream = futures_rustls::TlsAcceptor::from(self.server)
                .accept(socket)
                .await
                .map_err(TlsError::Handshake)?;
            stream.get_mut().1.set_buffer_limit(Some(SEND_BUFFER));
            let peer = peer_of(stream.get_ref().1)?;
            tracing::debug!(%peer, suite = ?negotiated_suite(stream.get_ref().1), "TLS accepted");
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, futures_rustls::TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            // The spec: clients MUST NOT send a server name; an unspecified address sends none.
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
            let mut stream = futures_rustls::TlsConnector::from(self.client)
                .connect(name, socket)
                .await
                .map_err(TlsError::Handshake)?;
            stream.get_mut().1.set_buffer_limit(Some(SEND_BUFFER));
            let peer = peer_of(stream.get_ref().1)?;
            tracing::debug!(%peer, suite = ?negotiated_suite(stream.get_ref().1), "TLS dialed");
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

/// The peer id in the (already verified) certificate the peer presented.
fn peer_of(state: &CommonState) -> Result<PeerId, TlsError> {
    match state.peer_certificates() {
        Some([cert]) => Ok(certificate::parse(cert)?.peer_id()),
        other => Err(TlsError::CertificateCount(other.map_or(0, <[_]>::len))),
    }
}

/// libp2p's certificate rules, for both sides: exactly one certificate, self-signed, with a
/// valid libp2p extension (checked by `certificate::parse`); handshake signatures made with
/// the certificate's key. Which peer id the dialer expected is checked by the swarm.
#[derive(Debug)]
struct Libp2pVerifier;

impl Libp2pVerifier {
    fn check(
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "libp2p TLS requires exactly one certificate".into(),
            ));
        }
        certificate::parse(end_entity)?;
        Ok(())
    }

    fn signature(
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        certificate::parse(cert)?.verify_signature(dss.scheme, message, dss.signature())?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn schemes() -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA512,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA256,
        ]
    }

    fn tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("libp2p TLS is TLS 1.3 only".into()))
    }
}

/// The handshake-signature half of both verifier traits (the same for either side).
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Self::tls12()
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Self::signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            Self::schemes()
        }
    };
}

impl ServerCertVerifier for Libp2pVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _: &ServerName,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::check(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

impl ClientCertVerifier for Libp2pVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    /// Runs a handshake between `dialer` and `listener` over loopback TCP.
    async fn handshake<D, L>(
        dialer: D,
        listener: L,
    ) -> (
        Result<(PeerId, Option<String>), String>,
        Result<PeerId, String>,
    )
    where
        D: OutboundConnectionUpgrade<
                tokio_util::compat::Compat<tokio::net::TcpStream>,
                Info = &'static str,
                Output = (
                    PeerId,
                    futures_rustls::TlsStream<tokio_util::compat::Compat<tokio::net::TcpStream>>,
                ),
            > + Send
            + 'static,
        D::Error: std::fmt::Display,
        D::Future: Send,
        L: InboundConnectionUpgrade<
                tokio_util::compat::Compat<tokio::net::TcpStream>,
                Info = &'static str,
                Output = (
                    PeerId,
                    futures_rustls::TlsStream<tokio_util::compat::Compat<tokio::net::TcpStream>>,
                ),
            > + Send
            + 'static,
        L::Error: std::fmt::Display,
        L::Future: Send,
    {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (socket, _) = server.accept().await.unwrap();
            listener
                .upgrade_inbound(socket.compat(), "/tls/1.0.0")
                .await
                .map(|(peer, _)| peer)
                .map_err(|e| e.to_string())
        });
        let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let dialed = dialer
            .upgrade_outbound(socket.compat(), "/tls/1.0.0")
            .await
            .map(|(peer, stream)| {
                let suite = match &stream {
                    futures_rustls::TlsStream::Client(s) => negotiated_suite(s.get_ref().1),
                    futures_rustls::TlsStream::Server(s) => negotiated_suite(s.get_ref().1),
                };
                (peer, suite)
            })
            .map_err(|e| e.to_string());
        (dialed, accept.await.unwrap())
    }

    fn preferred() -> &'static str {
        if aes_accelerated() {
            "TLS13_AES_128_GCM_SHA256"
        } else {
            "TLS13_CHACHA20_POLY1305_SHA256"
        }
    }

    #[tokio::test]
    async fn both_sides_learn_the_other_peer_and_agree_on_the_preferred_suite() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (dialed, accepted) =
            handshake(Config::new(&a).unwrap(), Config::new(&b).unwrap()).await;
        let (peer, suite) = dialed.unwrap();
        assert_eq!(peer, b.public().to_peer_id());
        assert_eq!(accepted.unwrap(), a.public().to_peer_id());
        assert_eq!(suite.as_deref(), Some(preferred()));
    }

    #[tokio::test]
    async fn stock_libp2p_tls_peers_interoperate_in_both_directions_with_our_preference() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        // We dial a stock listener: it follows our (the client's) order.
        let (dialed, accepted) = handshake(
            Config::new(&a).unwrap(),
            libp2p::tls::Config::new(&b).unwrap(),
        )
        .await;
        let (peer, suite) = dialed.unwrap();
        assert_eq!(peer, b.public().to_peer_id());
        assert_eq!(accepted.unwrap(), a.public().to_peer_id());
        assert_eq!(suite.as_deref(), Some(preferred()));
        // A stock dialer (ChaCha20 first) reaches us: we pick by our order.
        let (dialed, accepted) = handshake(
            libp2p::tls::Config::new(&a).unwrap(),
            Config::new(&b).unwrap(),
        )
        .await;
        let (peer, suite) = dialed.unwrap();
        assert_eq!(peer, b.public().to_peer_id());
        assert_eq!(accepted.unwrap(), a.public().to_peer_id());
        assert_eq!(suite.as_deref(), Some(preferred()));
    }

    #[tokio::test]
    async fn a_certificate_without_the_libp2p_extension_is_refused() {
        // A plain self-signed certificate (no libp2p extension, so no host key signature).
        let plain = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(plain.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut impostor = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Libp2pVerifier))
            .with_client_cert_resolver(Arc::new(OurCertificate(Arc::new(
                rustls::sign::CertifiedKey::new(
                    vec![plain.cert.der().clone()],
                    rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).unwrap(),
                ),
            ))));
        impostor.alpn_protocols = vec![ALPN.to_vec()];
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let ours = Config::new(&Keypair::generate_ed25519()).unwrap();
        let accept = tokio::spawn(async move {
            let (socket, _) = server.accept().await.unwrap();
            ours.upgrade_inbound(socket.compat(), "/tls/1.0.0").await
        });
        let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
        let _ = futures_rustls::TlsConnector::from(Arc::new(impostor))
            .connect(name, socket.compat())
            .await;
        let refused = accept.await.unwrap().map(|(peer, _)| peer);
        assert!(
            matches!(refused, Err(TlsError::Handshake(_))),
            "{refused:?}"
        );
    }
}
