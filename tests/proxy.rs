//! The forwarding path: what reaches the upstream, and what the client gets back.

mod support;

use bytes::Bytes;

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

/// On a dual-stack listener (`[::]`), an IPv4 client is known by its IPv4 address, not the
/// IPv4-mapped IPv6 one the socket reports, and an IPv6 client by its own.
#[tokio::test]
async fn a_dual_stack_listener_names_ipv4_and_ipv6_clients_by_their_own_addresses() {
    // A host without IPv6, or whose `[::]` takes IPv6 only, has no dual-stack listener to test.
    let v6_only =
        std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1");
    let Ok(public) = tokio::net::TcpListener::bind("[::]:0").await else {
        eprintln!("skipped: this host cannot bind [::]");
        return;
    };
    if v6_only {
        eprintln!("skipped: net.ipv6.bindv6only is set");
        return;
    }
    let upstream = Upstream::echo().await;
    let port = public.local_addr().expect("local addr").port();
    let _proxy = Proxy::start_on(test_config(&open_config(&upstream.url())), public).await;
    for (client_addr, seen_as) in [("127.0.0.1", "127.0.0.1"), ("[::1]", "::1")] {
        let resp = client()
            .get(format!("http://{client_addr}:{port}/who"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "from {client_addr}");
        assert_eq!(upstream.last().headers["x-forwarded-for"], seen_as);
    }
}

/// An absolute-form target with an empty path is judged as `/`, and goes upstream as that, with
/// its query: a target of `?q=1` alone is no request line a server takes.
#[tokio::test]
async fn an_absolute_form_target_without_a_path_goes_upstream_as_the_root() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    for (target, expected) in [("http://e?q=1", "/?q=1"), ("http://e", "/")] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n");
        let resp = send_raw(proxy.addr, request.as_bytes()).await;
        assert_eq!(resp.status, 200, "{target}");
        assert_eq!(upstream.last().target, expected, "{target}");
    }
}

/// A Content-Length repeated, or padded with zeros (which a reader guessing the base takes
/// for octal), reaches the client as one plain number.
#[tokio::test]
async fn an_unusual_content_length_from_the_upstream_reaches_the_client_as_one_number() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\ncontent-length: 2\r\n\r\nok"[..],
        &b"HTTP/1.1 200 OK\r\ncontent-length: 02\r\n\r\nok"[..],
    ] {
        let upstream = RawUpstream::start(answer).await;
        let proxy = Proxy::start(&open_config(&upstream.url())).await;
        let resp = send_raw(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: e\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(resp.status, 200);
        let lengths: Vec<_> = resp
            .headers
            .iter()
            .filter(|(name, _)| name == "content-length")
            .map(|(_, value)| value.as_str())
            .collect();
        assert_eq!(lengths, ["2"], "{}", String::from_utf8_lossy(answer));
        assert_eq!(resp.body, b"ok");
    }
}

// ------------------------------------------------------------------------------------------
// Bodies
// ------------------------------------------------------------------------------------------

