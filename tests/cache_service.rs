//! The Redis door's general-purpose cache (typed JSON get/set/delete/ttl/exists/close on
//! `{prefix}:cache:{type}:{id}`) and the session update operation, against a real Redis.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use portcullis::config::Config;
use portcullis::metrics::Metrics;
use portcullis::session::{Metadata, Platform, Sessions, TokenCheck};
use portcullis::store::{KeyTtl, Store, StoreError};
use serde::{Deserialize, Serialize};
use support::*;

fn config(redis_url: &str, prefix: &str, extra: &str) -> Config {
    let env = [("JWT_SECRET".to_string(), TEST_SECRET.to_string())];
    Config::from_toml(
        &format!("[redis]\nurl = \"{redis_url}\"\nkey_prefix = \"{prefix}\"\n{extra}"),
        Path::new("."),
        &env,
    )
    .unwrap()
}

fn store(redis_url: &str, prefix: &str) -> Store {
    let config = config(redis_url, prefix, "");
    Store::new(&config.redis, Arc::new(Metrics::new()), None).unwrap()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Character {
    name: String,
    level: u32,
    guild: Option<String>,
}

#[tokio::test]
async fn typed_values_round_trip_under_namespaced_keys() {
    let redis = RedisServer::start();
    let store = store(&redis.url(), "game1");
    let hero = Character {
        name: "Ayla".into(),
        level: 42,
        guild: None,
    };
    store.set("character", "c-1", &hero, None).await.unwrap();
    let back: Option<Character> = store.get("character", "c-1").await.unwrap();
    assert_eq!(back, Some(hero.clone()));
    // The key layout is {prefix}:cache:{type}:{id}, holding JSON.
    let raw: String = redis::cmd("GET")
        .arg("game1:cache:character:c-1")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(serde_json::from_str::<Character>(&raw).unwrap(), hero);
    let missing: Option<Character> = store.get("character", "nobody").await.unwrap();
    assert_eq!(missing, None);
}

#[tokio::test]
async fn ttl_exists_and_delete_report_the_key_state() {
    let redis = RedisServer::start();
    let store = store(&redis.url(), "game2");
    store
        .set("token", "t", &"v", Some(Duration::from_secs(60)))
        .await
        .unwrap();
    store.set("forever", "f", &1u8, None).await.unwrap();
    match store.ttl("token", "t").await.unwrap() {
        KeyTtl::Expires(left) => {
            assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(58))
        }
        other => panic!("expected an expiry, got {other:?}"),
    }
    assert_eq!(store.ttl("forever", "f").await.unwrap(), KeyTtl::Persistent);
    assert_eq!(store.ttl("token", "none").await.unwrap(), KeyTtl::Missing);
    assert!(store.exists("token", "t").await.unwrap());
    assert!(store.delete("token", "t").await.unwrap());
    assert!(!store.delete("token", "t").await.unwrap());
    assert!(!store.exists("token", "t").await.unwrap());
}

#[tokio::test]
async fn a_value_of_the_wrong_shape_is_an_error_not_a_panic() {
    let redis = RedisServer::start();
    let store = store(&redis.url(), "game3");
    store
        .set("character", "c", &"just a string", None)
        .await
        .unwrap();
    let err = store.get::<Character>("character", "c").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
}

#[tokio::test]
async fn commands_fail_fast_when_redis_is_down_and_after_close() {
    let mut redis = RedisServer::start();
    // Timeouts far longer than the test: an answer in seconds was a failure detected, not a
    // timeout waited out.
    let config = config(
        &redis.url(),
        "game4",
        "command_timeout = \"30s\"\nconnect_timeout = \"30s\"\n",
    );
    let store = Store::new(&config.redis, Arc::new(Metrics::new()), None).unwrap();
    store.set("k", "1", &1u8, None).await.unwrap();
    redis.stop();
    let started = std::time::Instant::now();
    let err = store.get::<u8>("k", "1").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.set("k", "1", &1u8, None).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.close();
    assert!(matches!(
        store.get::<u8>("k", "1").await.unwrap_err(),
        StoreError::Closed
    ));
}

#[tokio::test]
async fn update_replaces_metadata_and_keeps_the_expiry() {
    let redis = RedisServer::start();
    let config = config(
        &redis.url(),
        "game5",
        "[session]\nttl = \"600s\"\nlast_active_resolution = \"0s\"\n",
    );
    let store = Store::new(&config.redis, Arc::new(Metrics::new()), None).unwrap();
    let sessions = Sessions::new(
        store.clone(),
        &config.session,
        None,
        Arc::default(),
        Arc::new(Metrics::new()),
    );
    let web = Metadata {
        platform: Platform::Web,
        user_agent: Some("Mozilla/5.0".into()),
        ip_address: Some([198, 51, 100, 7].into()),
        device_id: None,
    };
    let created = sessions
        .create("u1", uuid::Uuid::new_v4(), &web, TokenCheck::NONE)
        .await
        .unwrap()
        .created;
    let before = sessions
        .get("u1", created.session_id, TokenCheck::NONE)
        .await
        .unwrap()
        .unwrap();
    let ios = Metadata {
        platform: Platform::Ios,
        user_agent: Some("Game/2.0 iOS/17".into()),
        ip_address: Some([198, 51, 100, 7].into()),
        device_id: Some("dev-9".into()),
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(sessions
        .update("u1", created.session_id, &ios)
        .await
        .unwrap());
    let after = sessions
        .get("u1", created.session_id, TokenCheck::NONE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.metadata, ios);
    assert_eq!(after.created_at, before.created_at);
    assert!(after.last_active > before.last_active);
    assert_eq!(after.expires_at, before.expires_at, "expiry kept");
    let pttl: i64 = redis::cmd("PTTL")
        .arg("game5:sessions:{u1}")
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        pttl > 590_000 && pttl <= 600_000,
        "the key's expiry kept, pttl {pttl}"
    );
    // Another user's id, or an unknown session, updates nothing.
    assert!(!sessions
        .update("u2", created.session_id, &ios)
        .await
        .unwrap());
    assert!(!sessions
        .update("u1", uuid::Uuid::new_v4(), &ios)
        .await
        .unwrap());
}
