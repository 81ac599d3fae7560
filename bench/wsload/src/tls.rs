//! TLS for wsload's wss:// and https:// URLs: a rustls client (ring, TLS 1.3 only) that accepts
//! the run's self-signed certificate (no chain or name check; the handshake signature is still
//! verified), and one stream type for plain and TLS connections.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::ring::kx_group;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Accepts any certificate: every target presents the run's self-signed one.
#[derive(Debug)]
struct AcceptRunCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptRunCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS 1.3 client config offering ALPN `http/1.1` and caching up to `sessions` sessions
/// (0: no resumption) in a store of its own.
pub fn client_config(sessions: usize) -> Arc<ClientConfig> {
    // ring's provider is deprecated for lacking post-quantum key exchange, and since rustls
    // 0.23.48 it lists P-384 first. Key shares in the order OpenSSL clients (wrk, h2load) and
    // browsers send them: X25519, then P-256; P-384 last. (A P-384 share made every handshake
    // cost an OpenSSL server ~4 ms of CPU, against ~0.5 ms with X25519.)
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    let provider = Arc::new(provider);
    let mut c = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with ring")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptRunCert(provider)))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    c.resumption = if sessions == 0 {
        Resumption::disabled()
    } else {
        Resumption::in_memory_sessions(sessions)
    };
    Arc::new(c)
}

/// The server name for a host: an IP address sends no SNI (RFC 6066), a name does.
pub fn server_name(host: &str) -> ServerName<'static> {
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("localhost").unwrap())
}

/// A client connection, plain or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// TCP connect (nodelay) to `addr`, then a TLS handshake when `tls` is given.
    pub async fn connect(
        addr: &str,
        tls: Option<(&Arc<ClientConfig>, &ServerName<'static>)>,
    ) -> Result<Conn, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| format!("tcp: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match tls {
            None => Ok(Conn::Plain(tcp)),
            Some((cfg, name)) => {
                let s = TlsConnector::from(cfg.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("tls: {e}"))?;
                Ok(Conn::Tls(Box::new(s)))
            }
        }
    }

    /// The TLS version, cipher suite and key exchange group negotiated ("-" for plain TCP).
    pub fn describe(&self) -> String {
        match self {
            Conn::Plain(_) => "-".into(),
            Conn::Tls(s) => {
                let c = s.get_ref().1;
                format!(
                    "{:?} {:?} {:?}",
                    c.protocol_version(),
                    c.negotiated_cipher_suite().map(|s| s.suite()),
                    c.negotiated_key_exchange_group().map(|g| g.name())
                )
            }
        }
    }

    /// True when the TLS handshake resumed a session.
    pub fn resumed(&self) -> bool {
        match self {
            Conn::Plain(_) => false,
            Conn::Tls(s) => s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