/// Deterministic, non-repeating test bytes (xorshift), so a dropped, duplicated or reordered
/// chunk cannot go unnoticed.
fn pattern(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A chunked request body generated piece by piece on the client side, in uneven chunks.
fn streamed(data: Vec<u8>) -> reqwest::Body {
    let data = Bytes::from(data);
    let sizes = [65_536usize, 1, 8_191, 100_000, 3];
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < data.len() {
        let end = (at + sizes[i % sizes.len()]).min(data.len());
        chunks.push(Ok::<Bytes, std::io::Error>(data.slice(at..end)));
        at = end;
        i += 1;
    }
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

#[tokio::test]
async fn get_reaches_upstream_with_method_and_empty_body() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = client().get(proxy.url("/status")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap().is_empty());
    assert_eq!(upstream.count(), 1);
    let seen = upstream.last();
    assert_eq!(seen.method, http::Method::GET);
    assert_eq!(seen.target, "/status");
    assert!(seen.body.is_empty());
}

#[tokio::test]
async fn streamed_10_mib_post_arrives_byte_exact_and_streams_back() {
    const LEN: usize = 10 * 1024 * 1024; // exactly the default server.max_body_bytes
    let data = pattern(LEN);
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;

    let resp = client()
        .post(proxy.url("/upload?part=1"))
        .body(streamed(data.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echoed = resp.bytes().await.unwrap();

    let seen = upstream.last();
    assert_eq!(seen.method, http::Method::POST);
    assert_eq!(seen.target, "/upload?part=1");
    assert_eq!(seen.body.len(), LEN);
    assert!(seen.body == data, "the upstream got different bytes");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(echoed.len(), LEN);
    assert!(echoed == data, "the client got different bytes back");
}

// ------------------------------------------------------------------------------------------
// X-Forwarded-*
// ------------------------------------------------------------------------------------------

/// What a proxy says of the client besides `X-Forwarded-*`, or of the path the request was first
/// sent to, in the headers backends believe.
const PROXY_SAID: &[(&str, &str)] = &[
    ("forwarded", "for=6.6.6.6;proto=https;host=evil.example"),
    ("forwarded-for", "6.6.6.6"),
    ("x-forwarded", "for=6.6.6.6"),
    ("x-real-ip", "6.6.6.6"),
    ("true-client-ip", "6.6.6.6"),
    ("x-client-ip", "6.6.6.6"),
    ("x-cluster-client-ip", "6.6.6.6"),
    ("cf-connecting-ip", "6.6.6.6"),
    ("fastly-client-ip", "6.6.6.6"),
    ("x-forwarded-port", "443"),
    ("x-forwarded-prefix", "/admin"),
    ("x-forwarded-server", "evil.example"),
    ("x-forwarded-scheme", "https"),
    ("x-forwarded-ssl", "on"),
    ("front-end-https", "on"),
    ("x-original-url", "/admin"),
    ("x-rewrite-url", "/admin"),
    ("x-original-uri", "/admin"),
    ("x-forwarded-uri", "/admin"),
    ("x-envoy-original-path", "/admin"),
];

fn with_proxy_said(mut req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    for (name, value) in PROXY_SAID {
        req = req.header(*name, *value);
    }
    req
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_replaced() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut req = with_proxy_said(client().get(proxy.url("/")));
    // And with `_` for `-`, which CGI-style servers read as the same header.
    for (name, value) in PROXY_SAID {
        req = req.header(name.replace('-', "_"), *value);
    }
    let resp = req
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("x-other", "kept")
        .header("x_other_too", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    for (name, _) in PROXY_SAID {
        for name in [name.to_string(), name.replace('-', "_")] {
            assert!(
                !seen.headers.contains_key(&name),
                "{name} from an untrusted peer reached the upstream"
            );
        }
    }
    assert_eq!(seen.headers["x-other"], "kept");
    assert_eq!(seen.headers["x_other_too"], "kept");
    let xff: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff, ["127.0.0.1"]);
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        proxy.addr.to_string().as_str()
    );
}

#[tokio::test]
async fn forwarded_for_from_a_trusted_peer_is_appended_to() {
    let upstream = Upstream::echo().await;
    let config = config_with(
        &upstream.url(),
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n",
    );
    let proxy = Proxy::start(&config).await;
    let resp = client()
        .get(proxy.url("/"))
        .header("x-forwarded-for", "203.0.113.7, 10.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    let xff: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff, ["203.0.113.7, 10.0.0.1, 127.0.0.1"]);

    // A line that is not UTF-8 (a client's junk in front of the address its proxy appended)
    // is passed on as it came, with the line after it.
    let resp = send_raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: \xff\xfe, 203.0.113.9\r\n\
          X-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = upstream.last();
    let xff: Vec<_> = seen
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect();
    assert_eq!(
        xff,
        [b"\xff\xfe, 203.0.113.9, 10.0.0.1, 127.0.0.1".to_vec()]
    );
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_peer_are_kept() {
    let upstream = Upstream::echo().await;
    let config = config_with(
        &upstream.url(),
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
    );
    let proxy = Proxy::start(&config).await;
    let resp = with_proxy_said(client().get(proxy.url("/")))
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "game.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-host"], "game.example");
    for (name, value) in PROXY_SAID {
        assert_eq!(seen.headers[*name], *value, "{name} from a trusted proxy");
    }
}

// ------------------------------------------------------------------------------------------
// Host
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn host_is_kept_as_the_client_sent_it() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = send_raw(
        proxy.addr,
        b"GET /h HTTP/1.1\r\nHost: Game.Example.com:8443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = upstream.last();
    assert_eq!(seen.headers["host"], "Game.Example.com:8443");
    assert_eq!(seen.headers["x-forwarded-host"], "Game.Example.com:8443");
}

#[tokio::test]
async fn host_is_replaced_when_upstream_host_is_configured() {
    let upstream = Upstream::echo().await;
    let config = config_with(&upstream.url(), "[upstream]\nhost = \"backend.internal\"\n");
    let proxy = Proxy::start(&config).await;
    let resp = send_raw(
        proxy.addr,
        b"GET /h HTTP/1.1\r\nHost: game.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = upstream.last();
    let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
    assert_eq!(hosts, ["backend.internal"]);
    // The client's own Host is still told to the upstream.
    assert_eq!(seen.headers["x-forwarded-host"], "game.example.com");
}

// ------------------------------------------------------------------------------------------
// Path and query
// ------------------------------------------------------------------------------------------

/// Sends `target` in a hand-written request line (reqwest would normalise it) and returns what
/// the upstream received as its request target.
async fn forwarded_target(target: &str) -> String {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: game.example\r\nConnection: close\r\n\r\n");
    let resp = send_raw(proxy.addr, request.as_bytes()).await;
    assert_eq!(resp.status, 200, "{target}");
    upstream.last().target
}

#[tokio::test]
async fn the_upstream_receives_the_path_that_was_judged_and_the_query_as_sent() {
    for (sent, forwarded) in [
        ("/a/%2e%2E/b;x?q=1%2F2&&z", "/b;x?q=1%2F2&&z"),
        ("/a/./b/../c?x=%20", "/a/c?x=%20"),
        ("/a//b", "/a/b"),
        ("/a/b/", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/%7Euser/%41%20b", "/~user/A%20b"),
    ] {
        assert_eq!(forwarded_target(sent).await, forwarded, "{sent}");
    }
}

#[tokio::test]
async fn a_path_already_canonical_is_forwarded_byte_for_byte() {
    let target = "/a/b.c/~d;e=f/%20%3B?x=../%2F";
    assert_eq!(forwarded_target(target).await, target);
}

// ------------------------------------------------------------------------------------------
// Hop-by-hop headers
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_connection_header_naming_the_request_id_does_not_drop_it() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = send_raw(
        proxy.addr,
        b"GET /id HTTP/1.1\r\n\
          Host: game.example\r\n\
          Connection: close, X-Request-Id\r\n\
          X-Request-Id: trace-42\r\n\
          \r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(upstream.last().headers["x-request-id"], "trace-42");
}

/// However long an identity header's name, its underscore spelling is removed too.
#[tokio::test]
async fn underscore_aliases_of_long_identity_header_names_never_reach_the_upstream() {
    let upstream = Upstream::echo().await;
    let long = format!("x-game-{}-user-id", "a".repeat(60));
    let config = config_with(
        &upstream.url(),
        &format!("[identity]\nuser_id_header = \"{long}\"\n"),
    );
    let proxy = Proxy::start(&config).await;
    let alias = long.replace('-', "_");
    let resp = client()
        .get(proxy.url("/alias"))
        .header(alias.as_str(), "admin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    assert!(seen.headers.get(&alias).is_none(), "{:?}", seen.headers);
    assert!(seen.headers.get(&long).is_none(), "{:?}", seen.headers);
}

#[tokio::test]
async fn underscore_aliases_of_the_headers_portcullis_sets_never_reach_the_upstream() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = send_raw(
        proxy.addr,
        b"GET /alias HTTP/1.1\r\n\
          Host: game.example\r\n\
          Connection: close\r\n\
          X_User_Id: admin\r\n\
          x-session_id: 00000000-0000-4000-8000-000000000000\r\n\
          X_Session_Platform: ios\r\n\
          X_Forwarded_For: 10.9.9.9\r\n\
          X_Forwarded_Host: evil.example\r\n\
          X_Request_Id: forged\r\n\
          Content_Length: 40\r\n\
          Transfer_Encoding: chunked\r\n\
          X_Custom_Header: kept\r\n\
          \r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = upstream.last();
    let underscored: Vec<&str> = seen
        .headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.contains('_'))
        .collect();
    assert_eq!(underscored, ["x_custom_header"], "{:?}", seen.headers);
    // Nor under their own names: no session is on an open route, so portcullis sets none of
    // these, and the forged values come through under no spelling.
    for name in ["x-user-id", "x-session-id", "x-session-platform"] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name} reached the upstream: {:?}",
            seen.headers
        );
    }
    assert_eq!(
        seen.headers
            .get_all("x-forwarded-for")
            .iter()
            .collect::<Vec<_>>(),
        ["127.0.0.1"],
        "only the real peer is in X-Forwarded-For"
    );
    assert_eq!(
        seen.headers
            .get_all("x-forwarded-host")
            .iter()
            .collect::<Vec<_>>(),
        ["game.example"],
        "X-Forwarded-Host is the request's own Host"
    );
    let request_id = seen.headers.get("x-request-id").expect("a request id");
    assert_ne!(request_id, "forged");
    assert!(!request_id.is_empty());
}

#[tokio::test]
async fn two_authorization_headers_are_refused_before_any_other_work() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = send_raw(
        proxy.addr,
        b"GET /open HTTP/1.1\r\n\
          Host: game.example\r\n\
          Connection: close\r\n\
          Authorization: Bearer a.b.c\r\n\
          Authorization: Bearer d.e.f\r\n\
          \r\n",
    )
    .await;
    resp.assert_error(400, "MALFORMED_REQUEST");
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn a_get_with_a_chunked_body_reaches_the_upstream_with_its_body() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = send_raw(
        proxy.addr,
        b"GET /search HTTP/1.1\r\n\
          Host: game.example\r\n\
          Connection: close\r\n\
          Transfer-Encoding: chunked\r\n\
          \r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = upstream.last();
    assert_eq!(seen.method, http::Method::GET);
    assert_eq!(seen.body, "hello");
}

#[tokio::test]
async fn connect_is_refused() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = send_raw(
        proxy.addr,
        b"CONNECT db.internal:5432 HTTP/1.1\r\n\
          Host: db.internal:5432\r\n\
          \r\n",
    )
    .await;
    resp.assert_error(501, "METHOD_NOT_SUPPORTED");
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn a_transfer_coding_other_than_chunked_gives_501() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = send_raw(
        proxy.addr,
        b"POST /upload HTTP/1.1\r\n\
          Host: game.example\r\n\
          Connection: close\r\n\
          Transfer-Encoding: gzip, chunked\r\n\
          \r\n\
          3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    resp.assert_error(501, "TRANSFER_CODING_UNSUPPORTED");
    assert_eq!(upstream.count(), 0);

    // chunked applied twice (in one line or two) is malformed: decoded once, the rest of its
    // framing would go upstream as body bytes.
    for codings in [
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let request = format!(
            "POST /upload HTTP/1.1\r\nHost: game.example\r\nConnection: close\r\n{codings}\r\n\
             8\r\n3\r\nabc\r\n\r\n0\r\n\r\n"
        );
        let resp = send_raw(proxy.addr, request.as_bytes()).await;
        resp.assert_error(400, "MALFORMED_REQUEST");
    }
    assert_eq!(upstream.count(), 0);

    // Plain chunked is forwarded as ever.
    let resp = send_raw(
        proxy.addr,
        b"POST /upload HTTP/1.1\r\n\
          Host: game.example\r\n\
          Connection: close\r\n\
          Transfer-Encoding: chunked\r\n\
          \r\n\
          3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(upstream.last().body, "abc");
}

/// An HTTP/2 connection to the proxy on which each request is sent exactly as built.
async fn h2_connection(
    proxy: &Proxy,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn http2_cookie_fields_reach_the_http1_upstream_as_one() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut h2 = h2_connection(&proxy).await;
    let req = http::Request::get(format!("http://{}/cookies", proxy.addr))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = upstream.last();
    let cookies: Vec<_> = seen.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"]);

    // They count as the one line they make toward the 100-line limit; other fields do not.
    let many = |name: &str| {
        let mut req = http::Request::get(format!("http://{}/many", proxy.addr));
        for i in 0..150 {
            req = req.header(name, format!("c{i}=v"));
        }
        req.body(http_body_util::Full::new(Bytes::new())).unwrap()
    };
    assert_eq!(h2.send_request(many("cookie")).await.unwrap().status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.headers.get_all("cookie").iter().count(), 1);
    assert!(seen.headers["cookie"].to_str().unwrap().ends_with("c149=v"));
    assert_eq!(h2.send_request(many("x-c")).await.unwrap().status(), 431);

    // HTTP/1.1 Cookie lines go upstream as they came, each a line.
    let mut request = b"GET /many HTTP/1.1\r\nHost: game.example\r\nConnection: close\r\n".to_vec();
    for i in 0..150 {
        request.extend_from_slice(format!("Cookie: c{i}=v\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    send_raw(proxy.addr, &request)
        .await
        .assert_error(431, "HEADERS_TOO_LARGE");
}

/// An HTTP/2 request that names no authority, neither by :authority nor by a non-empty Host,
/// is refused: the upstream would be told its own address, or nothing.
#[tokio::test]
async fn http2_request_naming_no_authority_is_refused() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut h2 = h2_connection(&proxy).await;
    for host in [None, Some("")] {
        let mut req = http::Request::get("/nameless");
        if let Some(host) = host {
            req = req.header("host", host);
        }
        let req = req.body(http_body_util::Full::new(Bytes::new())).unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 400, "Host {host:?}");
    }
    assert_eq!(upstream.count(), 0);
    let req = http::Request::get("/named")
        .header("host", "game.example")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    assert_eq!(upstream.last().headers["host"], "game.example");
}

#[tokio::test]
async fn http2_host_contradicting_authority_is_refused() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut h2 = h2_connection(&proxy).await;
    let req = http::Request::get("http://a.example/which")
        .header("host", "b.example")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "MALFORMED_REQUEST");
    assert_eq!(upstream.count(), 0);

    // The same authority in both (letter case aside) is fine.
    let req = http::Request::get("http://a.example/which")
        .header("host", "A.example")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    assert_eq!(upstream.last().headers["host"], "A.example");
}

#[tokio::test]
async fn hop_by_hop_request_headers_never_reach_the_upstream() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = send_raw(
        proxy.addr,
        b"GET /hop HTTP/1.1\r\n\
          Host: game.example\r\n\
          Connection: close, X-Custom-Hop, Keep-Alive\r\n\
          Keep-Alive: timeout=5\r\n\
          Proxy-Connection: keep-alive\r\n\
          TE: trailers\r\n\
          Trailer: X-Checksum\r\n\
          Upgrade: websocket\r\n\
          Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
          X-Custom-Hop: secret\r\n\
          X-End-To-End: kept\r\n\
          \r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = upstream.last();
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "x-custom-hop",
    ] {
        assert!(
            !seen.headers.contains_key(name),
            "{name} reached the upstream: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.headers["x-end-to-end"], "kept");
}

/// A request asking to switch to HTTP/2 in clear text.
const H2C_UPGRADE: &[u8] = b"GET /open HTTP/1.1\r\n\
    Host: game.example\r\n\
    Connection: Upgrade, HTTP2-Settings\r\n\
    Upgrade: h2c\r\n\
    HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\
    \r\n";

/// h2c smuggling: behind an accepted `Upgrade: h2c` the client would speak HTTP/2 to the
/// upstream directly, every request in it unchecked.
#[tokio::test]
async fn an_upgrade_to_anything_but_websocket_is_never_offered_to_the_upstream() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = send_raw(proxy.addr, H2C_UPGRADE).await;
    assert_eq!(resp.status, 200);
    let seen = upstream.last();
    for name in ["upgrade", "connection", "http2-settings"] {
        assert!(
            !seen.headers.contains_key(name),
            "{name}: {:?}",
            seen.headers
        );
    }

    // An upstream that switches anyway is not followed.
    let eager = RawUpstream::start(
        b"HTTP/1.1 101 Switching Protocols\r\n\
          Connection: Upgrade\r\n\
          Upgrade: h2c\r\n\
          \r\n",
    )
    .await;
    let proxy = Proxy::start(&open_config(&eager.url())).await;
    let resp = send_raw(proxy.addr, H2C_UPGRADE).await;
    resp.assert_error(502, "UPSTREAM_UNAVAILABLE");
}

/// Asked for WebSocket, an upstream that switches to something else, or names nothing, is not
/// followed either: its bytes would be tunnelled unread.
#[tokio::test]
async fn a_101_to_a_websocket_request_must_name_websocket() {
    let request = b"GET /ws HTTP/1.1\r\nHost: game.example\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let answers: [&'static [u8]; 2] = [
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
    ];
    for answer in answers {
        let upstream = RawUpstream::start(answer).await;
        let proxy = Proxy::start(&open_config(&upstream.url())).await;
        let resp = send_raw(proxy.addr, request).await;
        resp.assert_error(502, "UPSTREAM_UNAVAILABLE");
    }
}

