//! Bearer tokens: what is accepted, what is refused and how (RFC 6750 challenges), and the
//! `portcullis dev-token` command. Every refused token carries the sub and sid of a live
//! session, so that only the token itself can be the reason.

mod observe;
mod support;

use std::path::Path;
use std::process::Command;

use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use support::*;

const USER: &str = "alice";

struct Setup {
    redis: RedisServer,
    upstream: Upstream,
    proxy: Proxy,
    sid: String,
}

/// A proxy with sessions in a fresh Redis (extra config appended) and one live session of
/// [`USER`], opened with `create_token` (a valid HS256 token when `None`).
async fn setup_with(extra: &str, create_token: Option<String>) -> Setup {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &redis, extra)).await;
    let t = create_token.unwrap_or_else(|| token(USER, None));
    let sid = create_session(&proxy, &t).await;
    Setup {
        redis,
        upstream,
        proxy,
        sid,
    }
}

async fn setup() -> Setup {
    setup_with("[jwt]\nleeway = \"0s\"\n", None).await
}

impl Setup {
    /// Claims a valid token for the live session would carry.
    fn claims(&self) -> Value {
        json!({
            "sub": USER,
            "sid": self.sid,
            "iat": now_secs(),
            "exp": now_secs() + 600,
        })
    }

