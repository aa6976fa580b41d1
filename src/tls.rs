//! TLS with rustls and the ring provider: server configurations (TLS 1.2 and
//! 1.3 only, ALPN, SNI selection among several certificates, optional client
//! certificates) and client configurations (upstreams, coordinators, agents).

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TLS file or setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file is unreadable or holds no certificate.
    #[error("certificate {path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A key file is unreadable or holds no usable key.
    #[error("private key {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The certificate and key do not belong together, or rustls refused them.
    #[error("{0}")]
    Config(String),
}

/// A certificate chain and its key, as files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl CertFiles {
    /// A chain and key from configured paths.
    pub fn new(cert: &str, key: &str) -> CertFiles {
        CertFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        }
    }
}

/// What a TLS listener serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    /// Served when the client names no server, or one not listed in `sni`.
    pub default: CertFiles,
    /// Certificates chosen by the server name the client asks for.
    pub sni: Vec<(Vec<String>, CertFiles)>,
    /// Require client certificates signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// One certificate for every name; client certificates from `client_ca`
    /// are required unless it is empty.
    pub fn single(cert: &str, key: &str, client_ca: &str) -> ServerTls {
        ServerTls {
            default: CertFiles::new(cert, key),
            sni: Vec::new(),
            client_ca: (!client_ca.is_empty()).then(|| PathBuf::from(client_ca)),
        }
    }
}

/// How a client verifies servers and, optionally, proves who it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// Trust only this CA; `None`: the system's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate to present (mTLS).
    pub identity: Option<CertFiles>,
}

/// The crypto provider everything uses: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 and 1.2 only; anything older is refused during the handshake.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Certificate {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate found".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn certified(files: &CertFiles, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    CertifiedKey::from_der(certs, key, provider)
        .map(Arc::new)
        .map_err(|e| {
            TlsError::Config(format!(
                "{} and {}: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })
}

fn roots(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in load_certs(path)? {
                store.add(cert).map_err(|e| TlsError::Certificate {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err(TlsError::Config(
                    "no system root certificates found; configure a CA file".into(),
                ));
            }
        }
    }
    Ok(store)
}

/// Picks a certificate by SNI, falling back to the default.
struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("names", &self.by_name.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()))
            .unwrap_or(&self.default);
        Some(chosen.clone())
    }
}

/// A server configuration offering `alpn` (e.g. `h2`, `http/1.1`), in that order.
pub fn server_config(
    spec: &ServerTls,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let default = certified(&spec.default, &provider)?;
    let mut by_name = HashMap::new();
    for (names, files) in &spec.sni {
        let key = certified(files, &provider)?;
        for n in names {
            by_name.insert(n.to_ascii_lowercase(), key.clone());
        }
    }
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &spec.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(Some(ca))?), provider)
                    .build()
                    .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver { by_name, default }));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client configuration verifying servers per `spec`, offering `alpn`.
pub fn client_config(
    spec: &ClientTls,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(spec.ca.as_deref())?);
    let mut config = match &spec.identity {
        Some(files) => builder
            .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
            .map_err(|e| {
                TlsError::Config(format!("client certificate {}: {e}", files.cert.display()))
            })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// ALPN for HTTP listeners and clients: HTTP/2 preferred, then HTTP/1.1.
pub const ALPN_H2_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
/// ALPN for HTTP/2 only (gRPC).
pub const ALPN_H2: &[&[u8]] = &[b"h2"];
/// ALPN for HTTP/1.1 only.
pub const ALPN_H1: &[&[u8]] = &[b"http/1.1"];

/// Why a client connection never got past the TLS handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client spoke plain HTTP to the TLS port; the stream is handed back
    /// so the caller may answer in kind before closing.
    #[error("plain HTTP sent to a TLS port")]
    PlainHttp(tokio::net::TcpStream),
    /// The handshake did not finish within the deadline.
    #[error("TLS handshake not finished within {0:?}")]
    Timeout(Duration),
    /// The handshake failed (bad hello, refused version, no client certificate...).
    #[error("TLS handshake failed: {0}")]
    Failed(#[from] std::io::Error),
}

/// Terminates TLS on one listener; the certificates in force can be swapped
/// (SIGHUP) without touching established connections.
pub struct Terminator {
    spec: std::sync::Mutex<ServerTls>,
    alpn: &'static [&'static [u8]],
    current: ArcSwap<rustls::ServerConfig>,
    handshake_timeout: Duration,
}

