//! TLS termination: the rustls server config (h2 and http/1.1 by ALPN) and the certificate it
//! serves, held so that a new pair can replace it without a restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::read_key_file;
use crate::metrics::{Metrics, ReloadLabels};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds a damaged PEM certificate: {source}")]
    BadCertificate {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: certificate {position} of the chain (counting from 1, the server's first) is not an X.509 certificate, or is damaged")]
    Unparsable { path: PathBuf, position: usize },
    #[error("{path} holds an encrypted private key, whose passphrase portcullis cannot ask for: decrypt it (`openssl pkey -in KEY -out KEY.plain`) and keep it as a Secret")]
    EncryptedKey { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("the key in {path} is not usable: {source}")]
    BadKey {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("the certificate and the key do not belong together: {0}")]
    Mismatch(rustls::Error),
    #[error("the server's certificate (the chain's first) cannot be served: {0} (rustls serves X.509 v3 certificates without unknown critical extensions)")]
    Unservable(rustls::Error),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Installs the process-wide crypto provider once; rustls and the Redis TLS client need it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// What the two files hold now.
fn fingerprint(cert: &Path, key: &Path) -> Option<Fingerprint> {
    Some((read_key_file(cert).ok()?, read_key_file(key).ok()?))
}

/// Reads a PEM certificate chain and private key into a signing key rustls can serve.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        read_key_file(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    // A damaged block fails the load rather than being left out: a chain without its
    // intermediate still matches the key, and would fail only the clients that need it.
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::BadCertificate {
            path: cert.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    // Well-formed PEM can still carry DER no client can parse: served, it would fail every
    // handshake (or every one that needs that intermediate).
    if let Some(index) = chain.iter().position(|der| !is_certificate_der(der)) {
        return Err(TlsError::Unparsable {
            path: cert.to_path_buf(),
            position: index + 1,
        });
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        // No passphrase can be asked for; "no key" would send the operator looking elsewhere.
        let encrypted = [
            &b"ENCRYPTED PRIVATE KEY-----"[..],
            b"Proc-Type: 4,ENCRYPTED",
        ]
        .iter()
        .any(|mark| key_pem.windows(mark.len()).any(|w| w == *mark));
        let path = key.to_path_buf();
        if encrypted {
            TlsError::EncryptedKey { path }
        } else {
            TlsError::NoKey { path }
        }
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(private)
        .map_err(|source| TlsError::BadKey {
            path: key.to_path_buf(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch(e),
        // The leaf is read by rustls (as webpki reads it) before the keys are compared.
        other => TlsError::Unservable(other),
    })?;
    Ok(certified)
}

/// Whether `der` is one X.509 certificate, read whole (and nothing after it). What it says (its
/// version, its extensions) is left to the clients, whose rules differ: a strict reader such as
/// webpki refuses v1 intermediates and unknown critical extensions that clients take.
fn is_certificate_der(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(rest, _)| rest.is_empty())
}

/// The certificate currently served. Each handshake asks for it anew, so a [`CertStore::reload`]
/// takes effect on the next handshake while established connections carry on.
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The file contents last tried (loaded or refused), so that the watcher reloads each
    /// change once, whoever noticed it first.
    tried: std::sync::Mutex<Option<Fingerprint>>,
}

type Fingerprint = (Vec<u8>, Vec<u8>);

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    pub fn open(cert_path: &Path, key_path: &Path) -> Result<Arc<CertStore>, TlsError> {
        let tried = fingerprint(cert_path, key_path);
        let key = load_certified_key(cert_path, key_path)?;
        Ok(Arc::new(CertStore {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(Arc::new(key)),
            tried: std::sync::Mutex::new(tried),
        }))
    }

    /// Re-reads the files. A pair that does not load leaves the old one serving.
    pub fn reload(&self) -> Result<(), TlsError> {
        let seen = fingerprint(&self.cert_path, &self.key_path);
        match self.tried.lock() {
            Ok(mut tried) => *tried = seen,
            Err(poisoned) => *poisoned.into_inner() = seen,
        }
        let key = load_certified_key(&self.cert_path, &self.key_path)?;
        match self.current.write() {
            Ok(mut current) => *current = Arc::new(key),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(key),
        }
        Ok(())
    }

    pub fn paths(&self) -> (&Path, &Path) {
        (&self.cert_path, &self.key_path)
    }

    /// Reloads and reports the outcome in the log and metrics; the old pair keeps serving on
    /// failure.
    pub fn reload_logged(&self, why: &str, metrics: &Metrics) -> bool {
        match self.reload() {
            Ok(()) => {
                tracing::info!(reason = why, cert = %self.cert_path.display(), "TLS certificate reloaded");
                metrics
                    .certificate_reloads
                    .get_or_create(&ReloadLabels { outcome: "ok" })
                    .inc();
                true
            }
            Err(e) => {
                tracing::error!(reason = why, error = %e, "TLS certificate reload failed; still serving the previous certificate");
                metrics
                    .certificate_reloads
                    .get_or_create(&ReloadLabels { outcome: "error" })
                    .inc();
                false
            }
        }
    }

    /// True when the files differ from what was last tried; files that cannot be read count
    /// as one more state, so that losing them is reported once.
    fn changed(&self) -> bool {
        let now = fingerprint(&self.cert_path, &self.key_path);
        let tried = match self.tried.lock() {
            Ok(tried) => tried.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        now != tried
    }

    /// Checks the files every `interval` and reloads when their contents change (Kubernetes
    /// rewrites mounted secrets by swapping a symlink, which path reads follow). A pair that
    /// fails to load is not retried until the files change again.
    pub async fn watch(self: Arc<Self>, interval: Duration, metrics: Arc<Metrics>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.changed() {
                self.reload_logged("files changed", &metrics);
            }
        }
    }

    fn current(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The rustls server config: TLS 1.2 and 1.3, ALPN h2 then http/1.1.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// TLS over loopback for unit tests: configs that trust each other, socket pairs whose buffers
/// are small enough for TLS to hold records back, and the paused message the flush tests send
/// across them.
#[cfg(test)]
pub(crate) mod for_tests {
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::net::{TcpSocket, TcpStream};

    /// The name the server's certificate is for.
    pub(crate) const NAME: &str = "upstream.test";

    /// Runs `openssl ARGS` in `dir` (keys and certificates in forms rcgen does not make).
    pub(crate) fn openssl(dir: &std::path::Path, args: &[&str]) {
        let made = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl must be installed");
        assert!(made.success(), "openssl {args:?}");
    }

    /// A server config with a certificate for [`NAME`] from a fresh test CA, and a client config
    /// that trusts that CA alone.
    pub(crate) fn configs() -> (rustls::ServerConfig, rustls::ClientConfig) {
        super::install_crypto_provider();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![NAME.to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, client)
    }

    pub(crate) fn server_name() -> ServerName<'static> {
        ServerName::try_from(NAME).unwrap()
    }

    /// A connected pair `(sender, receiver)`, the sender's send buffer and the receiver's
    /// receive buffer set small (the kernel then does not grow them). Between them they hold a
    /// few KiB, far less than the records TLS keeps back (up to 64 KiB) when the socket will
    /// take no more. The sender is the connecting end (as an upstream client is) when
    /// `sender_connects`, else the accepting end (as a server is).
    pub(crate) async fn small_buffered_pair(sender_connects: bool) -> (TcpStream, TcpStream) {
        const SMALL: u32 = 4096;
        let listening = TcpSocket::new_v4().unwrap();
        let connecting = TcpSocket::new_v4().unwrap();
        if sender_connects {
            connecting.set_send_buffer_size(SMALL).unwrap();
            listening.set_recv_buffer_size(SMALL).unwrap();
        } else {
            listening.set_send_buffer_size(SMALL).unwrap();
            connecting.set_recv_buffer_size(SMALL).unwrap();
        }
        listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listening.listen(1).unwrap();
        let (connected, accepted) = tokio::join!(
            connecting.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (connected, accepted) = (connected.unwrap(), accepted.unwrap().0);
        if sender_connects {
            (connected, accepted)
        } else {
            (accepted, connected)
        }
    }

    /// A body that yields what is sent on the returned sender, and ends when it is dropped.
    pub(crate) fn fed_body() -> (tokio::sync::mpsc::Sender<bytes::Bytes>, crate::Body) {
        let (feed, fed) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
        let body =
            http_body_util::StreamBody::new(futures_util::stream::unfold(fed, |mut fed| async {
                let data = fed.recv().await?;
                let frame = hyper::body::Frame::data(data);
                Some((Ok::<_, std::convert::Infallible>(frame), fed))
            }));
        (feed, crate::Body::new(body))
    }

    /// Reads one message off `io`: a head, then a body of `first + 1` bytes, saying on
    /// `first_arrived` once `first` of them have come (the sender holds back the last byte
    /// until then). Returns the head.
    pub(crate) async fn read_paused_message<R>(
        io: &mut R,
        first: usize,
        first_arrived: tokio::sync::oneshot::Sender<()>,
    ) -> String
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        use tokio::io::AsyncReadExt;
        let mut all = Vec::new();
        let mut first_arrived = Some(first_arrived);
        let mut buf = vec![0u8; 4096];
        loop {
            let n = io.read(&mut buf).await.unwrap();
            assert!(n > 0, "the message ended early");
            all.extend_from_slice(&buf[..n]);
            let Some(head_end) = all.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let body = all.len() - (head_end + 4);
            if body >= first {
                if let Some(tell) = first_arrived.take() {
                    tell.send(()).unwrap();
                }
            }
            if body == first + 1 {
                return String::from_utf8_lossy(&all[..head_end]).into_owned();
            }
        }
    }

    /// The TLS handshake over a connected pair, `client_io` the client's end.
    pub(crate) async fn handshake<C>(
        client_io: C,
        server_io: TcpStream,
    ) -> (
        tokio_rustls::client::TlsStream<C>,
        tokio_rustls::server::TlsStream<TcpStream>,
    )
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (server, client) = configs();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (client, server) = tokio::join!(
            connector.connect(server_name(), client_io),
            acceptor.accept(server_io)
        );
        (client.unwrap(), server.unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encrypted_key_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let pair = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&pair)
            .unwrap();
        let cert_path = dir.path().join("tls.crt");
        let plain = dir.path().join("plain.key");
        let encrypted = dir.path().join("tls.key");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&plain, pair.serialize_pem()).unwrap();
        assert!(load_certified_key(&cert_path, &plain).is_ok());
        for_tests::openssl(
            dir.path(),
            &[
                "pkcs8",
                "-topk8",
                "-v2",
                "aes-256-cbc",
                "-passout",
                "pass:x",
                "-in",
                "plain.key",
                "-out",
                "tls.key",
            ],
        );
        let err = load_certified_key(&cert_path, &encrypted).unwrap_err();
        assert!(matches!(err, TlsError::EncryptedKey { .. }), "{err}");
        assert!(err.to_string().contains("encrypted private key"), "{err}");
    }

    #[test]
    fn a_certificate_is_read_whole() {
        let pair = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&pair)
            .unwrap();
        let der = cert.der().to_vec();
        assert!(is_certificate_der(&der));
        // SEQUENCE { INTEGER 0 }: DER, but no certificate.
        assert!(!is_certificate_der(&[0x30, 0x03, 0x02, 0x01, 0x00]));
        assert!(!is_certificate_der(&der[..der.len() - 1]), "cut short");
        assert!(
            !is_certificate_der(&[der.as_slice(), &[0]].concat()),
            "a byte over"
        );
        assert!(!is_certificate_der(&[]));
        // A length inside the signed part off by one: the outer frame still fits.
        let mut damaged = der.clone();
        // The signed part's first element: [0] EXPLICIT version, 0xA0 0x03 0x02 0x01 0x02.
        let at = damaged
            .windows(5)
            .position(|w| w == [0xA0, 0x03, 0x02, 0x01, 0x02])
            .expect("a v3 version field");
        damaged[at + 1] = 0x04;
        assert!(!is_certificate_der(&damaged), "inner length");
        // A certificate request has a certificate's outer shape, but is none.
        let csr = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .serialize_request(&pair)
            .unwrap();
        assert!(!is_certificate_der(csr.der()), "a CSR");
    }

    /// Certificates some clients take and a strict parser would not: in a chain, what they are
    /// worth is the clients' to judge. (The leaf is matched with the key by rustls, which reads
    /// it as webpki does.)
    #[test]
    fn a_version_1_intermediate_or_an_unknown_critical_extension_loads() {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| for_tests::openssl(dir.path(), args);
        openssl(&["genrsa", "-out", "k.pem", "2048"]);
        openssl(&[
            "req",
            "-new",
            "-key",
            "k.pem",
            "-subj",
            "/CN=a.test",
            "-out",
            "r.csr",
        ]);
        openssl(&[
            "x509", "-req", "-in", "r.csr", "-signkey", "k.pem", "-out", "v1.pem",
        ]);
        openssl(&[
            "req",
            "-x509",
            "-key",
            "k.pem",
            "-subj",
            "/CN=a.test",
            "-addext",
            "certificatePolicies=critical,1.2.3.4",
            "-out",
            "critical.pem",
        ]);
        openssl(&[
            "req",
            "-x509",
            "-key",
            "k.pem",
            "-subj",
            "/CN=a.test",
            "-out",
            "leaf.pem",
        ]);
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        let v1 = read("v1.pem");
        assert!(is_certificate_der(
            CertificateDer::from_pem_slice(v1.as_bytes())
                .unwrap()
                .as_ref()
        ));
        let chain = dir.path().join("chain.pem");
        std::fs::write(&chain, read("leaf.pem") + &v1 + &read("critical.pem")).unwrap();
        let loaded = load_certified_key(&chain, &dir.path().join("k.pem"));
        assert!(loaded.is_ok(), "{:?}", loaded.err());
        // As the server's own certificate, a v1 one is rustls' to refuse: said as such, not
        // as a key that does not belong to it.
        let err =
            load_certified_key(&dir.path().join("v1.pem"), &dir.path().join("k.pem")).unwrap_err();
        assert!(matches!(err, TlsError::Unservable(_)), "{err}");
    }

    #[test]
    fn a_file_that_is_no_key_is_not_read_whole() {
        let err = load_certified_key(Path::new("/dev/zero"), Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("larger than 4 MiB"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; 4 * 1024 * 1024 + 1]).unwrap();
        let err = load_certified_key(&big, &big).unwrap_err();
        assert!(err.to_string().contains("larger than 4 MiB"), "{err}");
    }
}