    async fn get(&self, token: &str) -> reqwest::Response {
        client()
            .get(self.proxy.url("/game/state"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// The token is accepted: the request reaches the upstream as the session's user.
    async fn assert_accepted(&self, token: &str) {
        let before = self.upstream.count();
        let resp = self.get(token).await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        assert_eq!(self.upstream.count(), before + 1);
        assert_eq!(self.upstream.last().headers["x-user-id"], USER);
    }

    /// The token is refused with `code` and an invalid_token challenge, before Redis and
    /// without reaching the upstream. Returns the refused request's id.
    async fn assert_refused(&self, token: &str, code: &str) -> String {
        let before = self.upstream.count();
        let scripts = self.redis.command_calls("evalsha");
        let resp = self.get(token).await;
        let request_id = resp.headers()["x-request-id"]
            .to_str()
            .expect("a printable request id")
            .to_string();
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some(r#"Bearer error="invalid_token""#),
            "challenge for {code}"
        );
        assert_error(resp, 401, code).await;
        assert_eq!(
            self.upstream.count(),
            before,
            "a refused request was forwarded"
        );
        assert_eq!(
            self.redis.command_calls("evalsha"),
            scripts,
            "a refused token still cost a session lookup"
        );
        request_id
    }
}

// ---------------------------------------------------------------------------------------------
// No token
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_request_without_a_token_is_401_token_missing_with_a_bare_bearer_challenge() {
    let s = setup().await;
    let resp = client().get(s.proxy.url("/game")).send().await.unwrap();
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    assert_error(resp, 401, "TOKEN_MISSING").await;
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn an_authorization_header_of_another_scheme_counts_as_no_token() {
    let s = setup().await;
    for value in ["Basic YWxpY2U6cHc=", "Bearer", "Bearer    ", "Token abc"] {
        let resp = client()
            .get(s.proxy.url("/game"))
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_error(resp, 401, "TOKEN_MISSING").await;
    }
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn a_valid_token_with_a_live_session_is_accepted() {
    let s = setup().await;
    s.assert_accepted(&sign(&s.claims())).await;
}

// ---------------------------------------------------------------------------------------------
// Malformed and forged tokens
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_malformed_token_is_401_token_invalid() {
    let s = setup().await;
    let good = sign(&s.claims());
    let (head, rest) = good.split_once('.').unwrap();
    let truncated = &good[..good.len() - 5];
    for bad in [
        "abc",
        "a.b.c",
        "...",
        truncated,
        &format!("{head}.!!!.{rest}"),
        &format!("{good}.extra"),
    ] {
        s.assert_refused(bad, "TOKEN_INVALID").await;
    }
}

#[tokio::test]
async fn an_alg_none_token_is_refused() {
    let s = setup().await;
    let claims = b64url(s.claims().to_string().as_bytes());
    for alg in ["none", "None", "NONE"] {
        let header = b64url(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes());
        s.assert_refused(&format!("{header}.{claims}."), "TOKEN_INVALID")
            .await;
        // Keeping a valid HS256 signature does not help either.
        let valid = sign(&s.claims());
        let signature = valid.rsplit('.').next().unwrap();
        s.assert_refused(&format!("{header}.{claims}.{signature}"), "TOKEN_INVALID")
            .await;
    }
}

/// A header parameter the token says must be understood (`crit`) is one portcullis does not
/// understand, whatever it names: RFC 7515 has such a token refused.
#[tokio::test]
async fn a_token_with_critical_header_parameters_is_refused() {
    let s = setup().await;
    for crit in [vec!["exp-policy"], vec!["b64"]] {
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.crit = Some(crit.iter().map(|c| c.to_string()).collect());
        let token = jsonwebtoken::encode(
            &header,
            &s.claims(),
            &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
        )
        .unwrap();
        s.assert_refused(&token, "TOKEN_INVALID").await;
    }
}

#[tokio::test]
async fn a_token_signed_with_another_secret_is_refused() {
    let s = setup().await;
    let other = b"another-secret-that-is-long-enough-0123456789";
    s.assert_refused(
        &sign_hmac(Algorithm::HS256, other, &s.claims()),
        "TOKEN_INVALID",
    )
    .await;
}

#[tokio::test]
async fn a_token_whose_payload_was_altered_after_signing_is_refused() {
    let s = setup().await;
    let good = sign(&s.claims());
    let parts: Vec<&str> = good.split('.').collect();
    let mut claims = s.claims();
    claims["exp"] = json!(now_secs() + 86_400 * 365);
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64url(claims.to_string().as_bytes()),
        parts[2]
    );
    s.assert_refused(&forged, "TOKEN_INVALID").await;
}

#[tokio::test]
async fn a_token_with_an_hmac_algorithm_that_is_not_pinned_is_refused() {
    let s = setup().await;
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        s.assert_refused(
            &sign_hmac(alg, TEST_SECRET.as_bytes(), &s.claims()),
            "TOKEN_INVALID",
        )
        .await;
    }
}

/// An RSA key pair made by openssl in `dir`: (private PEM path, public PEM path).
fn rsa_key_pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let status = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&private)
        .arg("2048")
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl must be installed");
    assert!(status.success(), "openssl genrsa");
    let status = Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl rsa");
    assert!(status.success(), "openssl rsa -pubout");
    (private, public)
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_rs256_public_key_as_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = rsa_key_pair(dir.path());
    let private_pem = std::fs::read(&private).unwrap();
    let public_pem = std::fs::read(&public).unwrap();
    let rs256 = |claims: &Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::RS256),
            claims,
            &jsonwebtoken::EncodingKey::from_rsa_pem(&private_pem).unwrap(),
        )
        .unwrap()
    };
    let extra = format!(
        "[jwt]\nalgorithms = [\"RS256\"]\npublic_key_pem = \"{}\"\n",
        public.display()
    );
    let create = rs256(&json!({"sub": USER, "exp": now_secs() + 600}));
    let s = setup_with(&extra, Some(create)).await;

    // The genuine article works, so the key and the session are right.
    s.assert_accepted(&rs256(&s.claims())).await;
    // The classic confusion: HMAC keyed with the public key the server verifies with.
    s.assert_refused(
        &sign_hmac(Algorithm::HS256, &public_pem, &s.claims()),
        "TOKEN_INVALID",
    )
    .await;
    let trimmed = String::from_utf8(public_pem.clone()).unwrap();
    s.assert_refused(
        &sign_hmac(Algorithm::HS256, trimmed.trim().as_bytes(), &s.claims()),
        "TOKEN_INVALID",
    )
    .await;
    // Nor is an HS256 token signed with the secret the process has in JWT_SECRET.
    s.assert_refused(&sign(&s.claims()), "TOKEN_INVALID").await;
}

// ---------------------------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_expired_token_is_401_token_expired() {
    let s = setup().await;
    let mut claims = s.claims();
    claims["exp"] = json!(now_secs() - 5);
    s.assert_refused(&sign(&claims), "TOKEN_EXPIRED").await;
}

#[tokio::test]
async fn a_token_that_is_not_yet_valid_is_401_token_invalid() {
    let s = setup().await;
    let mut claims = s.claims();
    claims["nbf"] = json!(now_secs() + 60);
    s.assert_refused(&sign(&claims), "TOKEN_INVALID").await;
    // A past nbf is fine.
    claims["nbf"] = json!(now_secs() - 60);
    s.assert_accepted(&sign(&claims)).await;
}

