//! Rotating the JWT key: while `jwt.previous_secret` names the key being rotated out, tokens
//! signed by either key are admitted end to end, and `/metrics` shows how many still come
//! signed by the old one.

mod observe;
mod support;

use support::*;

const OLD_SECRET: &str = "the-key-being-rotated-out-0123456789";

/// A valid HS256 token for `sub` with `sid`, signed by `secret`.
fn token_signed_by(secret: &str, sub: &str, sid: &str) -> String {
    sign_hmac(
        jsonwebtoken::Algorithm::HS256,
        secret.as_bytes(),
        &serde_json::json!({ "sub": sub, "sid": sid, "iat": now_secs(), "exp": now_secs() + 3600 }),
    )
}

async fn previous_key_count(proxy: &Proxy) -> f64 {
    observe::Exposition::parse(&proxy.metrics_text().await)
        .get("portcullis_tokens_verified_with_previous_key_total", &[])
        .expect("the counter is exposed")
}

#[tokio::test]
async fn tokens_of_the_key_being_rotated_out_pass_until_it_is_removed() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let routes = "[[routes]]\npath_prefix = \"/game\"\nauth = \"session\"\n";
    let rotating = Proxy::start(&session_config(
        &upstream,
        &redis,
        &format!("[jwt]\nprevious_secret = \"{OLD_SECRET}\"\n{routes}"),
    ))
    .await;
    // A session opened with a token of the current key (TEST_SECRET).
    let sid = create_session(&rotating, &token("player", None)).await;
    let current = token("player", Some(&sid));
    let old = token_signed_by(OLD_SECRET, "player", &sid);
    let forged = token_signed_by("a-key-portcullis-never-had-0123456789", "player", &sid);
    let get = |proxy: &Proxy, bearer: &str| {
        client()
            .get(proxy.url("/game/state"))
            .bearer_auth(bearer)
            .send()
    };

    assert_eq!(get(&rotating, &current).await.unwrap().status(), 200);
    assert_eq!(previous_key_count(&rotating).await, 0.0);
    assert_eq!(get(&rotating, &old).await.unwrap().status(), 200);
    assert_eq!(
        upstream
            .last()
            .headers
            .get("x-user-id")
            .map(|v| v.to_str().unwrap()),
        Some("player"),
        "forwarded with the identity the old key's token carries"
    );
    assert_eq!(previous_key_count(&rotating).await, 1.0);
    assert_error(get(&rotating, &forged).await.unwrap(), 401, "TOKEN_INVALID").await;
    assert_eq!(
        upstream.count(),
        2,
        "the forged token never reached the upstream"
    );
    assert_eq!(
        previous_key_count(&rotating).await,
        1.0,
        "a token the previous key was only tried on is not counted"
    );

    // The rotation is over: the previous key is removed from the config.
    let rotated = Proxy::start(&session_config(&upstream, &redis, routes)).await;
    assert_eq!(get(&rotated, &current).await.unwrap().status(), 200);
    assert_error(get(&rotated, &old).await.unwrap(), 401, "TOKEN_INVALID").await;
    assert_eq!(upstream.count(), 3);
}
