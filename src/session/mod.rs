//! Sessions (the SessionManager): the model clients see and the operations on it; [`record`]
//! is how they are stored. Storage goes through [`crate::store::Store`], the only door to Redis.
//!
//! Submodules: [`gate`] enforces a live session on proxied requests; [`api`] serves the
//! session API.

pub mod api;
pub mod cache;
pub mod gate;
pub mod record;
pub mod tunnels;

use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize, Serializer};
use uuid::Uuid;

use crate::config::SessionConfig;
use crate::metrics::Metrics;
use crate::session::cache::SessionCache;
use crate::session::tunnels::TunnelWatch;
pub use crate::store::TokenCheck;
use crate::store::{Store, StoreError, Tracking};

/// The client platform a session was opened from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Web,
    Ios,
    Android,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Web => "web",
            Platform::Ios => "ios",
            Platform::Android => "android",
        }
    }

    /// Guesses the platform from a User-Agent: a word `android`, `okhttp` or `dalvik` means
    /// Android; `iphone`, `ipad`, `ipod` or `ios` means iOS; anything else is web. Words are
    /// compared case-insensitively and split on anything that is not a letter or digit.
    pub fn detect(user_agent: &str) -> Platform {
        let words = || {
            user_agent
                .split(|c: char| !c.is_ascii_alphanumeric())
                .filter(|w| !w.is_empty())
        };
        let any = |names: &[&str]| words().any(|w| names.iter().any(|n| w.eq_ignore_ascii_case(n)));
        if any(&["android", "okhttp", "dalvik"]) {
            Platform::Android
        } else if any(&["iphone", "ipad", "ipod", "ios"]) {
            Platform::Ios
        } else {
            Platform::Web
        }
    }
}

/// What a client says about itself when it opens a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub platform: Platform,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

/// A session as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub session_id: Uuid,
    pub user_id: String,
    #[serde(serialize_with = "rfc3339_millis")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_millis")]
    pub last_active: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_millis")]
    pub expires_at: DateTime<Utc>,
    pub metadata: Metadata,
}

/// RFC 3339 in UTC with milliseconds: `2026-11-26T19:30:00.123Z`.
pub fn rfc3339_millis<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

pub const MAX_USER_AGENT: usize = 512;
pub const MAX_DEVICE_ID: usize = 128;

fn time(ms: u64) -> DateTime<Utc> {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .unwrap_or_default()
}

/// Session operations on top of the store.
#[derive(Clone)]
pub struct Sessions {
    store: Store,
    ttl: Duration,
    last_active_resolution: Duration,
    /// A session is slid (and re-checked in Redis when cached) at most this often.
    slide_interval: Duration,
    max_per_user: usize,
    cache: Option<std::sync::Arc<SessionCache>>,
    tunnels: std::sync::Arc<TunnelWatch>,
    metrics: std::sync::Arc<Metrics>,
}

/// What Redis invalidations reach: the local cache, and the tunnels whose sessions they may
/// have ended.
pub struct Invalidations {
    pub cache: std::sync::Arc<SessionCache>,
    pub tunnels: std::sync::Arc<TunnelWatch>,
}

impl Tracking for Invalidations {
    fn invalidate(&self, user_id: &[u8]) {
        self.cache.invalidate(user_id);
        self.tunnels.check_user(user_id);
    }

    fn flush(&self) {
        self.cache.flush();
        // Anything may have changed (FLUSHALL, an invalidation that names no user).
        self.tunnels.check_all();
    }

    fn set_live(&self, live: bool) {
        self.cache.set_live(live);
        if live {
            // Writes made while nothing was listening were never announced.
            self.tunnels.check_all();
        }
    }

    fn confirm(&self, sent: std::time::Instant) {
        self.cache.confirm(sent);
    }
}

/// The outcome of creating a session.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Created {
    pub session_id: Uuid,
    #[serde(serialize_with = "rfc3339_millis")]
    pub expires_at: DateTime<Utc>,
}

