//! Rate limits with a real Redis and upstream: per-user quotas on the session API and proxy,
//! per-IP quotas for callers without a valid token, decided before any Redis command.

mod observe;
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use portcullis::app::App;
use portcullis::config::Config;
use portcullis::rate_limit::RateLimits;
use support::*;
use tokio::net::TcpListener;

/// portcullis in-process, keeping a handle on its limiters.
struct Limited {
    url: String,
    admin: SocketAddr,
    limits: Arc<RateLimits>,
    _task: tokio::task::JoinHandle<()>,
}

async fn start(toml: &str) -> Limited {
    portcullis::tls::install_crypto_provider();
    let env = [("JWT_SECRET".to_string(), TEST_SECRET.to_string())];
    let config = Config::from_toml(toml, Path::new("."), &env).unwrap();
    let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", public.local_addr().unwrap());
    let admin_addr = admin.local_addr().unwrap();
    let app = App::build(config).unwrap();
    let limits = app.rate_limits.clone();
    let task = tokio::spawn(async move {
        app.run(public, admin, std::future::pending::<()>())
            .await
            .unwrap();
    });
    Limited {
        url,
        admin: admin_addr,
        limits,
        _task: task,
    }
}

fn header(resp: &reqwest::Response, name: &str) -> u64 {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_101st_session_api_request_in_the_window_is_refused_for_that_user_only() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = start(&format!(
        "[upstream]\nurl = \"{}\"\n[redis]\nurl = \"{}\"\n",
        upstream.url(),
        redis.url()
    ))
    .await;
    let http = client();
    let alice = token("alice", None);
    let list = format!("{}/api/v1/sessions/user/sessions", proxy.url);
    for i in 0..100u64 {
        let resp = http.get(&list).bearer_auth(&alice).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {}", i + 1);
        assert_eq!(header(&resp, "ratelimit-limit"), 100);
        assert_eq!(header(&resp, "ratelimit-remaining"), 99 - i);
        // The quota refills one request per 900 s / 100 = 9 s.
        assert_eq!(header(&resp, "ratelimit-reset"), 9 * (i + 1));
    }
    let refused = http.get(&list).bearer_auth(&alice).send().await.unwrap();
    let retry_after = header(&refused, "retry-after");
    assert!((1..=9).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(header(&refused, "ratelimit-remaining"), 0);
    assert_eq!(header(&refused, "ratelimit-reset"), retry_after);
    assert_error(refused, 429, "RATE_LIMITED").await;

    let bob = http
        .get(&list)
        .bearer_auth(token("bob", None))
        .send()
        .await
        .unwrap();
    assert_eq!(bob.status(), 200);
    assert_eq!(header(&bob, "ratelimit-remaining"), 99);
}

#[tokio::test]
async fn a_flood_of_bad_tokens_from_one_ip_is_refused_without_touching_redis() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = start(&format!(
        "[upstream]\nurl = \"{}\"\n[redis]\nurl = \"{}\"\n[rate_limit.anonymous]\nrequests = 5\nper = \"1m\"\n",
        upstream.url(),
        redis.url()
    ))
    .await;
    let http = client();
    let before = redis.total_calls();
    for i in 0..5 {
        let resp = http
            .get(format!("{}/game/state", proxy.url))
            .bearer_auth("not.a.token")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "request {i} is judged on its token");
        assert_eq!(header(&resp, "ratelimit-limit"), 5);
    }
    for _ in 0..20 {
        let resp = http
            .get(format!("{}/game/state", proxy.url))
            .send()
            .await
            .unwrap();
        assert_error(resp, 429, "RATE_LIMITED").await;
    }
    assert_eq!(redis.total_calls(), before, "no Redis command was spent");
    assert_eq!(upstream.count(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn a_burst_within_quota_passes_and_the_next_request_is_limited() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = start(&format!(
        "[upstream]\nurl = \"{}\"\n[redis]\nurl = \"{}\"\n[[routes]]\npath_prefix = \"/\"\nauth = \"jwt\"\n[rate_limit.proxy]\nrequests = 1\nper = \"1h\"\nburst = 20\n",
        upstream.url(),
        redis.url()
    ))
    .await;
    let http = client();
    let t = token("carol", None);
    let sends = (0..20).map(|_| {
        http.get(format!("{}/game", proxy.url))
            .bearer_auth(&t)
            .send()
    });
    for resp in futures_util::future::join_all(sends).await {
        assert_eq!(resp.unwrap().status(), 200);
    }
    assert_eq!(upstream.count(), 20);
    let over = http
        .get(format!("{}/game", proxy.url))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(header(&over, "retry-after"), 3600);
    assert_error(over, 429, "RATE_LIMITED").await;
    assert_eq!(
        upstream.count(),
        20,
        "the limited request never reached the upstream"
    );
}

#[tokio::test]
async fn a_route_with_its_own_quota_limits_anonymous_callers_by_ip() {
    let upstream = Upstream::echo().await;
    let proxy = start(&format!(
        "[upstream]\nurl = \"{}\"\n[[routes]]\npath_prefix = \"/login\"\nauth = \"none\"\nrate_limit = {{ requests = 2, per = \"1m\" }}\n",
        upstream.url()
    ))
    .await;
    let http = client();
    for _ in 0..2 {
        let resp = http
            .post(format!("{}/login", proxy.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let resp = http
        .post(format!("{}/login", proxy.url))
        .send()
        .await
        .unwrap();
    assert_error(resp, 429, "RATE_LIMITED").await;
    assert_eq!(upstream.count(), 2);
}

#[tokio::test]
async fn eviction_keeps_the_tracked_key_count_bounded() {
    let upstream = Upstream::echo().await;
    let proxy = start(&format!(
        "[upstream]\nurl = \"{}\"\n[server]\ntrusted_proxies = [\"127.0.0.1\"]\n{OPEN_ROUTES}[rate_limit]\ngc_interval = \"50ms\"\n[rate_limit.anonymous]\nrequests = 100\nper = \"200ms\"\n",
        upstream.url()
    ))
    .await;
    let http = client();
    // 300 distinct client addresses, via a trusted proxy's X-Forwarded-For.
    for i in 0..300u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        let resp = http
            .get(format!("{}/x", proxy.url))
            .header("x-forwarded-for", ip.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert!(proxy.limits.tracked_keys() > 0);
    // Once every key's window has passed, the next eviction forgets them all.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while proxy.limits.tracked_keys() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} keys still tracked",
            proxy.limits.tracked_keys()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A config behind a trusted load balancer on 127.0.0.1 whose anonymous callers get `requests`
/// per minute.
fn behind_a_load_balancer(upstream: &str, requests: u32) -> String {
    format!(
        "[upstream]\nurl = \"{upstream}\"\n[server]\ntrusted_proxies = [\"127.0.0.1\"]\n{OPEN_ROUTES}[rate_limit.anonymous]\nrequests = {requests}\nper = \"1m\"\n"
    )
}

/// GET `path` as a trusted load balancer forwarding for `xff`, if given.
async fn get_via(
    http: &reqwest::Client,
    proxy: &Limited,
    path: &str,
    xff: Option<&str>,
) -> reqwest::Response {
    let mut req = http.get(format!("{}{path}", proxy.url));
    if let Some(xff) = xff {
        req = req.header("x-forwarded-for", xff);
    }
    req.send().await.unwrap()
}

async fn status_via(http: &reqwest::Client, proxy: &Limited, xff: Option<&str>) -> u16 {
    get_via(http, proxy, "/x", xff).await.status().as_u16()
}

#[tokio::test]
async fn junk_a_client_writes_into_x_forwarded_for_spends_its_own_quota_not_the_load_balancers() {
    let upstream = Upstream::echo().await;
    let proxy = start(&behind_a_load_balancer(&upstream.url(), 2)).await;
    let http = client();
    let junk = Some("unknown, 203.0.113.66");
    assert_eq!(status_via(&http, &proxy, junk).await, 200);
    assert_eq!(status_via(&http, &proxy, junk).await, 200);
    assert_eq!(status_via(&http, &proxy, junk).await, 429);
    assert_eq!(
        status_via(&http, &proxy, Some("203.0.113.66")).await,
        429,
        "the same client without the junk"
    );
    // The load balancer's own address, and its other clients, are untouched.
    assert_eq!(status_via(&http, &proxy, None).await, 200);
    assert_eq!(status_via(&http, &proxy, Some("198.51.100.7")).await, 200);
}

#[tokio::test]
async fn ipv6_callers_are_counted_by_their_64_so_rotating_addresses_does_not_escape() {
    let upstream = Upstream::echo().await;
    let proxy = start(&behind_a_load_balancer(&upstream.url(), 2)).await;
    let http = client();
    assert_eq!(
        status_via(&http, &proxy, Some("2001:db8:1:2::1")).await,
        200
    );
    assert_eq!(
        status_via(&http, &proxy, Some("2001:db8:1:2::2")).await,
        200
    );
    assert_eq!(
        status_via(&http, &proxy, Some("2001:db8:1:2:ffff:ffff:ffff:ffff")).await,
        429,
        "the third address of the same /64"
    );
    assert_eq!(
        status_via(&http, &proxy, Some("2001:db8:1:3::1")).await,
        200
    );
    assert_eq!(proxy.limits.tracked_keys(), 2, "one key per /64");
    // IPv4 callers keep one quota per address.
    for ip in ["192.0.2.1", "192.0.2.1", "192.0.2.2", "192.0.2.2"] {
        assert_eq!(status_via(&http, &proxy, Some(ip)).await, 200, "{ip}");
    }
}

#[tokio::test]
async fn with_a_shorter_ipv6_prefix_a_whole_delegation_is_one_caller() {
    let upstream = Upstream::echo().await;
    let config = behind_a_load_balancer(&upstream.url(), 2).replace(
        "[rate_limit.anonymous]",
        "[rate_limit]\nipv6_prefix = 48\n[rate_limit.anonymous]",
    );
    let proxy = start(&config).await;
    let http = client();
    // Three /64s of one /48: one caller, two requests.
    for (xff, status) in [
        ("2001:db8:1:1::1", 200),
        ("2001:db8:1:2::1", 200),
        ("2001:db8:1:ffff::1", 429),
    ] {
        assert_eq!(status_via(&http, &proxy, Some(xff)).await, status, "{xff}");
    }
    assert_eq!(
        status_via(&http, &proxy, Some("2001:db8:2::1")).await,
        200,
        "the next /48"
    );
    assert_eq!(proxy.limits.tracked_keys(), 2, "one key per /48");
}

#[tokio::test]
async fn a_new_caller_is_refused_while_the_limiter_tracks_its_maximum() {
    let upstream = Upstream::echo().await;
    // Ten requests an hour: nobody goes idle during the test, so no eviction makes room.
    let proxy = start(&format!(
        "[upstream]\nurl = \"{}\"\n[server]\ntrusted_proxies = [\"127.0.0.1\"]\n{OPEN_ROUTES}[rate_limit]\nmax_tracked_callers = 2\ngc_interval = \"1h\"\n[rate_limit.anonymous]\nrequests = 10\nper = \"1h\"\n",
        upstream.url()
    ))
    .await;
    let http = client();
    let via = |xff| get_via(&http, &proxy, "/x", Some(xff));
    assert_eq!(via("192.0.2.1").await.status(), 200);
    assert_eq!(via("192.0.2.2").await.status(), 200);

    let refused = via("192.0.2.3").await;
    assert_eq!(header(&refused, "retry-after"), 1);
    assert_eq!(header(&refused, "ratelimit-limit"), 10);
    assert_eq!(header(&refused, "ratelimit-remaining"), 0);
    assert_eq!(header(&refused, "ratelimit-reset"), 1);
    assert_error(refused, 429, "RATE_LIMITED").await;
    assert_eq!(
        upstream.count(),
        2,
        "the refused caller never reached the upstream"
    );
    assert_eq!(proxy.limits.tracked_keys(), 2, "nor the limiter's table");

    // The callers already tracked keep their quotas.
    let again = via("192.0.2.1").await;
    assert_eq!(again.status(), 200);
    assert_eq!(header(&again, "ratelimit-remaining"), 8);
    assert_eq!(via("192.0.2.2").await.status(), 200);
    assert_eq!(upstream.count(), 4);

    let m = observe::scrape(proxy.admin).await;
    assert_eq!(
        m.get(
            "portcullis_rate_limit_table_full_total",
            &[("class", "anonymous")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_full_route_limiter_names_its_route_in_the_warning() {
    observe::capture();
    let upstream = Upstream::echo().await;
    let proxy = start(&format!(
        "[upstream]\nurl = \"{}\"\n[server]\ntrusted_proxies = [\"127.0.0.1\"]\n[rate_limit]\nmax_tracked_callers = 1\ngc_interval = \"1h\"\n[[routes]]\npath_prefix = \"/login-full\"\nauth = \"none\"\nrate_limit = {{ requests = 10, per = \"1h\" }}\n",
        upstream.url()
    ))
    .await;
    let http = client();
    let via = |xff| get_via(&http, &proxy, "/login-full", Some(xff));
    assert_eq!(via("192.0.2.10").await.status(), 200);
    assert_eq!(via("192.0.2.11").await.status(), 429);
    let warned = observe::capture()
        .wait_for("the full route limiter's warning", |e| {
            e.level == tracing::Level::WARN && e.field("route") == Some("/login-full")
        })
        .await;
    // The route's table for addresses: its users have one of their own.
    assert_eq!(
        warned[0].field("limiter"),
        Some("route_anonymous"),
        "{warned:#?}"
    );
}

/// A backend may route `/SIGNIN` or `/signin;a` to its `/signin` handler, so they count against
/// `/signin`'s quota, though read as they are they match no route and need a session (the
/// default). A user with a session cannot step around the route's quota with them.
#[tokio::test]
async fn path_variants_count_against_the_quota_of_every_route_they_may_reach() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(
        &upstream,
        &redis,
        "[[routes]]\npath_prefix = \"/signin\"\nauth = \"none\"\n\
         rate_limit = { requests = 2, per = \"1m\" }\n",
    ))
    .await;
    let sid = create_session(&proxy, &token("mallory", None)).await;
    let t = token("mallory", Some(&sid));
    let get = |path: &str| client().get(proxy.url(path)).bearer_auth(&t).send();
    for _ in 0..2 {
        assert_eq!(get("/signin").await.unwrap().status(), 200);
    }
    for path in ["/signin", "/SIGNIN", "/signin;a", "/SignIn/x"] {
        assert_error(get(path).await.unwrap(), 429, "RATE_LIMITED").await;
    }
    assert_eq!(upstream.count(), 2);
}
