//! An https upstream: its certificate must chain to `upstream.ca_file` (or, without it, to the
//! web PKI roots), and its pooled TLS connections are reused like plain ones.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;

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
    async fn start() -> TlsUpstream {
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

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (count, accepted) = (answered.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (acceptor, count) = (acceptor.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |_req| {
                        count.fetch_add(1, Ordering::SeqCst);
                        async {
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                                "over tls",
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
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
}

#[tokio::test]
async fn an_https_upstream_signed_by_ca_file_is_trusted_and_its_connection_reused() {
    let upstream = TlsUpstream::start().await;
    let proxy = Proxy::start(&config_with(
        &upstream.url(),
        &format!(
            "[server]\nworkers = 1\n[upstream]\nca_file = \"{}\"\n",
            upstream.ca_file.path().display()
        ),
    ))
    .await;
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
