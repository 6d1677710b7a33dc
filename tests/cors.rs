//! Cross-origin requests from browser clients: preflights answered before authentication,
//! allowed origins' responses (refusals included) readable by their pages, and nothing changed
//! for requests without `Origin` or when `[cors]` allows no origin.

mod support;

use support::*;

const GAME: &str = "https://play.example.com";

const CORS: &str = "\
[cors]
allowed_origins = [\"https://play.example.com\", \"http://localhost:5173\"]

[[routes]]
path_prefix = \"/open\"
auth = \"none\"
";

struct Setup {
    _redis: RedisServer,
    upstream: Upstream,
    proxy: Proxy,
}

async fn setup(extra: &str) -> Setup {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &redis, extra)).await;
    Setup {
        _redis: redis,
        upstream,
        proxy,
    }
}

fn preflight(proxy: &Proxy, path: &str, origin: &str) -> reqwest::RequestBuilder {
    client()
        .request(reqwest::Method::OPTIONS, proxy.url(path))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn a_preflight_from_an_allowed_origin_is_answered_without_a_token() {
    let s = setup(CORS).await;
    for path in ["/game/state", "/api/v1/sessions/create", "/open/x"] {
        let resp = preflight(&s.proxy, path, GAME).send().await.unwrap();
        assert_eq!(resp.status(), 204, "{path}");
        assert_eq!(header(&resp, "access-control-allow-origin"), Some(GAME));
        assert_eq!(
            header(&resp, "access-control-allow-methods"),
            Some("GET, HEAD, POST, PUT, PATCH, DELETE")
        );
        let allowed = header(&resp, "access-control-allow-headers").unwrap();
        for name in [
            "authorization",
            "content-type",
            "x-session-id",
            "x-request-id",
        ] {
            assert!(
                allowed.split(", ").any(|h| h == name),
                "{name} in {allowed}"
            );
        }
        assert_eq!(header(&resp, "access-control-max-age"), Some("600"));
        assert!(header(&resp, "vary").unwrap().contains("origin"));
        assert!(header(&resp, "access-control-allow-credentials").is_none());
    }
    // A port other than the default is part of the origin.
    let resp = preflight(&s.proxy, "/game", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        Some("http://localhost:5173")
    );
    assert_eq!(s.upstream.count(), 0, "a preflight reached the upstream");
}

#[tokio::test]
async fn a_preflight_from_another_origin_is_refused() {
    let s = setup(CORS).await;
    for origin in [
        "https://evil.example",
        "http://play.example.com",
        "https://play.example.com:8443",
        "null",
    ] {
        let resp = preflight(&s.proxy, "/game", origin).send().await.unwrap();
        assert!(header(&resp, "access-control-allow-origin").is_none());
        let vary = header(&resp, "vary")
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(vary.contains("origin"), "Vary: {vary}");
        assert_error(resp, 403, "ORIGIN_NOT_ALLOWED").await;
    }
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn responses_to_an_allowed_origin_are_readable_and_replace_the_upstreams_answer() {
    let upstream = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\n\
          Content-Length: 2\r\n\
          Access-Control-Allow-Origin: *\r\n\
          Access-Control-Allow-Credentials: true\r\n\
          Vary: Accept-Encoding\r\n\
          \r\n\
          ok",
    )
    .await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(&format!(
        "[upstream]\nurl = \"{}\"\n\n[redis]\nurl = \"{}\"\n\n{CORS}",
        upstream.url(),
        redis.url()
    ))
    .await;
    let resp = client()
        .get(proxy.url("/open/x"))
        .header("origin", GAME)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(GAME));
    assert!(header(&resp, "access-control-allow-credentials").is_none());
    let exposed = header(&resp, "access-control-expose-headers").unwrap();
    assert!(exposed.contains("x-request-id") && exposed.contains("retry-after"));
    let vary: Vec<_> = resp.headers().get_all("vary").iter().collect();
    assert_eq!(vary, ["Accept-Encoding", "origin"]);

    // Another origin, or none, gets no permission at all, not even the upstream's own.
    for origin in [Some("https://evil.example"), None] {
        let mut req = client().get(proxy.url("/open/x"));
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            header(&resp, "access-control-allow-origin").is_none(),
            "{origin:?}"
        );
        assert!(header(&resp, "access-control-allow-credentials").is_none());
    }
}

#[tokio::test]
async fn a_refusal_to_an_allowed_origin_is_readable_by_its_page() {
    let s = setup(CORS).await;
    let resp = client()
        .get(s.proxy.url("/game"))
        .header("origin", GAME)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(GAME));
    assert_error(resp, 401, "TOKEN_MISSING").await;

    // Another origin's request is answered as ever, without the header.
    let resp = client()
        .get(s.proxy.url("/game"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(header(&resp, "access-control-allow-origin").is_none());
    assert_eq!(header(&resp, "vary"), Some("origin"));
    assert_error(resp, 401, "TOKEN_MISSING").await;
}

/// With CORS on, whether a response carries Access-Control-Allow-Origin depends on Origin:
/// every response says so, or a shared cache could serve a page another client's copy.
#[tokio::test]
async fn responses_without_origin_vary_on_it_too() {
    let s = setup(CORS).await;
    let resp = client().get(s.proxy.url("/open/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "access-control-allow-origin").is_none());
    assert_eq!(header(&resp, "vary"), Some("origin"));
}

#[tokio::test]
async fn an_options_request_that_is_not_a_preflight_is_forwarded() {
    let s = setup(CORS).await;
    let resp = client()
        .request(reqwest::Method::OPTIONS, s.proxy.url("/open/x"))
        .header("origin", GAME)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(s.upstream.last().method, http::Method::OPTIONS);
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(GAME));
}

#[tokio::test]
async fn without_cors_nothing_changes() {
    let s = setup("[[routes]]\npath_prefix = \"/open\"\nauth = \"none\"\n").await;
    let resp = preflight(&s.proxy, "/game", GAME).send().await.unwrap();
    assert!(header(&resp, "access-control-allow-origin").is_none());
    assert_error(resp, 401, "TOKEN_MISSING").await;
    let resp = client()
        .get(s.proxy.url("/open/x"))
        .header("origin", GAME)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "access-control-allow-origin").is_none());
    assert!(header(&resp, "vary").is_none(), "CORS off: nothing added");
}

#[tokio::test]
async fn credentials_and_any_origin() {
    let s = setup(
        "[cors]\nallowed_origins = [\"https://play.example.com\"]\nallow_credentials = true\n",
    )
    .await;
    let resp = preflight(&s.proxy, "/game", GAME).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        header(&resp, "access-control-allow-credentials"),
        Some("true")
    );

    let s = setup("[cors]\nallowed_origins = [\"*\"]\n").await;
    let resp = preflight(&s.proxy, "/game", "https://anyone.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        Some("https://anyone.example")
    );
}