#[tokio::test]
async fn hop_by_hop_response_headers_never_reach_the_client() {
    let upstream = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\n\
          Content-Length: 2\r\n\
          Connection: X-Upstream-Hop, Keep-Alive\r\n\
          X-Upstream-Hop: secret\r\n\
          Keep-Alive: timeout=5, max=100\r\n\
          Proxy-Connection: keep-alive\r\n\
          Proxy-Authenticate: Basic realm=\"upstream\"\r\n\
          Trailer: X-Checksum\r\n\
          Upgrade: h2c\r\n\
          X-End-To-End: kept\r\n\
          \r\n\
          ok",
    )
    .await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "trailer",
        "upgrade",
        "x-upstream-hop",
    ] {
        assert!(
            !resp.headers().contains_key(name),
            "{name} reached the client: {:?}",
            resp.headers()
        );
    }
    assert_eq!(resp.headers()["x-end-to-end"], "kept");
    assert_eq!(resp.text().await.unwrap(), "ok");
}

// ------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_down_gives_502_upstream_unavailable() {
    let proxy = Proxy::start(&open_config(&format!("http://{}", dead_addr()))).await;
    let resp = client().get(proxy.url("/")).send().await.unwrap();
    assert_error(resp, 502, "UPSTREAM_UNAVAILABLE").await;
}

