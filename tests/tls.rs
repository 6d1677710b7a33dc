//! Protocols on the public port: TLS with ALPN (h2, http/1.1) using a certificate made in the
//! test, and plain text with HTTP/2 prior knowledge or HTTP/1.1.

mod support;

use std::net::SocketAddr;

use http::Version;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::*;

/// A test CA and a `localhost` certificate it signed, written to a temporary directory.
struct TestPki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl TestPki {
    fn new() -> TestPki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "portcullis test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        // The chain as served: leaf first, then the CA.
        std::fs::write(
            dir.path().join("cert.pem"),
            format!("{}{}", leaf.pem(), ca.pem()),
        )
        .unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();
        TestPki {
            ca_pem: ca.pem(),
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
