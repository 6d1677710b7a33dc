//! An https upstream: its certificate must chain to `upstream.ca_file` (or, without it, to the
//! web PKI roots), and its pooled TLS connections are reused like plain ones.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// An upstream serving HTTP/1.1 over TLS with a certificate for 127.0.0.1 from a test CA.
struct TlsUpstream {
    addr: SocketAddr,
    /// The test CA, as a PEM file.
    ca_file: tempfile::NamedTempFile,
    /// Requests answered.
    answered: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

impl TlsUpstream {
    /// Answers every request with "over tls".
    async fn start() -> TlsUpstream {
        TlsUpstream::start_with(None, |_req| async {
            http::Response::new(Full::new(Bytes::from("over tls")))
        })
        .await
    }

    /// Answers every request with `handler`; its sockets' receive buffers hold `recv_buffer`
    /// bytes when given (the kernel's own sizing otherwise).
    async fn start_with<F, Fut>(recv_buffer: Option<u32>, handler: F) -> TlsUpstream
    where
        F: Fn(http::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = http::Response<Full<Bytes>>> + Send + 'static,
    {
        TlsUpstream::serving(recv_buffer, move |tls, answered| {
            let handler = handler.clone();
            async move {
                let service = hyper::service::service_fn(move |req| {
                    answered.fetch_add(1, Ordering::SeqCst);
                    let answer = handler(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            }
        })
        .await
    }

    /// Runs `serve` on each connection once its TLS handshake is done, with the count of
    /// requests answered.
    async fn serving<F, Fut>(recv_buffer: Option<u32>, serve: F) -> TlsUpstream
    where
        F: Fn(TlsStream<TcpStream>, Arc<AtomicUsize>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let certs = test_certs("portcullis upstream test CA", "127.0.0.1");
        let ca_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca_file.path(), &certs.ca_pem).unwrap();

        let chain = vec![certs.leaf_der, certs.ca_der];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certs.key_der));
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(bytes) = recv_buffer {
            // Set before listening, so that accepted sockets start with it.
            socket.set_recv_buffer_size(bytes).unwrap();
        }
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(64).unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (count, accepted) = (answered.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (acceptor, count, serve) = (acceptor.clone(), count.clone(), serve.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        serve(tls, count).await;
                    }
                });
            }
        });
        TlsUpstream {
            addr,
            ca_file,
            answered,
            connections,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// portcullis, on one worker (one pool), trusting the test CA.
    async fn proxy_trusting_it(&self) -> Proxy {
        Proxy::start(&config_with(
            &self.url(),
            &format!(
                "[server]\nworkers = 1\n[upstream]\nca_file = \"{}\"\n",
                self.ca_file.path().display()
            ),
        ))
        .await
    }
}

#[tokio::test]
async fn an_https_upstream_signed_by_ca_file_is_trusted_and_its_connection_reused() {
    let upstream = TlsUpstream::start().await;
    let proxy = upstream.proxy_trusting_it().await;
    let client = client();
    for _ in 0..3 {
        let resp = client.get(proxy.url("/state")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "over tls");
    }
    assert_eq!(upstream.answered.load(Ordering::SeqCst), 3);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_https_upstream_outside_the_trusted_roots_is_never_sent_a_request() {
    let upstream = TlsUpstream::start().await;
    // No ca_file: the web PKI roots, which the test CA is not among.
    let proxy = Proxy::start(&config_with(&upstream.url(), "")).await;
    let resp = client().get(proxy.url("/state")).send().await.unwrap();
    assert_error(resp, 502, "UPSTREAM_UNAVAILABLE").await;
    assert!(upstream.connections.load(Ordering::SeqCst) >= 1);
    assert_eq!(upstream.answered.load(Ordering::SeqCst), 0);
}

/// Many https servers close a kept-alive connection with a bare TCP close, no TLS
/// `close_notify`. When that close meets a request sent on a connection that had been idle,
/// the request is sent again on a new connection, as it is after a plain TCP close.
#[tokio::test]
async fn a_pooled_https_connection_closed_without_close_notify_under_a_request_is_retried() {
    let upstream = TlsUpstream::serving(None, |mut tls, answered| async move {
        if !read_head(&mut tls).await {
            return;
        }
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nanswered";
        if tls.write_all(answer).await.is_err() || tls.flush().await.is_err() {
            return;
        }
        answered.fetch_add(1, Ordering::SeqCst);
        // The next request on this connection: read whole, then a TCP close without
        // close_notify (the stream is dropped, not shut down).
        read_head(&mut tls).await;
    })
    .await;
    let proxy = upstream.proxy_trusting_it().await;
    let get = || async {
        let resp = client().get(proxy.url("/state")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "answered");
    };
    get().await;
    // Idle long enough that a close under the next request may be a keep-alive timeout.
    tokio::time::sleep(
        portcullis::forward::REPLAY_AFTER_IDLE.saturating_add(Duration::from_millis(50)),
    )
    .await;
    get().await;
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 2);
    assert_eq!(upstream.answered.load(Ordering::SeqCst), 2);
}