#[tokio::test]
async fn stalled_upstream_gives_504_upstream_timeout() {
    let upstream = Upstream::start(|_| std::future::pending()).await;
    let config = config_with(&upstream.url(), "[upstream]\nrequest_timeout = \"300ms\"\n");
    let proxy = Proxy::start(&config).await;
    let started = std::time::Instant::now();
    let resp = client().get(proxy.url("/slow")).send().await.unwrap();
    let elapsed = started.elapsed();
    assert_error(resp, 504, "UPSTREAM_TIMEOUT").await;
    assert_eq!(upstream.count(), 1, "the request did reach the upstream");
    assert!(
        elapsed >= std::time::Duration::from_millis(300),
        "answered before the timeout: {elapsed:?}"
    );
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "request_timeout not applied: {elapsed:?}"
    );
}

/// request_timeout is the upstream's time: a client uploading steadily for longer than it is
/// not cut off, and the clock starts once the body has gone upstream.
#[tokio::test]
async fn a_slow_upload_is_not_counted_against_request_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::echo().await;
    let config = config_with(&upstream.url(), "[upstream]\nrequest_timeout = \"1s\"\n");
    let proxy = Proxy::start(&config).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: game.example\r\nConnection: close\r\n\
              Content-Length: 6000\r\n\r\n",
        )
        .await
        .unwrap();
    // 1.8 s of upload, in steady pieces.
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stream.write_all(&[b'x'; 1000]).await.unwrap();
    }
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(upstream.last().body.len(), 6000);
}

