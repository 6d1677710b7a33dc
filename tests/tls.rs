//! Protocols on the public port: TLS with ALPN (h2, http/1.1) using a certificate made in the
//! test, and plain text with HTTP/2 prior knowledge or HTTP/1.1.

mod observe;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::Version;
use support::*;

/// A test CA and a `localhost` certificate it signed, written to a temporary directory.
struct TestPki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl TestPki {
    fn new() -> TestPki {
        let certs = test_certs("portcullis test CA", "localhost");
        let dir = tempfile::tempdir().unwrap();
        // The chain as served: leaf first, then the CA.
        std::fs::write(
            dir.path().join("cert.pem"),
            format!("{}{}", certs.leaf_pem, certs.ca_pem),
        )
        .unwrap();
        std::fs::write(dir.path().join("key.pem"), &certs.key_pem).unwrap();
        TestPki {
            ca_pem: certs.ca_pem,
            dir,
        }
    }

    fn tls_section(&self) -> String {
        format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            self.dir.path().join("cert.pem").display(),
            self.dir.path().join("key.pem").display(),
        )
    }

    /// A client that trusts only the test CA and resolves `localhost` to the proxy.
    fn client(&self, proxy: SocketAddr) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
            .resolve("localhost", proxy)
    }
}

fn https_url(proxy: &Proxy, path: &str) -> String {
    format!("https://localhost:{}{}", proxy.addr.port(), path)
}

#[tokio::test]
async fn tls_negotiates_h2_by_alpn() {
    let pki = TestPki::new();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config_with(&upstream.url(), &pki.tls_section())).await;
    let client = pki.client(proxy.addr).build().unwrap();
    let resp = client
        .post(https_url(&proxy, "/over/h2?x=1"))
        .body("hello over h2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.text().await.unwrap(), "hello over h2");
    let seen = upstream.last();
    assert_eq!(seen.target, "/over/h2?x=1");
    assert_eq!(seen.body, "hello over h2");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    // HTTP/2 has no Host header; the client's :authority becomes the upstream's Host.
    let authority = format!("localhost:{}", proxy.addr.port());
    assert_eq!(seen.headers["host"], authority.as_str());
    assert_eq!(seen.headers["x-forwarded-host"], authority.as_str());
}

#[tokio::test]
async fn tls_serves_http1_to_a_client_offering_only_http1() {
    let pki = TestPki::new();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config_with(&upstream.url(), &pki.tls_section())).await;
    let client = pki.client(proxy.addr).http1_only().build().unwrap();
    let resp = client
        .get(https_url(&proxy, "/over/h1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_11);
    let seen = upstream.last();
    assert_eq!(seen.target, "/over/h1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn tls_port_refuses_a_client_that_does_not_trust_the_certificate() {
    let pki = TestPki::new();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config_with(&upstream.url(), &pki.tls_section())).await;
    // Built-in roots only: the test CA is unknown.
    let client = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .resolve("localhost", proxy.addr)
        .build()
        .unwrap();
    let err = client.get(https_url(&proxy, "/")).send().await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn plain_text_serves_http2_prior_knowledge() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = client
        .post(proxy.url("/h2c?y=2"))
        .body("prior knowledge")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.text().await.unwrap(), "prior knowledge");
    let seen = upstream.last();
    assert_eq!(seen.target, "/h2c?y=2");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["host"], proxy.addr.to_string().as_str());
}

#[tokio::test]
async fn plain_text_serves_http1() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .build()
        .unwrap();
    let resp = client.get(proxy.url("/h1")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(upstream.last().target, "/h1");
}

