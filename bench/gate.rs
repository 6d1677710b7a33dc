//! Micro-benchmarks of the per-request gate without network: JWT verification, header
//! stripping and identity injection, route matching.
//!
//! `cargo bench --bench gate` measures; `cargo test --all-targets` runs each benchmark once
//! (criterion's test mode) so they cannot rot. bench/run.sh runs them with short timings.

use std::convert::Infallible;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use portcullis::authn::{authenticate, AuthnLayer, Verifier};
use portcullis::config::{AuthMode, Config, JwtConfig};
use portcullis::facts::RequestFacts;
use portcullis::forward::{set_identity, strip_hop_by_hop};
use portcullis::routes::{normalise, RouteClass, RouteTable, Routes};
use portcullis::session::gate::Identity;
use portcullis::session::Platform;
use portcullis::Body;
use tower::{Layer, Service, ServiceExt};

const SECRET: &str = "portcullis-bench-secret-0123456789abcdef";
const USER: &str = "5f0c2a4e-8a7b-4c1e-9d3f-2b6a1c0e7d94";
const SID: &str = "0b7e3c52-1f4d-4a9e-8c6b-3d2f1e0a9b87";

/// The bench configuration: HS256 and a realistic route table.
fn config() -> Config {
    let toml = r#"
[[routes]]
path_prefix = "/login"
auth = "none"
[[routes]]
path_prefix = "/public"
auth = "none"
[[routes]]
path_prefix = "/public/assets"
auth = "none"
[[routes]]
path_prefix = "/leaderboard"
auth = "jwt"
[[routes]]
path_prefix = "/game"
auth = "session"
[[routes]]
path_prefix = "/game/matchmaking/queue"
auth = "session"
"#;
    let env = [("JWT_SECRET".to_string(), SECRET.to_string())];
    Config::from_toml(toml, Path::new("."), &env).expect("bench config is valid")
}

fn token(config: &Config, sid: Option<&str>) -> String {
    portcullis::authn::dev_token(&config.jwt, USER, sid, Duration::from_secs(3600))
        .expect("sign a bench token")
}

/// The headers a game client typically sends, plus hop-by-hop ones a proxy must drop.
fn client_headers(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut add = |name: &'static str, value: &str| {
        h.append(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).expect("header value"),
        );
    };
    add("host", "game.example.com");
    add("user-agent", "Mozilla/5.0 (Linux; Android 14; Pixel 8 Pro Build/UQ1A.240205.004) AppleWebKit/537.36 (KHTML, like Gecko) GameClient/3.2");
    add("accept", "application/json");
    add("accept-encoding", "gzip, deflate, br");
    add("accept-language", "en-GB,en;q=0.9");
    add("authorization", &format!("Bearer {token}"));
    add("content-type", "application/json");
    add("x-request-id", "7c9e6679-7425-40de-944b-e07fc1f90ae7");
    add("x-client-version", "3.2.17");
    add("connection", "keep-alive, x-trace");
    add("keep-alive", "timeout=5");
    add("x-trace", "abc");
    add("te", "trailers");
    // A forged identity that must be stripped.
    add("x-user-id", "admin");
    add("x-session-id", SID);
    h
}

/// The JWT settings with no verified token remembered.
fn full_verification(config: &Config) -> JwtConfig {
    JwtConfig {
        verified_tokens: 0,
        ..config.jwt.clone()
    }
}

fn jwt(c: &mut Criterion) {
    let config = config();
    // Full verification every time; `remembering` is the default, which skips the signature
    // check for a token it verified before.
    let verifier =
        Verifier::new(&full_verification(&config), Default::default()).expect("verifier");
    let remembering = Verifier::new(&config.jwt, Default::default()).expect("verifier");
    let with_sid = token(&config, Some(SID));
    let without_sid = token(&config, None);
    let mut forged = with_sid.clone();
    forged.pop();
    forged.push(if with_sid.ends_with('A') { 'B' } else { 'A' });

    let mut g = c.benchmark_group("jwt");
    g.bench_function("verify_hs256_with_sid", |b| {
        b.iter(|| verifier.verify(black_box(&with_sid)).expect("valid"))
    });
    g.bench_function("verify_hs256_no_sid", |b| {
        b.iter(|| verifier.verify(black_box(&without_sid)).expect("valid"))
    });
    g.bench_function("verify_hs256_remembered", |b| {
        b.iter(|| remembering.verify(black_box(&with_sid)).expect("valid"))
    });
    g.bench_function("verify_bad_signature", |b| {
        b.iter(|| verifier.verify(black_box(&forged)).is_err())
    });
    let headers = client_headers(&with_sid);
    let class = RouteClass::Proxy {
        auth: AuthMode::Session,
        routes: Routes::one(None),
    };
    g.bench_function("authenticate_from_headers", |b| {
        b.iter(|| {
            authenticate(&verifier, class, black_box(&headers), None)
                .expect("valid")
                .expect("authenticated")
        })
    });
    g.finish();
}