#[tokio::test]
async fn an_upstream_stalled_after_the_body_still_times_out() {
    let upstream = Upstream::start(|_| std::future::pending()).await;
    let config = config_with(&upstream.url(), "[upstream]\nrequest_timeout = \"300ms\"\n");
    let proxy = Proxy::start(&config).await;
    let resp = client()
        .post(proxy.url("/slow"))
        .body("a body")
        .send()
        .await
        .unwrap();
    assert_error(resp, 504, "UPSTREAM_TIMEOUT").await;
}

#[tokio::test]
async fn declared_content_length_over_the_limit_gives_413_without_reaching_upstream() {
    let upstream = Upstream::echo().await;
    let config = config_with(&upstream.url(), "[server]\nmax_body_bytes = 1024\n");
    let proxy = Proxy::start(&config).await;
    // Only the head is sent: the refusal must not wait for the body.
    let resp = send_raw(
        proxy.addr,
        b"POST /upload HTTP/1.1\r\nHost: game.example\r\nContent-Length: 1025\r\n\r\n",
    )
    .await;
    resp.assert_error(413, "PAYLOAD_TOO_LARGE");
    assert_eq!(upstream.count(), 0, "the upstream was contacted");
    // The same length repeated, in a list or on two lines, is the same length.
    for repeated in [
        "Content-Length: 1025, 1025\r\n",
        "Content-Length: 1025\r\nContent-Length: 1025\r\n",
    ] {
        let head = format!("POST /upload HTTP/1.1\r\nHost: game.example\r\n{repeated}\r\n");
        let resp = send_raw(proxy.addr, head.as_bytes()).await;
        resp.assert_error(413, "PAYLOAD_TOO_LARGE");
    }
    assert_eq!(upstream.count(), 0, "the upstream was contacted");
}