/// `upstream.connect_timeout` covers the TLS handshake: an upstream that accepts the TCP
/// connection and never answers the handshake is a 502 once it has passed, not a wait for
/// `request_timeout` (nor, for a request with a body, for ever).
#[tokio::test]
async fn an_https_upstream_that_never_finishes_the_handshake_is_a_502_after_connect_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let proxy = Proxy::start(&config_with(
        &format!("https://{addr}"),
        "[upstream]\nconnect_timeout = \"300ms\"\nrequest_timeout = \"20s\"\n",
    ))
    .await;
    for req in [
        client().get(proxy.url("/state")),
        client().post(proxy.url("/upload")).body("a body"),
    ] {
        let started = std::time::Instant::now();
        let resp = tokio::time::timeout(Duration::from_secs(10), req.send())
            .await
            .expect("no answer within 10 s")
            .unwrap();
        assert_error(resp, 502, "UPSTREAM_UNAVAILABLE").await;
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
    held.abort();
}

/// A large upload to an https upstream that reads slowly arrives whole, and what was sent before
/// the client pauses reaches the upstream while the client waits (the client sends its last
/// byte only once the upstream has all the rest): TLS holds records back until flushed.
#[tokio::test]
async fn an_upload_to_a_slow_https_upstream_arrives_whole_across_a_client_pause() {
    // More than the socket buffers between portcullis and the upstream hold: portcullis waits
    // for its socket again and again.
    const FIRST: usize = 2 * 1024 * 1024;
    let (got_first, first_arrived) = tokio::sync::oneshot::channel::<()>();
    let got_first = Arc::new(std::sync::Mutex::new(Some(got_first)));
    let upstream = TlsUpstream::start_with(Some(4096), move |req: http::Request<Incoming>| {
        let got_first = got_first.clone();
        async move {
            let mut body = req.into_body();
            let mut received = 0;
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame.map(|f| f.into_data().unwrap_or_default()) else {
                    break;
                };
                received += data.len();
                if received >= FIRST {
                    if let Some(tell) = got_first.lock().unwrap().take() {
                        let _ = tell.send(());
                    }
                }
                // A few KiB (what the small buffer holds) a millisecond, far slower than
                // portcullis sends.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            http::Response::new(Full::new(Bytes::from(received.to_string())))
        }
    })
    .await;
    let proxy = upstream.proxy_trusting_it().await;

    let exchange = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let (mut from_proxy, mut to_proxy) = stream.into_split();
        let send = tokio::spawn(async move {
            let head = format!(
                "POST /upload HTTP/1.1\r\nHost: game\r\nContent-Length: {}\r\n\r\n",
                FIRST + 1
            );
            to_proxy.write_all(head.as_bytes()).await.unwrap();
            to_proxy.write_all(&vec![b'x'; FIRST]).await.unwrap();
            // The last byte only once the upstream has all the rest.
            first_arrived.await.unwrap();
            to_proxy.write_all(b"y").await.unwrap();
            to_proxy
        });
        let mut answer = Vec::new();
        let expected = (FIRST + 1).to_string();
        while !String::from_utf8_lossy(&answer).ends_with(&expected) {
            let mut buf = [0u8; 4096];
            let n = from_proxy.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        let _ = send.await.unwrap();
        String::from_utf8(answer).unwrap()
    };
    let answer = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("the upload went through within 20 s");
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(upstream.answered.load(Ordering::SeqCst), 1);
}