/// RFC 7519 allows a NumericDate with a fraction (`Date.now() / 1000` in JavaScript).
#[tokio::test]
async fn fractional_exp_and_nbf_are_read_as_numeric_dates() {
    let s = setup().await;
    let mut claims = s.claims();
    claims["exp"] = json!(now_secs() as f64 + 600.25);
    claims["nbf"] = json!(now_secs() as f64 - 60.5);
    s.assert_accepted(&sign(&claims)).await;
    claims["exp"] = json!(now_secs() as f64 - 5.5);
    s.assert_refused(&sign(&claims), "TOKEN_EXPIRED").await;
    claims["exp"] = json!(now_secs() as f64 + 600.25);
    claims["nbf"] = json!(now_secs() as f64 + 60.5);
    s.assert_refused(&sign(&claims), "TOKEN_INVALID").await;
    // Not a number is not a NumericDate.
    claims["nbf"] = json!("yesterday");
    s.assert_refused(&sign(&claims), "TOKEN_INVALID").await;
}

#[tokio::test]
async fn the_configured_leeway_allows_a_slightly_expired_token() {
    let s = setup_with("[jwt]\nleeway = \"60s\"\n", None).await;
    let mut claims = s.claims();
    claims["exp"] = json!(now_secs() - 10);
    s.assert_accepted(&sign(&claims)).await;
    claims["exp"] = json!(now_secs() - 120);
    s.assert_refused(&sign(&claims), "TOKEN_EXPIRED").await;
}

