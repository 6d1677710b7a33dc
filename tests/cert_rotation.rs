//! Certificate rotation without a restart: a new pair swapped onto disk the way Kubernetes
//! updates a mounted secret (one atomic symlink rename) is noticed by polling or by SIGHUP and
//! served to the next TLS handshake, while a connection opened before keeps working; a pair
//! that does not load leaves the old one serving, counts an error and logs it.

mod observe;
mod support;

use std::time::Duration;

use observe::*;
use support::*;

/// Each handshake as `localhost`, verified against the test CA, HTTP/1.1.
fn handshakes(ca: &TestCa) -> std::sync::Arc<rustls::ClientConfig> {
    tls_client_config(&ca.pem(), &[b"http/1.1"])
}

#[tokio::test]
async fn a_pair_swapped_on_disk_is_served_to_new_handshakes_and_old_connections_carry_on() {
    let ca = TestCa::new();
    let old = ca.leaf("portcullis old", 1001);
    let new = ca.leaf("portcullis new", 1002);
    assert_ne!(old.der, new.der);
    let mut volume = SecretVolume::new(&old.cert_pem, &old.key_pem);
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config_with(&upstream.url(), &volume.tls_section("100ms"))).await;
    let tls = handshakes(&ca);

    assert!(
        served_leaf(proxy.addr, &tls).await == old.der,
        "serves the old pair first"
    );
    let mut before = H1Conn::open(proxy.addr, &ca.pem()).await;
    assert!(before.leaf == old.der);
    assert_eq!(before.get("/before").await.0, 200);

    volume.swap(&new.cert_pem, &new.key_pem);
    wait_for_leaf(proxy.addr, &tls, &new.der, "the new certificate").await;

    // The connection opened before the swap is still up and still serves requests.
    assert_eq!(before.get("/after-swap").await.0, 200);
    assert_eq!(upstream.last().target, "/after-swap");
    // And an HTTP client built now gets through with the new certificate.
    let resp = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .resolve("localhost", proxy.addr)
        .build()
        .unwrap()
        .get(format!("https://localhost:{}/fresh", proxy.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // One atomic swap, one successful reload, no failed one.
    let m = scrape(proxy.admin).await;
    assert_eq!(
        m.get("portcullis_certificate_reloads_total", &[("outcome", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        m.value(
            "portcullis_certificate_reloads_total",
            &[("outcome", "error")]
        ),
        0.0
    );
}

#[tokio::test]
async fn a_broken_pair_leaves_the_old_certificate_serving_and_counts_an_error() {
    let capture = capture();
    let ca = TestCa::new();
    let old = ca.leaf("portcullis old", 2001);
    let new = ca.leaf("portcullis new", 2002);
    let mut volume = SecretVolume::new(&old.cert_pem, &old.key_pem);
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config_with(&upstream.url(), &volume.tls_section("100ms"))).await;
    let tls = handshakes(&ca);
    let mut before = H1Conn::open(proxy.addr, &ca.pem()).await;
    assert_eq!(before.get("/before").await.0, 200);
    // Exported at 0 before any reload: Prometheus sees the first failure as an increase.
    let m = scrape(proxy.admin).await;
    for outcome in ["ok", "error"] {
        assert_eq!(
            m.get(
                "portcullis_certificate_reloads_total",
                &[("outcome", outcome)]
            ),
            Some(0.0),
            "{outcome}"
        );
    }

    let errors = |n: f64| {
        move |m: &Exposition| {
            m.value(
                "portcullis_certificate_reloads_total",
                &[("outcome", "error")],
            ) == n
        }
    };

    // Garbage where the certificate should be.
    volume.swap("this is not a certificate\n", &old.key_pem);
    scrape_until(proxy.admin, "one failed reload", errors(1.0)).await;
    assert!(
        served_leaf(proxy.addr, &tls).await == old.der,
        "old pair still served"
    );

    // A valid certificate with a key that is not its own.
    volume.swap(&new.cert_pem, &old.key_pem);
    scrape_until(proxy.admin, "two failed reloads", errors(2.0)).await;
    assert!(
        served_leaf(proxy.addr, &tls).await == old.der,
        "old pair still served"
    );

    // A key file that is not a key.
    volume.swap(
        &new.cert_pem,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    scrape_until(proxy.admin, "three failed reloads", errors(3.0)).await;
    assert!(
        served_leaf(proxy.addr, &tls).await == old.der,
        "old pair still served"
    );

    // A chain whose intermediate is damaged: served as the leaf alone, it would fail clients
    // that do not fetch intermediates themselves.
    let second = new.cert_pem.rfind("-----BEGIN CERTIFICATE-----").unwrap();
    let damaged = format!(
        "{}{}",
        &new.cert_pem[..second],
        new.cert_pem[second..].replacen('\n', "\n!!!!", 1)
    );
    volume.swap(&damaged, &new.key_pem);
    scrape_until(proxy.admin, "four failed reloads", errors(4.0)).await;
    assert!(
        served_leaf(proxy.addr, &tls).await == old.der,
        "old pair still served"
    );

    // Well-formed PEM around DER that is no certificate (a SEQUENCE holding 0): every client
    // would refuse the chain.
    let not_x509 = format!(
        "{}-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n",
        new.cert_pem
    );
    volume.swap(&not_x509, &new.key_pem);
    scrape_until(proxy.admin, "five failed reloads", errors(5.0)).await;
    assert!(
        served_leaf(proxy.addr, &tls).await == old.der,
        "old pair still served"
    );

    // The certificate file gone: logged and counted once, not passed over.
    volume.swap(&new.cert_pem, &new.key_pem);
    std::fs::remove_file(volume.dir.path().join("..data").join("cert.pem")).unwrap();
    scrape_until(proxy.admin, "six failed reloads", errors(6.0)).await;
    assert_eq!(before.get("/during").await.0, 200);

    let m = scrape(proxy.admin).await;
    assert_eq!(
        m.value("portcullis_certificate_reloads_total", &[("outcome", "ok")]),
        0.0
    );
    // Each failure is logged as an error.
    let logged = capture
        .wait_for("reload errors", |e| {
            e.level == tracing::Level::ERROR && e.target.starts_with("portcullis::tls")
        })
        .await;
    assert!(logged.len() >= 6, "{logged:#?}");

    // A good pair afterwards is picked up.
    volume.swap(&new.cert_pem, &new.key_pem);
    wait_for_leaf(proxy.addr, &tls, &new.der, "the new certificate").await;
    assert_eq!(before.get("/after").await.0, 200);
    let m = scrape(proxy.admin).await;
    assert_eq!(
        m.get("portcullis_certificate_reloads_total", &[("outcome", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "portcullis_certificate_reloads_total",
            &[("outcome", "error")]
        ),
        Some(6.0)
    );
}

#[tokio::test]
async fn sighup_reloads_the_pair_in_the_real_binary() {
    let ca = TestCa::new();
    let old = ca.leaf("portcullis old", 3001);
    let new = ca.leaf("portcullis new", 3002);
    let mut volume = SecretVolume::new(&old.cert_pem, &old.key_pem);
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let config = config_with(
        &upstream.url(),
        &format!(
            "[server]\nshutdown_delay = \"0s\"\n[redis]\nurl = \"{}\"\n{}",
            redis.url(),
            // Only SIGHUP can reload within the test.
            volume.tls_section("1h"),
        ),
    );
    let mut binary = Binary::listening(portcullis_command(TEST_SECRET), &config).await;
    binary.wait_healthy().await;
    let tls = handshakes(&ca);
    // The public listener serves (and so the SIGHUP handler, registered before, is in place).
    assert!(served_leaf(binary.public, &tls).await == old.der);
    let mut before = H1Conn::open(binary.public, &ca.pem()).await;
    assert_eq!(before.get("/before").await.0, 200);

    volume.swap(&new.cert_pem, &new.key_pem);
    assert!(
        served_leaf(binary.public, &tls).await == old.der,
        "without SIGHUP nothing reloads for an hour"
    );
    binary.signal("HUP");
    wait_for_leaf(
        binary.public,
        &tls,
        &new.der,
        "the new certificate after SIGHUP",
    )
    .await;
    binary.assert_running();
    assert_eq!(before.get("/after").await.0, 200);
    assert_eq!(upstream.last().target, "/after");

    let m = scrape(binary.admin).await;
    assert_eq!(
        m.get("portcullis_certificate_reloads_total", &[("outcome", "ok")]),
        Some(1.0)
    );

    // A broken pair and another SIGHUP: the new certificate stays.
    volume.swap("garbage\n", &new.key_pem);
    binary.signal("HUP");
    scrape_until(binary.admin, "a failed reload after SIGHUP", |m| {
        m.value(
            "portcullis_certificate_reloads_total",
            &[("outcome", "error")],
        ) == 1.0
    })
    .await;
    assert!(served_leaf(binary.public, &tls).await == new.der);

    drop(before);
    binary.signal("TERM");
    let status = binary.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn sighup_without_tls_neither_kills_nor_disturbs_the_binary() {
    const HANDLED: &str = "SIGHUP: no TLS certificate to reload";
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let config = config_with(
        &upstream.url(),
        &format!(
            "[server]\nshutdown_delay = \"0s\"\n[redis]\nurl = \"{}\"\n",
            redis.url(),
        ),
    );
    let mut binary = Binary::listening(portcullis_command(TEST_SECRET), &config).await;
    binary.wait_healthy().await;
    let through = |path: &'static str| client().get(binary.url(path)).send();
    assert_eq!(through("/before").await.unwrap().status(), 200);
    assert!(!binary.logged(HANDLED), "SIGHUP handled before it was sent");
    binary.signal("HUP");
    // The process must still serve once the signal has been delivered and handled.
    eventually("the binary to log that it handled SIGHUP", || {
        let handled = binary.logged(HANDLED);
        async move { handled }
    })
    .await;
    for path in ["/after-1", "/after-2", "/after-3"] {
        let resp = through(path).await.expect("still serving after SIGHUP");
        assert_eq!(resp.status(), 200);
    }
    let targets: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/before", "/after-1", "/after-2", "/after-3"]);
    binary.assert_running();
    binary.signal("TERM");
    let status = binary.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
}