/// A session opened, and the least recently active ones it ended because the user already
/// had `session.max_per_user`.
#[derive(Debug, Clone)]
pub struct Opened {
    pub created: Created,
    pub evicted: Vec<Session>,
}

impl Sessions {
    /// `cache` and `tunnels` must be the ones the store delivers invalidations to
    /// ([`Invalidations`]).
    pub fn new(
        store: Store,
        config: &SessionConfig,
        cache: Option<std::sync::Arc<SessionCache>>,
        tunnels: std::sync::Arc<TunnelWatch>,
        metrics: std::sync::Arc<Metrics>,
    ) -> Self {
        Sessions {
            store,
            ttl: config.ttl,
            // With the cache on, each rewrite empties every other replica's cache of the user,
            // whose next check in Redis would rewrite it again when it is a second old, and so
            // on: replicas taking turns would each go to Redis on every request. No more often
            // than the slide, the replicas settle after one check each.
            last_active_resolution: match cache {
                Some(_) => config.last_active_resolution.max(config.slide_interval),
                None => config.last_active_resolution,
            },
            slide_interval: config.slide_interval,
            max_per_user: config.max_per_user,
            cache,
            tunnels,
            metrics,
        }
    }

    pub fn cache(&self) -> Option<&SessionCache> {
        self.cache.as_deref()
    }

    /// The open tunnels admitted on a session.
    pub fn tunnels(&self) -> &TunnelWatch {
        &self.tunnels
    }

    pub fn slide_interval(&self) -> Duration {
        self.slide_interval
    }

    /// This process wrote (or may have written) the user's sessions, and its own writes do
    /// not come back as invalidations. Called after the write: a lookup that began before it
    /// then cannot fill the cache with what the write changed (its epoch has moved), and the
    /// user's tunnels check whether their sessions survived it.
    fn forget(&self, user_id: &str) {
        if let Some(cache) = &self.cache {
            cache.invalidate(user_id.as_bytes());
        }
        self.tunnels.check_user(user_id.as_bytes());
    }

