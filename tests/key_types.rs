//! `jwt.public_key_pem` with the elliptic-curve algorithms: ES256 (P-256), ES384 (P-384) and
//! EdDSA (Ed25519).
//! The key pairs are made in the test (rcgen); tokens are signed with jsonwebtoken from the
//! private key's PEM, and portcullis verifies them with the public key's PEM file. A token
//! signed by another key of the same type is refused.

mod support;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::*;

/// A key pair of one type: the private key PEM (PKCS#8) and the public key PEM (SPKI).
struct Keys {
    private_pem: String,
    public_pem: String,
}

fn keys(alg: &'static rcgen::SignatureAlgorithm) -> Keys {
    let pair = rcgen::KeyPair::generate_for(alg).expect("generate key pair");
    Keys {
        private_pem: pair.serialize_pem(),
        public_pem: pair.public_key_pem(),
    }
}

fn sign_with(alg: Algorithm, keys: &Keys, claims: &Value) -> String {
    let pem = keys.private_pem.as_bytes();
    let key = match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
        other => panic!("no key type for {other:?}"),
    }
    .expect("encoding key from the private PEM");
    jsonwebtoken::encode(&Header::new(alg), claims, &key).expect("sign token")
}

fn claims(sub: &str, sid: Option<&str>) -> Value {
    let mut claims = json!({"sub": sub, "iat": now_secs(), "exp": now_secs() + 600});
    if let Some(sid) = sid {
        claims["sid"] = json!(sid);
    }
    claims
}

/// Runs the same checks for one algorithm: portcullis configured with the public key of
/// `keys`, tokens of `keys` accepted (session API and a session route), tokens of `other`
/// (same type) refused with 401 before anything reaches the upstream.
async fn check(alg: Algorithm, name: &str, keys: Keys, other: Keys) {
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("public.pem");
    std::fs::write(&public, &keys.public_pem).unwrap();
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let extra = format!(
        "[jwt]\nalgorithms = [\"{name}\"]\npublic_key_pem = \"{}\"\n",
        public.display()
    );
    let proxy = Proxy::start(&session_config(&upstream, &redis, &extra)).await;

    // The session API takes a token of this key ...
    let sid = create_session(&proxy, &sign_with(alg, &keys, &claims("player-1", None))).await;
    assert!(stored_ids(&mut redis.conn(), "player-1").contains(&sid));

    // ... and so does a session route, which forwards as the token's user.
    let game_state = |bearer: &str| {
        client()
            .get(proxy.url("/game/state"))
            .bearer_auth(bearer)
            .send()
    };
    let good = sign_with(alg, &keys, &claims("player-1", Some(&sid)));
    let resp = game_state(&good).await.unwrap();
    assert_eq!(resp.status(), 200, "{alg:?} token of the configured key");
    assert_eq!(upstream.count(), 1);
    let seen = upstream.last();
    assert_eq!(
        seen.headers.get("x-user-id").and_then(|v| v.to_str().ok()),
        Some("player-1")
    );
    assert_eq!(
        seen.headers
            .get("x-session-id")
            .and_then(|v| v.to_str().ok()),
        Some(sid.as_str())
    );

    // The same claims signed by another key of the same type: refused, on both.
    let forged = sign_with(alg, &other, &claims("player-1", Some(&sid)));
    let resp = game_state(&forged).await.unwrap();
    assert_error(resp, 401, "TOKEN_INVALID").await;
    let resp = client()
        .post(proxy.url("/api/v1/sessions/create"))
        .bearer_auth(sign_with(alg, &other, &claims("player-2", None)))
        .send()
        .await
        .unwrap();
    assert_error(resp, 401, "TOKEN_INVALID").await;
    assert_eq!(upstream.count(), 1, "a forged token reached the upstream");
    assert!(stored_ids(&mut redis.conn(), "player-2").is_empty());

    // A token of the right key still works after the refusals.
    let resp = game_state(&good).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.count(), 2);
}

#[tokio::test]
async fn es256_tokens_of_the_configured_p256_key_are_accepted_and_others_refused() {
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    check(Algorithm::ES256, "ES256", keys(alg), keys(alg)).await;
}

#[tokio::test]
async fn es384_tokens_of_the_configured_p384_key_are_accepted_and_others_refused() {
    let alg = &rcgen::PKCS_ECDSA_P384_SHA384;
    check(Algorithm::ES384, "ES384", keys(alg), keys(alg)).await;
}

#[tokio::test]
async fn eddsa_tokens_of_the_configured_ed25519_key_are_accepted_and_others_refused() {
    let alg = &rcgen::PKCS_ED25519;
    check(Algorithm::EdDSA, "EdDSA", keys(alg), keys(alg)).await;
}

#[tokio::test]
async fn an_hs256_token_keyed_with_the_ec_public_key_is_refused() {
    // Algorithm confusion on the EC keys: HMAC with the PEM the server verifies with.
    for (alg, name, key_alg) in [
        (Algorithm::ES256, "ES256", &rcgen::PKCS_ECDSA_P256_SHA256),
        (Algorithm::EdDSA, "EdDSA", &rcgen::PKCS_ED25519),
    ] {
        let keys = keys(key_alg);
        let dir = tempfile::tempdir().unwrap();
        let public = dir.path().join("public.pem");
        std::fs::write(&public, &keys.public_pem).unwrap();
        let upstream = Upstream::echo().await;
        let config = format!(
            "[upstream]\nurl = \"{}\"\n\n[jwt]\nalgorithms = [\"{name}\"]\npublic_key_pem = \"{}\"\n\n\
             [[routes]]\npath_prefix = \"/\"\nauth = \"jwt\"\n",
            upstream.url(),
            public.display()
        );
        let proxy = Proxy::start(&config).await;
        let get = |token: String| {
            client()
                .get(proxy.url("/leaderboard"))
                .bearer_auth(token)
                .send()
        };
        let resp = get(sign_with(alg, &keys, &claims("player-1", None)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        let confused = sign_hmac(
            Algorithm::HS256,
            keys.public_pem.as_bytes(),
            &claims("player-1", None),
        );
        assert_error(get(confused).await.unwrap(), 401, "TOKEN_INVALID").await;
        // Nor the secret the process has in JWT_SECRET (HMAC is not pinned).
        assert_error(
            get(token("player-1", None)).await.unwrap(),
            401,
            "TOKEN_INVALID",
        )
        .await;
        assert_eq!(upstream.count(), 1, "{name}");
    }
}
