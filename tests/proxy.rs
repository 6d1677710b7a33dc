//! The forwarding path: what reaches the upstream, and what the client gets back.

mod support;

use support::*;

#[tokio::test]
async fn get_reaches_upstream_with_path_and_query_byte_for_byte() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = client()
        .get(proxy.url("/a/b;x?q=1%2F2&&z"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.target, "/a/b;x?q=1%2F2&&z");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        proxy.addr.to_string().as_str()
    );
    assert_eq!(seen.headers["host"], proxy.addr.to_string().as_str());
}
