//! Helpers for the observability tests and the tests that run the real binary: an OpenMetrics
//! parser, a capturing tracing subscriber, a test PKI with atomic (Kubernetes-style) file swaps,
//! TLS handshakes that report the served certificate, and the real binary as a child process
//! with its output kept; and, for the tests that compare expiries, a user's sessions key read
//! in Redis at one instant.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------------------------
// OpenMetrics exposition
// ------------------------------------------------------------------------------------------

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: every sample, and the declared type of every metric family.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
    pub saw_eof: bool,
}

fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    // `text` starts just after `{`; returns the labels and the rest after `}`.
    let mut labels = BTreeMap::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("label without '=': {text}"))?;
        let name = rest[..eq].trim().to_string();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {name:?} in {text}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label value not quoted: {text}"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated label value: {text}")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, '\\')) => value.push('\\'),
                    other => return Err(format!("bad escape {other:?} in {text}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.clone(), value).is_some() {
            return Err(format!("label {name} twice in {text}"));
        }
        rest = &rest[end + 1..];
    }
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse().map_err(|e| format!("bad value {text:?}: {e}")),
    }
}

impl Exposition {
    /// Parses OpenMetrics / Prometheus text. Panics on a line it does not understand.
    pub fn parse(text: &str) -> Exposition {
        let mut out = Exposition::default();
        for line in text.lines() {
            if out.saw_eof {
                panic!("content after # EOF: {line:?}");
            }
            if line.is_empty() {
                continue;
            }
            if line == "# EOF" {
                out.saw_eof = true;
                continue;
            }
            if let Some(comment) = line.strip_prefix("# ") {
                let mut words = comment.splitn(3, ' ');
                if words.next() == Some("TYPE") {
                    let name = words.next().expect("TYPE name").to_string();
                    let kind = words.next().expect("TYPE kind").to_string();
                    out.types.insert(name, kind);
                }
                continue;
            }
            let sample = Self::parse_sample(line)
                .unwrap_or_else(|e| panic!("unparsable exposition line {line:?}: {e}"));
            out.samples.push(sample);
        }
        out
    }

    fn parse_sample(line: &str) -> Result<Sample, String> {
        let name_end = line.find(['{', ' ']).ok_or("no value")?;
        let name = line[..name_end].to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("bad metric name {name:?}"));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end + 1..])?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        // `value [timestamp] [# exemplar]`
        let rest = rest.split(" # ").next().unwrap_or("");
        let value = rest.split_whitespace().next().ok_or("no value")?;
        Ok(Sample {
            name,
            labels,
            value: parse_value(value)?,
        })
    }

    /// The value of the sample with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut found = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want);
        let first = found.next()?;
        assert!(found.next().is_none(), "{name}{want:?} appears twice");
        Some(first.value)
    }

    /// As [`Exposition::get`], 0 when the sample is absent (a labelled counter never touched).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Every sample of `name` whose labels include `labels`.
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// Sum of the samples of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }
}

/// Scrapes `GET /metrics` on the admin address and parses it.
pub async fn scrape(admin: SocketAddr) -> Exposition {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status(), 200, "GET /metrics");
    let text = resp.text().await.expect("metrics body");
    Exposition::parse(&text)
}