impl fmt::Debug for Terminator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Terminator")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl Terminator {
    /// Load `spec`'s certificates; fails on anything unusable.
    pub fn new(
        spec: &ServerTls,
        alpn: &'static [&'static [u8]],
        handshake_timeout: Duration,
    ) -> Result<Arc<Terminator>, TlsError> {
        Ok(Arc::new(Terminator {
            current: ArcSwap::new(server_config(spec, alpn)?),
            spec: std::sync::Mutex::new(spec.clone()),
            alpn,
            handshake_timeout,
        }))
    }

    /// Re-read the certificate files (of `spec`, when given, else the ones in
    /// force); on any error the certificates in force stay.
    pub fn reload(&self, spec: Option<&ServerTls>) -> Result<(), TlsError> {
        let mut current_spec = self.spec.lock().unwrap_or_else(|e| e.into_inner());
        let spec = spec.unwrap_or(&current_spec).clone();
        let config = server_config(&spec, self.alpn)?;
        self.current.store(config);
        *current_spec = spec;
        Ok(())
    }

    /// Complete the server side of a handshake on `stream`, within the handshake timeout.
    pub async fn accept(
        &self,
        stream: tokio::net::TcpStream,
    ) -> Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, HandshakeError> {
        let config = self.current.load_full();
        let handshake = async {
            // A TLS connection opens with a handshake record (0x16); a letter
            // is a plain HTTP method, which deserves an answer, not silence.
            let mut first = [0u8; 1];
            let n = stream.peek(&mut first).await?;
            if n == 1 && first[0].is_ascii_uppercase() {
                return Err(HandshakeError::PlainHttp(stream));
            }
            Ok(tokio_rustls::TlsAcceptor::from(config)
                .accept(stream)
                .await?)
        };
        tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| HandshakeError::Timeout(self.handshake_timeout))?
    }
}

/// The client side of TLS to a set of peers (shard nodes): the configuration
/// in force, swapped on reload, and the name their certificates must carry.
pub struct Connector {
    current: ArcSwap<rustls::ClientConfig>,
    spec: ClientTls,
    alpn: &'static [&'static [u8]],
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Parse a configured server name (DNS name or IP address).
pub fn parse_server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned())
        .map_err(|e| TlsError::Config(format!("{name:?} is not a DNS name or IP address: {e}")))
}

impl Connector {
    /// A connector verifying peers per `spec`; `server_name` `None` verifies
    /// each peer against its own IP address.
    pub fn new(
        spec: &ClientTls,
        alpn: &'static [&'static [u8]],
        server_name: Option<&str>,
    ) -> Result<Arc<Connector>, TlsError> {
        Ok(Arc::new(Connector {
            current: ArcSwap::new(client_config(spec, alpn)?),
            spec: spec.clone(),
            alpn,
            server_name: server_name.map(parse_server_name).transpose()?,
        }))
    }

    /// Re-read the CA and identity files; on error the configuration in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.store(client_config(&self.spec, self.alpn)?);
        Ok(())
    }

    /// Whether this connector was built from `spec` and `server_name`.
    pub fn is_for(&self, spec: &ClientTls, server_name: Option<&str>) -> bool {
        let name = server_name
            .map(parse_server_name)
            .transpose()
            .ok()
            .flatten();
        self.spec == *spec && self.server_name == name
    }

    /// Handshake as a client over `stream`, verifying the configured server
    /// name, else `host` (a URL's host), else the peer's IP address.
    pub async fn connect(
        &self,
        stream: TcpStream,
        host: Option<&str>,
        peer: std::net::IpAddr,
    ) -> io::Result<ClientStream> {
        let name = match (&self.server_name, host) {
            (Some(n), _) => n.clone(),
            (None, Some(h)) => parse_server_name(h.trim_start_matches('[').trim_end_matches(']'))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            (None, None) => ServerName::IpAddress(peer.into()),
        };
        tokio_rustls::TlsConnector::from(self.current.load_full())
            .connect(name, stream)
            .await
            .map(|s| ClientStream::Tls(Box::new(s)))
    }
}

/// A client connection, in plain text or TLS.
pub enum ClientStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    /// Boxed: a TLS session is large and rare enough not to size every plain one.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ClientStream {
    /// Whether the peer has sent nothing (no bytes, no close) that the
    /// socket has been told of; never waits. A peek at the TCP socket, so
    /// for TLS a close_notify counts as "something sent".
    pub fn is_quiet(&self) -> bool {
        let tcp = match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(s) => s.get_ref().0,
        };
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        tcp.poll_peek(&mut Context::from_waker(std::task::Waker::noop()), &mut buf)
            .is_pending()
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