/// A Content-Length repeated, or padded with zeros (`010`, which an upstream guessing the base
/// reads as octal 8), goes upstream as one plain number.
#[tokio::test]
async fn an_unusual_content_length_goes_upstream_as_one_number() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    for length in ["10, 10", "010", "10\r\nContent-Length: 10"] {
        let request = format!(
            "POST /upload HTTP/1.1\r\nHost: game.example\r\nContent-Length: {length}\r\n\
             Connection: close\r\n\r\nhelloworld"
        );
        let resp = send_raw(proxy.addr, request.as_bytes()).await;
        assert_eq!(resp.status, 200, "{length:?}");
        let seen = upstream.last();
        let lengths: Vec<_> = seen.headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, ["10"], "{length:?}");
        assert_eq!(seen.body, "helloworld");
    }
}

#[tokio::test]
async fn body_at_the_limit_is_forwarded() {
    let upstream = Upstream::echo().await;
    let config = config_with(&upstream.url(), "[server]\nmax_body_bytes = 1024\n");
    let proxy = Proxy::start(&config).await;
    let data = pattern(1024);
    let resp = client()
        .post(proxy.url("/upload"))
        .body(streamed(data.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(upstream.last().body == data);
}

#[tokio::test]
async fn chunked_body_crossing_the_limit_gives_413() {
    let upstream = Upstream::echo().await;
    let config = config_with(&upstream.url(), "[server]\nmax_body_bytes = 1024\n");
    let proxy = Proxy::start(&config).await;
    // 600 + 600 bytes, chunked, no declared length. The final chunk is never sent, so the
    // refusal cannot come from the end of the body; everything sent is read by the proxy.
    let mut request =
        b"POST /upload HTTP/1.1\r\nHost: game.example\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..2 {
        request.extend_from_slice(b"258\r\n");
        request.extend_from_slice(&[b'x'; 600]);
        request.extend_from_slice(b"\r\n");
    }
    let resp = send_raw(proxy.addr, &request).await;
    resp.assert_error(413, "PAYLOAD_TOO_LARGE");
    assert!(
        upstream.seen().iter().all(|s| s.body.len() <= 1024),
        "the upstream received a body over the limit"
    );
}

#[tokio::test]
async fn headers_over_the_limit_give_431() {
    let upstream = Upstream::echo().await;
    let config = config_with(&upstream.url(), "[server]\nmax_header_bytes = 1024\n");
    let proxy = Proxy::start(&config).await;
    let resp = client()
        .get(proxy.url("/"))
        .header("x-big", "a".repeat(2000))
        .send()
        .await
        .unwrap();
    assert_error(resp, 431, "HEADERS_TOO_LARGE").await;
    assert_eq!(upstream.count(), 0, "the upstream was contacted");
}

#[tokio::test]
async fn headers_just_under_the_limit_are_forwarded() {
    let upstream = Upstream::echo().await;
    let config = config_with(&upstream.url(), "[server]\nmax_header_bytes = 4096\n");
    let proxy = Proxy::start(&config).await;
    let resp = client()
        .get(proxy.url("/"))
        .header("x-big", "a".repeat(3000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().headers["x-big"].len(), 3000);
}

#[tokio::test]
async fn headers_past_the_hard_cap_are_refused_before_reaching_portcullis() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    // 300 KiB of headers: past the HTTP layer's own cap (4 x max_header_bytes, at least
    // 64 KiB), which answers a bare 431 itself and closes the connection.
    let mut request = b"GET / HTTP/1.1\r\nHost: game.example\r\nConnection: close\r\n".to_vec();
    for i in 0..300 {
        request.extend_from_slice(format!("x-big-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    let resp = send_raw(proxy.addr, &request).await;
    assert_eq!(resp.status, 431);
    assert_eq!(upstream.count(), 0);
}

/// An absolute-form target names the authority the request is for: a Host naming another is
/// refused, since servers differ on which of the two wins.
#[tokio::test]
async fn a_host_contradicting_an_absolute_form_target_is_refused() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = send_raw(
        proxy.addr,
        b"GET http://a.example/x HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    resp.assert_error(400, "MALFORMED_REQUEST");
    assert_eq!(upstream.count(), 0);
    let resp = send_raw(
        proxy.addr,
        b"GET http://a.example/x HTTP/1.1\r\nHost: A.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(upstream.last().target, "/x");
    assert_eq!(upstream.last().headers["host"], "A.example");
    // A port left out is the scheme's default; another port is another authority.
    for (target, host, status) in [
        ("http://a.example:80/x", "a.example", 200),
        ("http://a.example/x", "a.example:80", 200),
        ("http://a.example:8080/x", "a.example", 400),
        ("http://[::1]:8080/x", "[::1]:8080", 200),
        ("http://[::1]/x", "[::1]:80", 200),
        // User info, or a port that is not one, names no authority to compare.
        ("http://a.example/x", "a.example:abc", 400),
        ("http://a.example/x", "a.example:99999", 400),
        ("http://a.example/x", "evil@a.example", 400),
        ("http://a.example:99999/x", "a.example", 400),
    ] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let resp = send_raw(proxy.addr, request.as_bytes()).await;
        assert_eq!(resp.status, status, "{target} with Host {host}");
    }
}

/// A Host that is not a host name or address with an optional port is refused (RFC 9112 3.2),
/// so an upstream building URLs from Host or X-Forwarded-Host is never handed one; and so is an
/// authority-form target, which is CONNECT's.
#[tokio::test]
async fn a_host_that_names_no_authority_is_refused() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    for host in [
        "a b",
        "evil.example@a.example",
        "a.example/../b",
        "a.example\\b",
        "a\u{85}b",
        "a.example:",
        "a.example:x",
        "a.example:65536",
        "a.example:80:80",
        ":80",
        "[::1",
        "[]",
        "[::1]x",
        "[::1@a]",
        "a.example,b.example",
        "a.example;b",
        "a%41.example",
        "a%zz",
        "[fe80::1%25eth0]",
        "[v1.x]",
        "[1.2.3.4]",
        "[fffff]",
        "[:]",
        // IPv4 in a shorthand that readers expand differently (127.0.0.1 to a browser).
        "127.1",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "a.0x10",
    ] {
        let request = format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        send_raw(proxy.addr, request.as_bytes())
            .await
            .assert_error(400, "MALFORMED_REQUEST");
    }
    let authority_form =
        b"GET a.example:80 HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n";
    send_raw(proxy.addr, authority_form)
        .await
        .assert_error(400, "MALFORMED_REQUEST");
    assert_eq!(
        upstream.count(),
        0,
        "a refused request reached the upstream"
    );

    for host in [
        "a.example",
        "A-1.example:8443",
        "127.0.0.1:80",
        "[::1]",
        "[2001:db8::1]:65535",
        "xn--bcher-kva.example",
        "_grpc._tcp.game.example",
        "game.example.",
        "[::ffff:10.0.0.1]:443",
        "[2001:DB8::1]",
        "1password.example",
        "10.0.0.1",
        "",
    ] {
        let request = format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let resp = send_raw(proxy.addr, request.as_bytes()).await;
        assert_eq!(resp.status, 200, "Host {host:?}");
        assert_eq!(upstream.last().headers["host"], host);
    }
}

/// HTTP/2's :authority reaches the upstream as its Host when the request has none, so it is
/// held to what a Host may be: no user info (RFC 9113 8.3.1), no list, a port that is a number.
#[tokio::test]
async fn http2_authority_that_is_no_host_is_refused() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut h2 = h2_connection(&proxy).await;
    for authority in [
        "evil.example@a.example",
        "a.example,b.example",
        "a.example:99999",
    ] {
        let req = http::Request::get(format!("http://{authority}/which"))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 400, ":authority {authority}");
    }
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn an_asterisk_target_is_for_options_only() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = send_raw(
        proxy.addr,
        b"GET * HTTP/1.1\r\nHost: game.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    resp.assert_error(400, "MALFORMED_REQUEST");
    assert_eq!(upstream.count(), 0);
    let resp = send_raw(
        proxy.addr,
        b"OPTIONS * HTTP/1.1\r\nHost: game.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(upstream.last().target, "*");
}

#[tokio::test]
async fn a_request_body_breaking_its_chunked_framing_is_the_clients_400() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    // A chunk-size line with no digits: the body cannot be read on.
    let resp = send_raw(
        proxy.addr,
        b"POST /upload HTTP/1.1\r\nHost: game.example\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\nzz\r\n",
    )
    .await;
    resp.assert_error(400, "MALFORMED_REQUEST");
}

#[tokio::test]
async fn too_many_headers_give_431_json() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    // 200 one-byte headers: about 2 KiB, far under the 16 KiB byte limit.
    let mut request = b"GET / HTTP/1.1\r\nHost: game.example\r\nConnection: close\r\n".to_vec();
    for i in 0..200 {
        request.extend_from_slice(format!("x-{i}: a\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    let resp = send_raw(proxy.addr, &request).await;
    resp.assert_error(431, "HEADERS_TOO_LARGE");
}

#[tokio::test]
async fn http2_headers_over_the_limit_give_431_json() {
    let upstream = Upstream::echo().await;
    let config = config_with(&upstream.url(), "[server]\nmax_header_bytes = 1024\n");
    let proxy = Proxy::start(&config).await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2
        .get(proxy.url("/"))
        .header("x-big", "a".repeat(2000))
        .send()
        .await
        .unwrap();
    assert_error(resp, 431, "HEADERS_TOO_LARGE").await;
    assert_eq!(upstream.count(), 0);
}

/// An HTTP/2 request with as many fields as a header map holds (24,576), which a raised
/// `max_header_bytes` lets past the HTTP/2 layer, is refused with 431 like any other with over
/// 100 lines; the connection and its other streams carry on.
#[tokio::test]
async fn http2_request_filling_a_header_map_gives_431_and_the_connection_lives_on() {
    let upstream = Upstream::echo().await;
    let config = config_with(&upstream.url(), "[server]\nmax_header_bytes = 1048576\n");
    let proxy = Proxy::start(&config).await;
    let mut h2 = h2_connection(&proxy).await;
    let mut req = http::Request::get(format!("http://{}/full", proxy.addr));
    let headers = req.headers_mut().unwrap();
    for i in 0..24_576 {
        let name = http::HeaderName::from_bytes(format!("h{i}").as_bytes()).unwrap();
        headers.insert(name, http::HeaderValue::from_static(""));
    }
    let req = req.body(http_body_util::Full::new(Bytes::new())).unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 431);
    assert!(resp.headers().contains_key("x-request-id"));
    let req = http::Request::get(format!("http://{}/after", proxy.addr))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn upstream_closing_without_an_answer_gives_502_upstream_unavailable() {
    let upstream = RawUpstream::start(b"").await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = client().get(proxy.url("/")).send().await.unwrap();
    assert_error(resp, 502, "UPSTREAM_UNAVAILABLE").await;
}

// ------------------------------------------------------------------------------------------
// Streaming
// ------------------------------------------------------------------------------------------

async fn read_until(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, needle: &[u8]) {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    while !buf.windows(needle.len()).any(|w| w == needle) {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before {:?}", String::from_utf8_lossy(needle));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn request_body_streams_to_the_upstream_before_the_client_finishes() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (first_part_tx, first_part_rx) = tokio::sync::oneshot::channel();
    let _upstream = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        read_until(&mut stream, &mut buf, b"first-part").await;
        let _ = first_part_tx.send(());
        std::future::pending::<()>().await;
    });
    let proxy = Proxy::start(&open_config(&format!("http://{upstream}"))).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"POST /up HTTP/1.1\r\nHost: game.example\r\nTransfer-Encoding: chunked\r\n\r\na\r\nfirst-part\r\n")
        .await
        .unwrap();
    // The body is not finished (no last chunk) and the client waits: the upstream must
    // already have the first part.
    tokio::time::timeout(std::time::Duration::from_secs(5), first_part_rx)
        .await
        .expect("the first part of the body reached the upstream while the client held the rest")
        .unwrap();
}

#[tokio::test]
async fn response_body_streams_to_the_client_before_the_upstream_finishes() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
    let _upstream = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        read_until(&mut stream, &mut buf, b"\r\n\r\n").await;
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await
            .unwrap();
        let _ = gate_rx.await;
        stream.write_all(b"4\r\nlast\r\n0\r\n\r\n").await.unwrap();
        std::future::pending::<()>().await;
    });
    let proxy = Proxy::start(&open_config(&format!("http://{upstream}"))).await;
    let mut resp = client().get(proxy.url("/down")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), resp.chunk())
        .await
        .expect("the first part reached the client while the upstream held the rest")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"first");
    gate_tx.send(()).unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"last");
}