/// An HTTP/1.1 client's TLS session with the proxy, trusting only the test CA.
async fn tls_http1(
    pki: &TestPki,
    proxy: &Proxy,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

#[tokio::test]
async fn a_tls_connection_keeps_serving_across_rests() {
    use tokio::io::AsyncWriteExt;

    let pki = TestPki::new();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config_with(&upstream.url(), &pki.tls_section())).await;
    let mut tls = tls_http1(&pki, &proxy).await;

    // One TLS session, several requests, each after the connection has rested (20 ms quiet):
    // the resting socket waits under TLS, and the next hyper reads the decrypted request.
    let mut buf = Vec::new();
    for i in 0..3 {
        if i > 0 {
            // A request wakes the connection: a count of one is this rest, not the last.
            observe::scrape_until(proxy.admin, "the TLS connection at rest", |e| {
                e.get("portcullis_resting_connections", &[]) == Some(1.0)
            })
            .await;
        }
        let request = format!("GET /tls/{i} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let head = read_tls_head(&mut tls, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head}");
    }
    let targets: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/tls/0", "/tls/1", "/tls/2"]);
}

/// Reads one response with an empty body (the echo upstream answering a GET) off `tls`.
async fn read_tls_head<S: tokio::io::AsyncRead + Unpin>(tls: &mut S, buf: &mut Vec<u8>) -> String {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end + 4);
                return head;
            }
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the TLS connection closed");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .expect("a response within 5 s")
}

/// Bytes that wake a resting TLS connection without making a request (here, the start of a TLS
/// record dripped a byte at a time) do not hold it past the keep-alive limit.
#[tokio::test]
async fn tls_bytes_that_are_no_request_do_not_hold_a_resting_connection() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;

    let pki = TestPki::new();
    let upstream = Upstream::echo().await;
    let config = format!(
        "[server]\nheader_read_timeout = \"600ms\"\n{}",
        pki.tls_section()
    );
    let proxy = Proxy::start(&config_with(&upstream.url(), &config)).await;
    let mut tls = tls_http1(&pki, &proxy).await;
    tls.write_all(b"GET /once HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let head = read_tls_head(&mut tls, &mut Vec::new()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // The header of an application-data record, then its body, a byte every 150 ms: each
    // wakes the connection, none decrypts to anything.
    let answered = Instant::now();
    let (tcp, _) = tls.get_mut();
    let mut record = vec![0x17u8, 0x03, 0x03, 0x40, 0x00];
    record.resize(64, 0x41);
    let mut closed_after = None;
    for byte in record {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut probe = [0u8; 64];
        let closed = match tcp.try_read(&mut probe) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        };
        if closed || tcp.write_all(&[byte]).await.is_err() {
            closed_after = Some(answered.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the connection was held past its keep-alive limit");
    assert!(
        closed_after < Duration::from_millis(1500),
        "closed only after {closed_after:?}"
    );
}

/// An upstream that accepts an upgrade with a bare 101 and then writes to the tunnel without
/// end; the bytes it got written so far.
async fn flooding_upgrade_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>)
{
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = written.clone();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        if !accept_upgrade(&mut stream).await {
            return;
        }
        let chunk = [b'f'; 64 * 1024];
        while let Ok(n) = stream.write(&chunk).await {
            count.fetch_add(n, Ordering::SeqCst);
        }
    });
    (addr, written)
}

/// At shutdown, a WebSocket tunnel over TLS to a client that stopped reading is closed within
/// moments: its TLS close cannot be written to the full socket, and is given up on, rather than
/// holding the process for the whole `shutdown_grace`.
#[tokio::test]
async fn a_tunnel_to_a_client_that_stopped_reading_does_not_hold_up_shutdown() {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let (upstream, written) = flooding_upgrade_upstream().await;
    let mut proxy = Proxy::start(&config_with(
        &format!("http://{upstream}"),
        &format!("{}[server]\nshutdown_grace = \"30s\"\n", pki.tls_section()),
    ))
    .await;
    let config = observe::tls_client_config(&pki.ca_pem, &[b"http/1.1"]);
    let mut tls = observe::tls_connect(proxy.addr, config).await;
    tls.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut first = [0u8; 12];
    tls.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 101");
    // The client reads no more: the flood fills every buffer on the way, until the upstream's
    // writes stop moving.
    let mut last = usize::MAX;
    eventually("the tunnel's buffers to fill", || {
        let now = written.load(Ordering::SeqCst);
        let settled = now > 0 && now == last;
        last = now;
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            settled
        }
    })
    .await;
    let stopping = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), proxy.shutdown())
        .await
        .expect("shutdown within 20 s")
        .unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    drop(tls);
}