fn headers(c: &mut Criterion) {
    let config = config();
    let tok = token(&config, Some(SID));
    let base = client_headers(&tok);
    let identity = Identity {
        user_id: USER.into(),
        session_id: Some(uuid::Uuid::parse_str(SID).expect("uuid")),
        platform: Some(Platform::Android),
    };

    let mut g = c.benchmark_group("headers");
    g.bench_function("strip_hop_by_hop_request", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |h| strip_hop_by_hop(h, false, &[]),
            BatchSize::SmallInput,
        )
    });
    let mut plain = base.clone();
    plain.remove("connection");
    plain.remove("keep-alive");
    plain.remove("te");
    g.bench_function("strip_hop_by_hop_no_connection_header", |b| {
        b.iter_batched_ref(
            || plain.clone(),
            |h| strip_hop_by_hop(h, false, &[]),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("inject_identity", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |h| set_identity(h, &config.identity, Some(&identity)),
            BatchSize::SmallInput,
        )
    });

    // The Authn layer as the stack runs it: strip client identity headers, verify the bearer
    // token (fully), attach the identity; the inner service answers at once.
    let verifier =
        Arc::new(Verifier::new(&full_verification(&config), Default::default()).expect("verifier"));
    let layer = AuthnLayer {
        verifier,
        identity: Arc::new(config.identity.clone()),
        websocket_query_token: None,
    };
    let inner = tower::service_fn(|_req: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::new(http_body_util::Empty::<
            bytes::Bytes,
        >::new())))
    });
    let svc = layer.layer(inner);
    g.bench_function("authn_layer_strip_verify_attach", |b| {
        b.iter_batched(
            || {
                let mut req = Request::new(Body::new(http_body_util::Empty::<bytes::Bytes>::new()));
                *req.headers_mut() = base.clone();
                RequestFacts::of_mut(&mut req).route = Some(RouteClass::Proxy {
                    auth: AuthMode::Session,
                    routes: Routes::one(None),
                });
                (svc.clone(), req)
            },
            |(mut svc, req)| {
                svc.ready()
                    .now_or_never()
                    .expect("ready at once")
                    .expect("infallible");
                svc.call(req)
                    .now_or_never()
                    .expect("answers at once")
                    .expect("infallible")
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn routes(c: &mut Criterion) {
    let config = config();
    let table = RouteTable::new(&config.session.api_prefix, &config.routes);
    let mut g = c.benchmark_group("routes");
    let paths = [
        ("classify_simple", "/game/state"),
        ("classify_deep", "/game/matchmaking/queue/join/eu-west"),
        ("classify_open", "/login"),
        (
            "classify_api",
            "/api/v1/sessions/0b7e3c52-1f4d-4a9e-8c6b-3d2f1e0a9b87",
        ),
        ("classify_unmatched", "/shop/items/42"),
        ("classify_encoded_dots", "/public/%2e%2e/game//state/./x"),
    ];
    for (name, path) in paths {
        g.bench_function(name, |b| b.iter(|| table.classify(black_box(path))));
    }
    g.bench_function("normalise_simple", |b| {
        b.iter(|| normalise(black_box("/game/state")))
    });
    g.bench_function("normalise_encoded", |b| {
        b.iter(|| normalise(black_box("/public/%2e%2e/game//state/./x%20y")))
    });
    g.finish();
}

criterion_group!(gate, jwt, headers, routes);
criterion_main!(gate);