/// Scrapes until `check` holds (every 20 ms, up to 10 s), returning that exposition.
pub async fn scrape_until(
    admin: SocketAddr,
    what: &str,
    check: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let exposition = scrape(admin).await;
        if check(&exposition) {
            return exposition;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last scrape: {:#?}",
            exposition.samples
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------------------------------
// Capturing tracing subscriber
// ------------------------------------------------------------------------------------------

/// One event as the capturing subscriber saw it.
#[derive(Debug, Clone)]
pub struct Captured {
    pub target: String,
    pub level: tracing::Level,
    /// The event's own fields (`message` included), values as displayed/debugged.
    pub fields: BTreeMap<String, String>,
    /// Fields of every span in the event's scope, root first (inner spans override).
    pub span_fields: BTreeMap<String, String>,
    /// Names of the spans in scope, root first.
    pub spans: Vec<String>,
}

impl Captured {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    pub fn span_field(&self, name: &str) -> Option<&str> {
        self.span_fields.get(name).map(String::as_str)
    }

    /// Every name and value this event carries, its spans' included.
    pub fn all_text(&self) -> String {
        let mut text = format!("{} {} ", self.target, self.spans.join(" "));
        for (k, v) in self.fields.iter().chain(self.span_fields.iter()) {
            text.push_str(k);
            text.push('=');
            text.push_str(v);
            text.push(' ');
        }
        text
    }
}

#[derive(Default)]
struct FieldMap(BTreeMap<String, String>);

impl tracing::field::Visit for FieldMap {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

/// Everything captured: events, and every span field ever recorded (for leak checks).
#[derive(Default)]
pub struct Capture {
    pub events: Mutex<Vec<Captured>>,
    pub span_records: Mutex<Vec<(String, BTreeMap<String, String>)>>,
}

struct CaptureLayer(Arc<Capture>);

impl<S> tracing_subscriber::Layer<S> for CaptureLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = FieldMap::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            self.0
                .span_records
                .lock()
                .unwrap()
                .push((span.name().to_string(), fields.0.clone()));
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut recorded = FieldMap::default();
        values.record(&mut recorded);
        if let Some(span) = ctx.span(id) {
            self.0
                .span_records
                .lock()
                .unwrap()
                .push((span.name().to_string(), recorded.0.clone()));
            let mut ext = span.extensions_mut();
            match ext.get_mut::<FieldMap>() {
                Some(fields) => fields.0.extend(recorded.0),
                None => ext.insert(recorded),
            }
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = FieldMap::default();
        event.record(&mut fields);
        let mut span_fields = BTreeMap::new();
        let mut spans = Vec::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                spans.push(span.name().to_string());
                if let Some(f) = span.extensions().get::<FieldMap>() {
                    span_fields.extend(f.0.clone());
                }
            }
        }
        self.0.events.lock().unwrap().push(Captured {
            target: event.metadata().target().to_string(),
            level: *event.metadata().level(),
            fields: fields.0,
            span_fields,
            spans,
        });
    }
}

/// Installs, once per test binary, a global subscriber that records every event and span of
/// portcullis (all levels) and of the `audit` target.
pub fn capture() -> &'static Arc<Capture> {
    static CAPTURE: OnceLock<Arc<Capture>> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt;
        let capture = Arc::new(Capture::default());
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("portcullis", tracing::Level::TRACE)
            .with_target("audit", tracing::Level::TRACE);
        let subscriber = tracing_subscriber::registry()
            .with(CaptureLayer(capture.clone()))
            .with(filter);
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
        capture
    })
}

impl Capture {
    pub fn events(&self) -> Vec<Captured> {
        self.events.lock().unwrap().clone()
    }