#[tokio::test]
async fn a_remembered_token_is_refused_once_it_expires() {
    let capture = observe::capture();
    let s = setup().await;
    // A few seconds ahead, so that both requests below are made before it expires.
    let exp = now_secs() + 3;
    let mut claims = s.claims();
    claims["exp"] = json!(exp);
    let t = sign(&claims);
    // The second request finds the token remembered (jwt.verified_tokens).
    s.assert_accepted(&t).await;
    s.assert_accepted(&t).await;
    // With no leeway a token is expired once the clock is past its exp.
    while now_secs() <= exp {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let request_id = s.assert_refused(&t, "TOKEN_EXPIRED").await;
    // It was refused from the table of verified tokens (whose entries have only their exp and
    // nbf checked again), not by verifying the token anew: the token was remembered. The two
    // paths log the refusal differently: the remembered one names the rejection
    // (`TokenExpired`), a full verification the decoder's error (`ExpiredSignature`).
    let refusals = capture
        .wait_for("the refusal's log event", |e| {
            e.span_field("request_id") == Some(request_id.as_str())
                && e.field("message") == Some("token rejected")
        })
        .await;
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    assert_eq!(
        refusals[0].field("reason"),
        Some("TokenExpired"),
        "refused by verifying the token anew, so it was not remembered: {refusals:#?}"
    );
}

#[tokio::test]
async fn a_remembered_token_vouches_for_no_other_token() {
    let s = setup().await;
    let t = sign(&s.claims());
    s.assert_accepted(&t).await;
    // The same header and payload under another signature, and the token cut short.
    let (signed_part, _) = t.rsplit_once('.').unwrap();
    s.assert_refused(
        &format!("{signed_part}.{}", b64url(&[7u8; 32])),
        "TOKEN_INVALID",
    )
    .await;
    s.assert_refused(&t[..t.len() - 2], "TOKEN_INVALID").await;
    s.assert_accepted(&t).await;
}

#[tokio::test]
async fn a_token_without_exp_is_refused() {
    let s = setup().await;
    let mut claims = s.claims();
    claims.as_object_mut().unwrap().remove("exp");
    s.assert_refused(&sign(&claims), "TOKEN_INVALID").await;
}

// ---------------------------------------------------------------------------------------------
// Claims
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_without_a_usable_sub_is_refused() {
    let s = setup().await;
    let mut claims = s.claims();
    claims.as_object_mut().unwrap().remove("sub");
    s.assert_refused(&sign(&claims), "TOKEN_INVALID").await;
    for sub in [
        json!(""),
        json!(42),
        json!(null),
        json!("a}b"),
        json!("a b"),
    ] {
        claims["sub"] = sub;
        s.assert_refused(&sign(&claims), "TOKEN_INVALID").await;
    }
}

#[tokio::test]
async fn issuer_and_audience_are_enforced_when_configured() {
    let extra = "[jwt]\nleeway = \"0s\"\nissuer = \"game-auth\"\naudience = \"game-clients\"\n";
    let create = sign(&json!({
        "sub": USER, "exp": now_secs() + 600, "iss": "game-auth", "aud": "game-clients"
    }));
    let s = setup_with(extra, Some(create)).await;
    let mut good = s.claims();
    good["iss"] = json!("game-auth");
    good["aud"] = json!("game-clients");
    s.assert_accepted(&sign(&good)).await;

    let variants: [(&str, Option<Value>); 5] = [
        ("iss", Some(json!("evil-auth"))),
        ("iss", None),
        // An issuer is one string: not a list that holds the one configured.
        ("iss", Some(json!(["game-auth", "evil-auth"]))),
        ("aud", Some(json!("other-game"))),
        ("aud", None),
    ];
    for (claim, value) in variants {
        let mut claims = good.clone();
        match value {
            Some(v) => claims[claim] = v,
            None => {
                claims.as_object_mut().unwrap().remove(claim);
            }
        }
        s.assert_refused(&sign(&claims), "TOKEN_INVALID").await;
    }
}

#[tokio::test]
async fn the_session_api_refuses_bad_tokens_too() {
    let s = setup().await;
    let claims = b64url(
        json!({"sub": "mallory", "exp": now_secs() + 600})
            .to_string()
            .as_bytes(),
    );
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let other = b"another-secret-that-is-long-enough-0123456789";
    let expired = json!({"sub": "mallory", "exp": now_secs() - 5});
    let bad = [
        (format!("{header}.{claims}."), "TOKEN_INVALID"),
        (
            sign_hmac(
                Algorithm::HS256,
                other,
                &json!({"sub": "mallory", "exp": now_secs() + 600}),
            ),
            "TOKEN_INVALID",
        ),
        (sign(&expired), "TOKEN_EXPIRED"),
    ];
    for (t, code) in bad {
        let resp = client()
            .post(s.proxy.url("/api/v1/sessions/create"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some(r#"Bearer error="invalid_token""#)
        );
        assert_error(resp, 401, code).await;
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*mallory*")
        .query(&mut s.redis.conn())
        .unwrap();
    assert!(keys.is_empty(), "a refused token created {keys:?}");
}

// ---------------------------------------------------------------------------------------------
// portcullis dev-token
// ---------------------------------------------------------------------------------------------

/// Runs `portcullis dev-token` with a config file holding `config` plus `jwt.secret` =
/// [`TEST_SECRET`] (and no environment at all).
fn dev_token(config: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let secret = format!("[jwt]\nsecret = \"{TEST_SECRET}\"\n");
    let config = if config.contains("[jwt]\n") {
        config.replacen("[jwt]\n", &secret, 1)
    } else {
        format!("{config}\n{secret}")
    };
    std::fs::write(&path, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("dev-token")
        .args(args)
        .arg("--config")
        .arg(&path)
        .env_clear()
        .output()
        .expect("run portcullis dev-token");
    assert!(
        output.status.success(),
        "dev-token failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let token = stdout.trim().to_string();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {stdout:?}");
    assert_eq!(
        stdout,
        format!("{token}\n"),
        "prints the token and a newline only"
    );
    token
}

/// Runs `portcullis dev-token ARGS` with only `jwt.secret` configured, for a run expected to
/// be refused: its exit code and stderr, after checking that it printed no token.
fn dev_token_refused(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, format!("[jwt]\nsecret = \"{TEST_SECRET}\"\n")).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("dev-token")
        .args(args)
        .arg("--config")
        .arg(&path)
        .env_clear()
        .output()
        .expect("run portcullis dev-token");
    assert!(!output.status.success(), "{args:?} was accepted");
    assert!(output.stdout.is_empty(), "{args:?} printed a token");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

/// A `--ttl` over the century every configured duration is capped at is refused by name, as is
/// one past the end of time (not wrapped round to a token that expired in 1970); a century is
/// still taken.
#[test]
fn dev_token_refuses_a_ttl_over_100_years() {
    for ttl in ["18446744073709551615s", "1000000000y", "101y", "100y 1s"] {
        let (code, stderr) = dev_token_refused(&["--sub", "u", "--ttl", ttl]);
        assert_eq!(code, Some(2), "--ttl {ttl}: {stderr}");
        assert!(
            stderr.contains("--ttl") && stderr.contains("at most 100 years"),
            "--ttl {ttl}: {stderr}"
        );
    }
    let t = dev_token("", &["--sub", "u", "--ttl", "100y"]);
    let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<Value>(
        &t,
        &jsonwebtoken::DecodingKey::from_secret(TEST_SECRET.as_bytes()),
        &validation,
    )
    .unwrap()
    .claims;
    let lifetime = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
    assert_eq!(lifetime, 100 * 31_557_600, "{claims}");
}

/// The proxy reads a token's `sid` as a UUID and refuses the token on every session route
/// when it is not one, so such a `--sid` is refused before any token is made.
#[test]
fn dev_token_refuses_a_sid_that_is_not_a_uuid() {
    for sid in [
        "notauuid",
        "",
        "67e55044-10b1-426f-9247-bb680e5fe0c",
        " 67e55044-10b1-426f-9247-bb680e5fe0c8",
    ] {
        let (code, stderr) = dev_token_refused(&["--sub", "u", &format!("--sid={sid}")]);
        assert_eq!(code, Some(2), "--sid {sid:?}: {stderr}");
        assert!(
            stderr.contains("--sid") && stderr.contains("not a session id"),
            "--sid {sid:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn dev_token_prints_a_token_the_proxy_accepts() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let config = session_config(&upstream, &redis, "");
    let proxy = Proxy::start(&config).await;
    let sid = create_session(&proxy, &token("u", None)).await;

    // Every spelling of the UUID the proxy reads is taken as given.
    let simple = sid.replace('-', "");
    for spelling in [
        sid.clone(),
        sid.to_uppercase(),
        simple,
        format!("{{{sid}}}"),
        format!("urn:uuid:{sid}"),
    ] {
        let t = dev_token(&config, &["--sub", "u", "--sid", &spelling]);
        let resp = client()
            .get(proxy.url("/game"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "--sid {spelling}");
        let seen = upstream.last();
        assert_eq!(seen.headers["x-user-id"], "u");
        assert_eq!(seen.headers["x-session-id"], sid.as_str());
    }
}

#[tokio::test]
async fn dev_token_honours_ttl_and_the_configured_issuer_and_audience() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let config = session_config(
        &upstream,
        &redis,
        "[jwt]\nissuer = \"game-auth\"\naudience = \"game-clients\"\n",
    );
    let proxy = Proxy::start(&config).await;
    let sid = create_session(
        &proxy,
        &sign(&json!({"sub": "u", "exp": now_secs() + 600, "iss": "game-auth", "aud": "game-clients"})),
    )
    .await;

    let t = dev_token(&config, &["--sub", "u", "--sid", &sid, "--ttl", "2m"]);
    let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
    validation.set_audience(&["game-clients"]);
    let claims = jsonwebtoken::decode::<Value>(
        &t,
        &jsonwebtoken::DecodingKey::from_secret(TEST_SECRET.as_bytes()),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["iss"], "game-auth");
    assert_eq!(claims["aud"], "game-clients");
    assert_eq!(claims["sid"], sid.as_str());
    let exp = claims["exp"].as_u64().unwrap();
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(exp - iat, 120, "{claims}");

    let resp = client()
        .get(proxy.url("/game"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().headers["x-user-id"], "u");
}

// ---------------------------------------------------------------------------------------------
// jwt.require_iat
// ---------------------------------------------------------------------------------------------

/// Without a usable `iat` a token cannot be judged against a sign-out everywhere, so
/// `jwt.require_iat` refuses it (everywhere: session and jwt routes, the session API); by
/// default it is accepted.
#[tokio::test]
async fn require_iat_refuses_a_token_that_does_not_say_when_it_was_issued() {
    let strict = setup_with("[jwt]\nleeway = \"0s\"\nrequire_iat = true\n", None).await;
    let mut claims = strict.claims();
    strict.assert_accepted(&sign(&claims)).await;
    claims["iat"] = json!("yesterday"); // not a number: no usable iat
    strict.assert_refused(&sign(&claims), "TOKEN_INVALID").await;
    claims.as_object_mut().unwrap().remove("iat");
    let no_iat = sign(&claims);
    strict.assert_refused(&no_iat, "TOKEN_INVALID").await;
    let api = client()
        .get(strict.proxy.url("/api/v1/sessions/user/sessions"))
        .bearer_auth(&no_iat)
        .send()
        .await
        .unwrap();
    assert_error(api, 401, "TOKEN_INVALID").await;

    let lenient = setup().await;
    let mut claims = lenient.claims();
    claims.as_object_mut().unwrap().remove("iat");
    lenient.assert_accepted(&sign(&claims)).await;
}