    /// [`Sessions::forget`] after a write, unless the caller was refused for signing out, which
    /// wrote nothing: a stolen token's refused calls must not cost its victim their cache.
    fn forget_unless_refused<T>(&self, user_id: &str, result: &Result<T, StoreError>) {
        if !result.as_ref().is_err_and(StoreError::is_refusal) {
            self.forget(user_id);
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn session(user_id: &str, body: &[u8]) -> Result<Session, StoreError> {
        let r = record::decode(body)?;
        Ok(Session {
            session_id: r.session_id,
            user_id: user_id.to_string(),
            created_at: time(r.created_ms),
            last_active: time(r.last_active_ms),
            expires_at: time(r.expires_ms),
            metadata: r.metadata,
        })
    }

    /// Sessions a write has ended (evicted, signed out). They are gone whatever follows: one
    /// that cannot be read is logged and left out, rather than failing a write that happened.
    fn ended<B: AsRef<[u8]>>(user_id: &str, bodies: &[B]) -> Vec<Session> {
        bodies
            .iter()
            .filter_map(|body| match Self::session(user_id, body.as_ref()) {
                Ok(session) => Some(session),
                Err(e) => {
                    tracing::warn!(error = %e, user_id, "an ended session could not be read");
                    None
                }
            })
            .collect()
    }

    /// Opens session `session_id` for `user_id` (the caller picks the id, so that it can name
    /// the change even when the store does not answer); returns its expiry. The caller's
    /// `token` is checked first (see [`TokenCheck`]).
    pub async fn create(
        &self,
        user_id: &str,
        session_id: Uuid,
        metadata: &Metadata,
        token: TokenCheck,
    ) -> Result<Opened, StoreError> {
        let details = record::details(metadata)?;
        let created = self
            .store
            .session_create(
                user_id,
                &session_id,
                &details,
                self.ttl,
                self.max_per_user,
                token,
            )
            .await;
        self.forget_unless_refused(user_id, &created);
        let (now, evicted) = created?;
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let evicted = Self::ended(user_id, &evicted);
        Ok(Opened {
            created: Created {
                session_id,
                expires_at: time(now.saturating_add(ttl_ms)),
            },
            evicted,
        })
    }

    /// Reads a session without touching it. A caller whose token fails its `token` check (see
    /// [`TokenCheck`]) gets `StoreError::SignedOut` or `StoreError::SessionEnded`, here and in
    /// every method that takes one.
    pub async fn get(
        &self,
        user_id: &str,
        session_id: Uuid,
        token: TokenCheck,
    ) -> Result<Option<Session>, StoreError> {
        match self.store.session_get(user_id, &session_id, token).await? {
            Some(body) => Ok(Some(Self::session(user_id, &body)?)),
            None => Ok(None),
        }
    }

    /// The per-request check, from the local cache: a session confirmed less than
    /// `slide_interval` ago is admitted without Redis (and without an await). Returns its
    /// platform; `None` sends the check to [`Sessions::touch_in_store`].
    pub fn touch_cached(&self, user_id: &str, session_id: Uuid) -> Option<Platform> {
        let cache = self.cache.as_ref().filter(|c| c.is_live())?;
        let platform = cache.get(user_id, session_id)?;
        self.metrics.session_cache_lookup("hit");
        Some(platform)
    }

    /// The per-request check in Redis: the session exists under this user. Its TTL slides back
    /// to full (at most once per `slide_interval`) and lastActive moves to now (at most once per
    /// `last_active_resolution`), in one round trip. Returns its platform; a confirmed session
    /// is cached for `slide_interval`.
    pub async fn touch_in_store(
        &self,
        user_id: &str,
        session_id: Uuid,
    ) -> Result<Option<Platform>, StoreError> {
        let cached = self
            .cache
            .as_ref()
            .filter(|c| c.is_live())
            .map(|cache| (cache, cache.epoch(user_id)));
        match &cached {
            // The cache could not answer: no recent heartbeat, or no fresh entry.
            Some((cache, _)) if !cache.is_trustworthy() => {
                self.metrics.session_cache_lookup("stale")
            }
            Some(_) => self.metrics.session_cache_lookup("miss"),
            None if self.cache.is_some() => self.metrics.session_cache_lookup("off"),
            None => {}
        }
        let Some(body) = self
            .store
            .session_touch(
                user_id,
                &session_id,
                self.ttl,
                self.last_active_resolution,
                self.slide_interval,
                TokenCheck::NONE,
            )
            .await?
        else {
            return Ok(None);
        };
        let platform = record::platform(&body)?;
        if let Some((cache, epoch)) = cached {
            cache.insert(user_id, epoch, session_id, platform, self.slide_interval);
        }
        Ok(Some(platform))
    }

    /// Puts the session's TTL back to full and records activity now.
    pub async fn extend(
        &self,
        user_id: &str,
        session_id: Uuid,
        token: TokenCheck,
    ) -> Result<Option<Session>, StoreError> {
        match self
            .store
            .session_touch(
                user_id,
                &session_id,
                self.ttl,
                Duration::ZERO,
                Duration::ZERO,
                token,
            )
            .await?
        {
            Some(body) => Ok(Some(Self::session(user_id, &body)?)),
            None => Ok(None),
        }
    }

    /// Replaces a session's metadata and records activity now, keeping its expiry.
    pub async fn update(
        &self,
        user_id: &str,
        session_id: Uuid,
        metadata: &Metadata,
    ) -> Result<bool, StoreError> {
        let details = record::details(metadata)?;
        let replaced = self
            .store
            .session_replace(user_id, &session_id, &details)
            .await;
        self.forget(user_id);
        replaced
    }

    /// Destroys a session, returning its metadata when it existed.
    pub async fn destroy(
        &self,
        user_id: &str,
        session_id: Uuid,
        token: TokenCheck,
    ) -> Result<Option<Metadata>, StoreError> {
        let destroyed = self
            .store
            .session_destroy(user_id, &session_id, token)
            .await;
        self.forget_unless_refused(user_id, &destroyed);
        match destroyed? {
            Some(body) => Ok(Some(record::decode(&body)?.metadata)),
            None => Ok(None),
        }
    }

    /// Destroys all of the user's sessions, returning those that were live, oldest first. For
    /// the session TTL or `at_least`, whichever is longer, tokens issued before now are
    /// refused by every method that takes a [`TokenCheck`], and open no new session.
    pub async fn destroy_all(
        &self,
        user_id: &str,
        at_least: Duration,
        token: TokenCheck,
    ) -> Result<Vec<Session>, StoreError> {
        // Bounded as the TTL is: Redis refuses an expiry past its range.
        let remember = self.ttl.max(at_least).min(crate::config::MAX_SESSION_TTL);
        let destroyed = self
            .store
            .session_destroy_all(user_id, remember, token)
            .await;
        self.forget_unless_refused(user_id, &destroyed);
        let mut sessions = Self::ended(user_id, &destroyed?);
        oldest_first(&mut sessions);
        Ok(sessions)
    }

    /// The user's live sessions, oldest first.
    pub async fn list(&self, user_id: &str, token: TokenCheck) -> Result<Vec<Session>, StoreError> {
        let mut sessions = self
            .store
            .session_list(user_id, token)
            .await?
            .iter()
            .map(|body| Self::session(user_id, body))
            .collect::<Result<Vec<_>, _>>()?;
        oldest_first(&mut sessions);
        Ok(sessions)
    }
}

/// Sorts sessions by when they were opened. The sort is stable: sessions opened in the same
/// millisecond keep the order the user's value holds them in, which is the order they were
/// opened (a new session is appended).
fn oldest_first(sessions: &mut [Session]) {
    sessions.sort_by_key(|s| s.created_at);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_detection_follows_the_documented_words() {
        let cases = [
            (
                "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
                Platform::Ios,
            ),
            (
                "Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X)",
                Platform::Ios,
            ),
            ("MyGame/1.2 iOS/17.1", Platform::Ios),
            (
                "Mozilla/5.0 (Linux; Android 14; Pixel 8)",
                Platform::Android,
            ),
            ("okhttp/4.12.0", Platform::Android),
            ("Dalvik/2.1.0 (Linux; U; Android 13)", Platform::Android),
            (
                "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120",
                Platform::Web,
            ),
            (
                "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0)",
                Platform::Web,
            ),
            ("kiosk-bios", Platform::Web),
            ("", Platform::Web),
        ];
        for (ua, expected) in cases {
            assert_eq!(Platform::detect(ua), expected, "{ua}");
        }
    }

    #[test]
    fn session_json_uses_the_contract_field_names() {
        let s = Session {
            session_id: Uuid::nil(),
            user_id: "u1".into(),
            created_at: time(1_700_000_000_123),
            last_active: time(1_700_000_000_123),
            expires_at: time(1_700_000_000_123),
            metadata: Metadata {
                platform: Platform::Ios,
                user_agent: None,
                ip_address: Some([10, 0, 0, 1].into()),
                device_id: None,
            },
        };
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["sessionId"], "00000000-0000-0000-0000-000000000000");
        assert_eq!(json["userId"], "u1");
        assert_eq!(json["createdAt"], "2023-11-14T22:13:20.123Z");
        assert_eq!(json["metadata"]["platform"], "ios");
        assert_eq!(json["metadata"]["ipAddress"], "10.0.0.1");
        assert!(json["metadata"].get("userAgent").is_none());
        assert!(json.get("lastActive").is_some() && json.get("expiresAt").is_some());
    }
}