    /// Events matching `pred`, polled (bounded, 5 s) until at least one is there: the access
    /// log and audit events are written just after the response leaves.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Captured) -> bool) -> Vec<Captured> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found: Vec<Captured> = self.events().into_iter().filter(|e| pred(e)).collect();
            if !found.is_empty() {
                return found;
            }
            assert!(Instant::now() < deadline, "no event for {what} within 5 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The access-log events of the request with this id.
    pub async fn access_lines(&self, request_id: &str) -> Vec<Captured> {
        self.wait_for(&format!("the access line of {request_id}"), |e| {
            e.target == "portcullis::access" && e.span_field("request_id") == Some(request_id)
        })
        .await
    }
}

// ------------------------------------------------------------------------------------------
// Test PKI and Kubernetes-style secret volumes
// ------------------------------------------------------------------------------------------

/// A test CA that signs `localhost` leaves.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate and its key, PEM, plus the leaf's DER for comparisons.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "portcullis rotation test CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap())
            .expect("self-signed CA");
        TestCa { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A `localhost` leaf with its own key, serial and common name.
    pub fn leaf(&self, name: &str, serial: u64) -> Leaf {
        use rcgen::{CertificateParams, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: format!("{}{}", cert.pem(), self.issuer.pem()),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// A directory laid out like a Kubernetes secret volume: `cert.pem -> ..data/cert.pem`,
/// `key.pem -> ..data/key.pem`, `..data -> ..<generation>/`. [`SecretVolume::swap`] writes a new
/// generation and renames a new `..data` symlink over the old one, so both files change in one
/// atomic step.
pub struct SecretVolume {
    pub dir: tempfile::TempDir,
    generation: u32,
}

impl SecretVolume {
    pub fn new(cert_pem: &str, key_pem: &str) -> SecretVolume {
        let dir = tempfile::tempdir().unwrap();
        let mut volume = SecretVolume { dir, generation: 0 };
        volume.swap(cert_pem, key_pem);
        std::os::unix::fs::symlink("..data/cert.pem", volume.cert_path()).unwrap();
        std::os::unix::fs::symlink("..data/key.pem", volume.key_path()).unwrap();
        volume
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// Publishes a new pair atomically (new directory, symlink renamed over `..data`).
    pub fn swap(&mut self, cert_pem: &str, key_pem: &str) {
        self.generation += 1;
        let name = format!("..gen_{}", self.generation);
        let generation = self.dir.path().join(&name);
        std::fs::create_dir(&generation).unwrap();
        std::fs::write(generation.join("cert.pem"), cert_pem).unwrap();
        std::fs::write(generation.join("key.pem"), key_pem).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    pub fn tls_section(&self, reload_interval: &str) -> String {
        format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nreload_interval = \"{reload_interval}\"\n",
            self.cert_path().display(),
            self.key_path().display(),
        )
    }
}

// ------------------------------------------------------------------------------------------
// TLS client that reports the served certificate
// ------------------------------------------------------------------------------------------

pub type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A rustls client config trusting only `ca_pem`, offering `alpn`.
pub fn tls_client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A new TLS connection to `addr` as `localhost` (full verification against the test CA).
pub async fn tls_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> TlsStream {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the TLS port");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("TLS handshake within 5 s")
    .expect("TLS handshake")
}

/// The leaf certificate (DER) the server presented on this connection.
pub fn peer_leaf(stream: &TlsStream) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .to_vec()
}

/// The leaf a new handshake gets.
pub async fn served_leaf(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    peer_leaf(&tls_connect(addr, config.clone()).await)
}

/// Polls new handshakes (every 20 ms, up to 10 s) until the server presents `want`.
pub async fn wait_for_leaf(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    want: &[u8],
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_leaf(addr, config).await != want {
        assert!(
            Instant::now() < deadline,
            "new handshakes never got {what} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP/1.1 keep-alive connection over TLS, driven by hyper.
pub struct H1Conn {
    pub sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    pub leaf: Vec<u8>,
    task: tokio::task::JoinHandle<()>,
}

impl H1Conn {
    pub async fn open(addr: SocketAddr, ca_pem: &str) -> H1Conn {
        let stream = tls_connect(addr, tls_client_config(ca_pem, &[b"http/1.1"])).await;
        let leaf = peer_leaf(&stream);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("HTTP/1.1 handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        H1Conn { sender, leaf, task }
    }

    /// GET `path` on this connection; the status and body.
    pub async fn get(&mut self, path: &str) -> (u16, String) {
        use http_body_util::BodyExt;
        self.sender.ready().await.expect("connection still open");
        let req = http::Request::get(path)
            .header("host", "localhost")
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), self.sender.send_request(req))
            .await
            .expect("response within 5 s")
            .expect("response on the kept-alive connection");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

impl Drop for H1Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ------------------------------------------------------------------------------------------
// The real binary
// ------------------------------------------------------------------------------------------

/// The portcullis binary with a clean environment and the test JWT secret.
pub fn portcullis_command(secret: &str) -> Command {
    portcullis_command_under(&[], secret)
}

/// [`portcullis_command`] run by `wrapper` (a program and its arguments, such as `prlimit`).
pub fn portcullis_command_under(wrapper: &[&str], secret: &str) -> Command {
    let binary = env!("CARGO_BIN_EXE_portcullis");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(binary);
            cmd
        }
        None => Command::new(binary),
    };
    for (name, _) in std::env::vars() {
        if name.starts_with("PORTCULLIS_") || name.starts_with("REDIS_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("JWT_SECRET", secret);
    cmd
}

/// The binary running with a config file in a temporary directory; killed on drop. What it
/// writes (logs go to stdout) is kept in files there, for [`Binary::output`].
pub struct Binary {
    child: Option<Child>,
    pub pid: u32,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

/// The lines written to `path` so far, without one still being written.
fn whole_lines(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read the binary's output");
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The public and admin addresses of the binary's `portcullis serving` line, in text or JSON.
fn serving_addresses(log: &str) -> Option<(SocketAddr, SocketAddr)> {
    let line = log.lines().find(|l| l.contains("portcullis serving"))?;
    let field = |name: &str| -> Option<SocketAddr> {
        [format!("{name}="), format!("\"{name}\":\"")]
            .iter()
            .find_map(|pattern| {
                let rest = &line[line.find(pattern.as_str())? + pattern.len()..];
                let end = rest.find([' ', '"']).unwrap_or(rest.len());
                rest[..end].parse().ok()
            })
    };
    Some((field("listen")?, field("admin")?))
}

impl Binary {
    /// Starts `command` (the binary, with the environment and global flags the test wants) on
    /// ports the system picks (`PORTCULLIS_SERVER_LISTEN` and `PORTCULLIS_ADMIN_LISTEN` set to
    /// port 0), and learns them from its log: no other process can take them in between.
    pub async fn listening(mut command: Command, config: &str) -> Binary {
        command
            .env("PORTCULLIS_SERVER_LISTEN", "127.0.0.1:0")
            .env("PORTCULLIS_ADMIN_LISTEN", "127.0.0.1:0");
        let mut binary = Binary::spawn(command, config);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            binary.assert_running();
            if let Some((public, admin)) = serving_addresses(&binary.stdout()) {
                binary.public = public;
                binary.admin = admin;
                return binary;
            }
            assert!(
                Instant::now() < deadline,
                "portcullis never logged where it listens:\n{}",
                binary.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn spawn(mut command: Command, config: &str) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "config.toml", config);
        let stdout = dir.path().join("stdout.log");
        let stderr = dir.path().join("stderr.log");
        let child = command
            .arg("--config")
            .arg(&path)
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start portcullis");
        Binary {
            pid: child.id(),
            child: Some(child),
            // Known once it says where it listens.
            public: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            stdout,
            stderr,
            _dir: dir,
        }
    }

    /// `http://` URL of `path` on the public port.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    /// `http://` URL of `path` on the admin port.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// What the process wrote on stdout (its logs) so far.
    pub fn stdout(&self) -> String {
        whole_lines(&self.stdout)
    }

    /// Everything the process wrote so far, stdout then stderr.
    pub fn output(&self) -> String {
        let mut text = self.stdout();
        text.push_str(&whole_lines(&self.stderr));
        text
    }

    /// Whether any line the process wrote contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.output().contains(text)
    }

    /// Panics, with what it wrote, if the process has exited.
    pub fn assert_running(&mut self) {
        let status = self.child.as_mut().unwrap().try_wait().unwrap();
        assert!(
            status.is_none(),
            "portcullis exited early: {status:?}\n{}",
            self.output()
        );
    }

    /// `/readyz` once the admin port answers (15 s): its status and body.
    pub async fn readyz(&mut self) -> (u16, serde_json::Value) {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            self.assert_running();
            let response = client
                .get(self.admin_url("/readyz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if let Ok(response) = response {
                let status = response.status().as_u16();
                let body = response.json().await.unwrap_or(serde_json::Value::Null);
                return (status, body);
            }
            assert!(
                Instant::now() < deadline,
                "the admin port never answered:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `/readyz` until 200 (15 s); returns its body.
    pub async fn wait_ready(&mut self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = self.readyz().await;
            if status == 200 {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "portcullis never became ready; last /readyz: {body}\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `/readyz` until it says the shutdown has begun (10 s).
    pub async fn wait_shutting_down(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.readyz().await.1["checks"]["shutdown"] != "shutting down" {
            assert!(
                Instant::now() < deadline,
                "the shutdown never showed on /readyz\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (5 s) until the log has a line containing each of `needles`; returns the log.
    pub async fn wait_for_lines(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = self.stdout();
            if needles
                .iter()
                .all(|n| out.lines().any(|line| line.contains(n)))
            {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "no log line for each of {needles:?} within 5 s:\n{out}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `/healthz` (10 s) until 200.
    pub async fn wait_healthy(&mut self) {
        let url = format!("http://{}/healthz", self.admin);
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.assert_running();
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the binary's /healthz never answered:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal with `kill -<sig> <pid>`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -{sig} failed");
    }

    /// Non-blocking: the exit status if the process has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Waits (polling, bounded by `within`) for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_exit() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "portcullis did not exit within {within:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes `text` to `dir/name`.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

// ------------------------------------------------------------------------------------------
// A sessions key read at one instant
// ------------------------------------------------------------------------------------------

/// A user's sessions key read by one Lua script, so that no time passes between its parts:
/// Redis' clock, the key's PTTL and the sessions it holds. Expiries compared across the parts
/// then differ only by millisecond rounding, however slow the machine.
#[derive(Debug, Clone)]
pub struct SessionsKey {
    /// Redis' clock (`TIME`), Unix milliseconds.
    pub now_ms: i64,
    /// The key's PTTL in milliseconds (-2 missing, -1 persistent).
    pub pttl: i64,
    /// Every session stored under the key, expired or not, in storage order.
    pub sessions: Vec<portcullis::session::record::Record>,
}

/// Slack between two expiries compared within one [`SessionsKey`]: each part is rounded down
/// to the millisecond on its own.
pub const ROUNDING_MS: i64 = 2;

impl SessionsKey {
    pub fn read(conn: &mut redis::Connection, key: &str) -> SessionsKey {
        use portcullis::session::record;
        let script = redis::Script::new(
            "local t = redis.call('TIME') \
             return {t[1], t[2], redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[1])}",
        );
        let (secs, micros, pttl, value): (i64, i64, i64, Option<Vec<u8>>) = script
            .key(key)
            .invoke(conn)
            .expect("TIME, PTTL and GET in one script");
        let sessions = value
            .map(|value| {
                record::bodies(&value)
                    .expect("stored value in the session layout")
                    .into_iter()
                    .map(|body| record::decode(body).expect("session record"))
                    .collect()
            })
            .unwrap_or_default();
        SessionsKey {
            now_ms: secs * 1000 + micros / 1000,
            pttl,
            sessions,
        }
    }

    /// The stored session `id`.
    pub fn session(&self, id: &str) -> Option<&portcullis::session::record::Record> {
        self.sessions
            .iter()
            .find(|r| r.session_id.to_string() == id)
    }

    /// Milliseconds until session `id` expires, by Redis' clock at the reading (negative once
    /// expired); `None` when it is not stored.
    pub fn ttl_ms(&self, id: &str) -> Option<i64> {
        let record = self.session(id)?;
        Some(i64::try_from(record.expires_ms).expect("expiry") - self.now_ms)
    }
}

// ------------------------------------------------------------------------------------------
// The local session cache
// ------------------------------------------------------------------------------------------

/// Lookups the session cache answered from memory, by `GET /metrics` on `admin`.
pub async fn cache_hits(admin: SocketAddr) -> f64 {
    scrape(admin).await.value(
        "portcullis_session_cache_lookups_total",
        &[("result", "hit")],
    )
}

/// Sends `GET url` with `bearer` (each must be admitted) until one is answered from the local
/// cache of the replica whose admin address is `admin`: the session is then cached there.
/// Until the cache is live (tracking connection up, heartbeat answered) checks go to Redis.
/// Returns how many requests that took.
pub async fn until_cached(url: &str, bearer: &str, admin: SocketAddr) -> usize {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sent = 0;
    loop {
        let before = cache_hits(admin).await;
        let status = client
            .get(url)
            .bearer_auth(bearer)
            .send()
            .await
            .expect("request")
            .status();
        assert_eq!(status, 200);
        sent += 1;
        if cache_hits(admin).await > before {
            return sent;
        }
        assert!(
            Instant::now() < deadline,
            "no request admitted from the cache after {sent}"
        );
    }
}