/// Blank lines before a request line are ignored (RFC 9112 2.2), also when they come one at a
/// time, and count towards the head's hard cap.
#[tokio::test]
async fn blank_lines_before_the_request_line_are_ignored_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;

    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..50 {
        stream.write_all(b"\r\n").await.unwrap();
        stream.flush().await.unwrap();
    }
    stream
        .write_all(
            b"GET /after-blank-lines HTTP/1.1\r\nHost: game.example\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(upstream.last().target, "/after-blank-lines");

    // The hard cap is 64 KiB at the default max_header_bytes.
    let mut request = b"\r\n".repeat(33 * 1024);
    request.extend_from_slice(b"GET / HTTP/1.1\r\nHost: game.example\r\n\r\n");
    let resp = send_raw(proxy.addr, &request).await;
    assert_eq!(resp.status, 431);
    assert_eq!(upstream.count(), 1);
}

/// A client that goes away while its request waits for the upstream's answer takes the
/// request with it: portcullis lets go of the upstream connection instead of finishing the
/// exchange for no one.
#[tokio::test]
async fn a_client_that_goes_away_before_its_answer_releases_the_upstream_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = tokio::sync::oneshot::channel::<()>();
    // Reads the request, never answers, and reports when portcullis closes the connection.
    let upstream = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        assert!(read_head(&mut stream).await);
        arrived_tx.send(()).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await
    });
    let proxy = Proxy::start(&open_config(&format!("http://{upstream_addr}"))).await;

    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /slow HTTP/1.1\r\nHost: game.example\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), arrived)
        .await
        .expect("the request reached the upstream")
        .unwrap();
    drop(client);

    // request_timeout is 30 s: only the client's leaving can end the exchange this soon.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), upstream)
        .await
        .expect("portcullis kept the upstream connection of a client that left");
    assert!(closed.unwrap().is_ok());
}

/// A request pipelined while the one before waits for its answer is read then (the client's
/// socket is watched for its end meanwhile), kept, and answered in its turn.
#[tokio::test]
async fn a_request_pipelined_during_the_wait_is_kept_and_answered_in_turn() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, mut arrived, gate) = gated_upstream().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /first HTTP/1.1\r\nHost: game.example\r\n\r\n")
        .await
        .unwrap();
    reached_upstream(&mut arrived).await;
    client
        .write_all(b"GET /second HTTP/1.1\r\nHost: game.example\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    gate.send(true).unwrap();
    let mut answers = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.read_to_end(&mut answers),
    )
    .await
    .expect("both answers within 5 s")
    .unwrap();
    let answers = String::from_utf8_lossy(&answers);
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
    let targets: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/first", "/second"]);
}
