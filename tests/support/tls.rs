//! Certificates made at test time (rcgen) and TLS clients: curl and
//! `openssl s_client` as the real clients, and a rustls client that reports
//! what the server presented (certificate, ALPN, version).

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// A certificate chain file and its key file.
#[derive(Clone, Debug)]
pub(crate) struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPair {
    /// The leaf certificate, DER.
    pub(crate) fn leaf_der(&self) -> Vec<u8> {
        CertificateDer::pem_file_iter(&self.cert)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    }

    pub(crate) fn cert_str(&self) -> &str {
        self.cert.to_str().unwrap()
    }

    pub(crate) fn key_str(&self) -> &str {
        self.key.to_str().unwrap()
    }
}

/// A private CA issuing server and client certificates into a directory.
pub(crate) struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM), for clients and servers to trust.
    pub ca_path: PathBuf,
}

fn write_atomically(path: &Path, text: &str) {
    // Replace by rename, as certificate tooling does, so a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

impl Pki {
    /// A new CA named `name`, its certificate written to `dir/<name>-ca.pem`.
    pub(crate) fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_path = dir.join(format!("{name}-ca.pem"));
        write_atomically(&ca_path, &ca.pem());
        Pki {
            dir: dir.to_owned(),
            ca,
            ca_path,
        }
    }

    fn issue(
        &self,
        stem: &str,
        cn: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> CertPair {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let pair = CertPair {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        };
        write_atomically(&pair.key, &key.serialize_pem());
        write_atomically(&pair.cert, &cert.pem());
        pair
    }

    /// A server certificate for `names` (DNS names or IPs), written to `<stem>.pem`/`.key`
    /// (replacing any earlier one: a renewal).
    pub(crate) fn server(&self, stem: &str, names: &[&str]) -> CertPair {
        self.issue(stem, names[0], names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `cn`.
    pub(crate) fn client(&self, stem: &str, cn: &str) -> CertPair {
        self.issue(stem, cn, &[cn], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// What the server presented in a handshake.
pub(crate) struct Handshake {
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
    pub leaf: Vec<u8>,
    pub alpn: Option<Vec<u8>>,
}

/// A rustls handshake with `addr`, asking for `server_name`, trusting `ca`,
/// offering `alpn`, presenting `identity` if given.
pub(crate) async fn handshake(
    addr: SocketAddr,
    server_name: &str,
    ca: &Path,
    alpn: &[&[u8]],
    identity: Option<&CertPair>,
) -> std::io::Result<Handshake> {
    let spec = shardgate::tls::ClientTls {
        ca: Some(ca.to_owned()),
        identity: identity.map(|p| shardgate::tls::CertFiles {
            cert: p.cert.clone(),
            key: p.key.clone(),
        }),
    };
    let config = shardgate::tls::client_config(&spec, alpn).unwrap();
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::clone(&config)).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))??;
    let (_, conn) = stream.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let alpn = conn.alpn_protocol().map(|p| p.to_vec());
    Ok(Handshake { stream, leaf, alpn })
}

/// An HTTP/1.1 keep-alive connection over an established TLS stream.
pub(crate) async fn http1(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// What a command-line client printed.
#[derive(Debug)]
pub(crate) struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub(crate) fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

async fn run(program: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} not found ({e}): scripts/test installs it"));
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish"))
        .unwrap();
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run curl with a 10 s limit; `-w` output lands at the end of stdout.
pub(crate) async fn curl(args: &[&str]) -> Output {
    let mut all = vec!["-sS", "--max-time", "10"];
    all.extend_from_slice(args);
    run("curl", &all).await
}

/// curl `https://<name>:<port><path>` with `name` resolved to `addr`, trusting `ca`.
pub(crate) async fn curl_https(addr: SocketAddr, name: &str, ca: &Path, path: &str) -> Output {
    let port = addr.port();
    curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &format!("{name}:{port}:{}", addr.ip()),
        &format!("https://{name}:{port}{path}"),
    ])
    .await
}

/// Run `openssl s_client` against `addr` with extra arguments; stdin is empty,
/// so it disconnects right after the handshake.
pub(crate) async fn s_client(addr: SocketAddr, args: &[&str]) -> Output {
    let connect = addr.to_string();
    let mut all = vec!["s_client", "-connect", &connect];
    all.extend_from_slice(args);
    run("openssl", &all).await
}
