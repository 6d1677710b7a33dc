//! Sessions (the SessionManager): the model clients see, its compact stored form, and the
//! operations on it. Storage goes through [`crate::store::Store`], the only door to Redis.
//!
//! Submodules: [`gate`] enforces a live session on proxied requests; [`api`] serves the
//! session API.

pub mod api;
pub mod cache;
pub mod gate;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize, Serializer};
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::session::cache::SessionCache;
use crate::store::{Store, StoreError, StoredSession, Tracking};

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

    fn code(self) -> char {
        match self {
            Platform::Web => 'w',
            Platform::Ios => 'i',
            Platform::Android => 'a',
        }
    }

    fn from_code(c: &str) -> Option<Platform> {
        match c {
            "w" => Some(Platform::Web),
            "i" => Some(Platform::Ios),
            "a" => Some(Platform::Android),
            _ => None,
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
    pub ip_address: Option<String>,
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

/// The stored form: `lastActive|1|createdAt|platform|deviceId|ipAddress|userAgent`, with
/// times as 13-digit Unix milliseconds (lastActive first, at a fixed width, so the touch script
/// can rewrite it in place with SETRANGE) and the platform as one letter. The User-Agent comes
/// last so it may contain `|`; deviceId and ipAddress never do (checked on input).
fn encode(created_ms: u64, last_active_ms: u64, metadata: &Metadata) -> String {
    format!(
        "{last_active_ms:013}|1|{created_ms:013}|{}|{}|{}|{}",
        metadata.platform.code(),
        metadata.device_id.as_deref().unwrap_or(""),
        metadata.ip_address.as_deref().unwrap_or(""),
        metadata.user_agent.as_deref().unwrap_or(""),
    )
}

struct Decoded {
    created_ms: u64,
    last_active_ms: u64,
    metadata: Metadata,
}

fn decode(value: &str) -> Result<Decoded, StoreError> {
    let corrupt = || StoreError::Corrupt("unrecognised session record".into());
    let mut fields = value.splitn(7, '|');
    let mut next = || fields.next().ok_or_else(corrupt);
    let last_active_ms: u64 = next()?.parse().map_err(|_| corrupt())?;
    if next()? != "1" {
        return Err(corrupt());
    }
    let created_ms: u64 = next()?.parse().map_err(|_| corrupt())?;
    let platform = Platform::from_code(next()?).ok_or_else(corrupt)?;
    let optional = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let device_id = optional(next()?);
    let ip_address = optional(next()?);
    let user_agent = optional(next()?);
    Ok(Decoded {
        created_ms,
        last_active_ms,
        metadata: Metadata {
            platform,
            user_agent,
            ip_address,
            device_id,
        },
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

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
    cache: Option<std::sync::Arc<SessionCache>>,
    metrics: std::sync::Arc<Metrics>,
}

impl Tracking for SessionCache {
    fn invalidate(&self, key: &[u8]) {
        SessionCache::invalidate(self, key);
    }

    fn flush(&self) {
        SessionCache::flush(self);
    }

    fn set_live(&self, live: bool) {
        SessionCache::set_live(self, live);
    }

    fn confirm(&self, sent: std::time::Instant) {
        SessionCache::confirm(self, sent);
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

impl Sessions {
    /// `cache` must be the same cache the store delivers invalidations to.
    pub fn new(
        store: Store,
        ttl: Duration,
        last_active_resolution: Duration,
        slide_interval: Duration,
        cache: Option<std::sync::Arc<SessionCache>>,
        metrics: std::sync::Arc<Metrics>,
    ) -> Self {
        Sessions {
            store,
            ttl,
            last_active_resolution,
            slide_interval,
            cache,
            metrics,
        }
    }

    pub fn cache(&self) -> Option<&SessionCache> {
        self.cache.as_deref()
    }

    /// This process changed a session: its own writes do not come back as invalidations.
    fn forget(&self, user_id: &str, session_id: Uuid) {
        if let Some(cache) = &self.cache {
            let key = self.store.session_key(user_id, &session_id.to_string());
            cache.invalidate(key.as_bytes());
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn session(
        &self,
        user_id: &str,
        session_id: Uuid,
        decoded: Decoded,
        expires_ms: u64,
    ) -> Session {
        Session {
            session_id,
            user_id: user_id.to_string(),
            created_at: time(decoded.created_ms),
            last_active: time(decoded.last_active_ms),
            expires_at: time(expires_ms),
            metadata: decoded.metadata,
        }
    }

    /// A stored session as the API shows it; it expires its remaining TTL after `now_ms`.
    fn stored_session(
        &self,
        user_id: &str,
        session_id: Uuid,
        stored: &StoredSession,
        now_ms: u64,
    ) -> Result<Session, StoreError> {
        let remaining = u64::try_from(stored.ttl.as_millis()).unwrap_or(0);
        Ok(self.session(
            user_id,
            session_id,
            decode(&stored.value)?,
            now_ms.saturating_add(remaining),
        ))
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Opens a session for `user_id`; returns its id and expiry.
    pub async fn create(&self, user_id: &str, metadata: &Metadata) -> Result<Created, StoreError> {
        let session_id = Uuid::new_v4();
        let now = now_ms();
        let value = encode(now, now, metadata);
        self.store
            .session_create(user_id, &session_id.to_string(), &value, self.ttl)
            .await?;
        Ok(Created {
            session_id,
            expires_at: time(now.saturating_add(self.ttl_ms())),
        })
    }

    /// Reads a session without touching it.
    pub async fn get(
        &self,
        user_id: &str,
        session_id: Uuid,
    ) -> Result<Option<Session>, StoreError> {
        let Some(stored) = self
            .store
            .session_get(user_id, &session_id.to_string())
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(self.stored_session(
            user_id,
            session_id,
            &stored,
            now_ms(),
        )?))
    }

    /// The per-request check: the session exists under this user. Its TTL slides back to full
    /// (at most once per `slide_interval`) and lastActive moves to now (at most once per
    /// `last_active_resolution`), in one round trip; a session confirmed less than
    /// `slide_interval` ago is admitted from the local cache without any. Returns its platform.
    pub async fn touch(
        &self,
        user_id: &str,
        session_id: Uuid,
    ) -> Result<Option<Platform>, StoreError> {
        let mut id_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id: &str = session_id.hyphenated().encode_lower(&mut id_text);
        let cached = self.cache.as_ref().filter(|c| c.is_live()).map(|cache| {
            let key = self.store.session_key(user_id, id);
            let epoch = cache.epoch(&key);
            (cache, key, epoch)
        });
        match &cached {
            Some((cache, key, _)) => {
                if let Some(platform) = cache.get(key) {
                    self.metrics.session_cache_lookup("hit");
                    return Ok(Some(platform));
                }
                self.metrics.session_cache_lookup("miss");
            }
            None if self.cache.is_some() => self.metrics.session_cache_lookup("off"),
            None => {}
        }
        let Some(value) = self
            .store
            .session_touch(
                user_id,
                id,
                now_ms(),
                self.ttl,
                self.last_active_resolution,
                self.slide_interval,
            )
            .await?
        else {
            return Ok(None);
        };
        let platform = decode(&value)?.metadata.platform;
        if let Some((cache, key, epoch)) = cached {
            cache.insert(&key, epoch, platform, self.slide_interval);
        }
        Ok(Some(platform))
    }

    /// Puts the session's TTL back to full and records activity now.
    pub async fn extend(
        &self,
        user_id: &str,
        session_id: Uuid,
    ) -> Result<Option<Session>, StoreError> {
        let now = now_ms();
        let Some(value) = self
            .store
            .session_touch(
                user_id,
                &session_id.to_string(),
                now,
                self.ttl,
                Duration::ZERO,
                Duration::ZERO,
            )
            .await?
        else {
            return Ok(None);
        };
        let decoded = decode(&value)?;
        Ok(Some(self.session(
            user_id,
            session_id,
            decoded,
            now.saturating_add(self.ttl_ms()),
        )))
    }

    /// Replaces a session's metadata and records activity now, keeping its expiry.
    pub async fn update(
        &self,
        user_id: &str,
        session_id: Uuid,
        metadata: &Metadata,
    ) -> Result<bool, StoreError> {
        let Some(stored) = self
            .store
            .session_get(user_id, &session_id.to_string())
            .await?
        else {
            return Ok(false);
        };
        let decoded = decode(&stored.value)?;
        let value = encode(decoded.created_ms, now_ms(), metadata);
        self.forget(user_id, session_id);
        self.store
            .session_replace(user_id, &session_id.to_string(), &value)
            .await
    }

    /// Destroys a session, returning its metadata when it existed.
    pub async fn destroy(
        &self,
        user_id: &str,
        session_id: Uuid,
    ) -> Result<Option<Metadata>, StoreError> {
        self.forget(user_id, session_id);
        match self
            .store
            .session_destroy(user_id, &session_id.to_string())
            .await?
        {
            Some(value) => Ok(Some(decode(&value)?.metadata)),
            None => Ok(None),
        }
    }

    /// The user's live sessions, oldest first.
    pub async fn list(&self, user_id: &str) -> Result<Vec<Session>, StoreError> {
        let now = now_ms();
        let mut sessions = Vec::new();
        for (id, stored) in self.store.session_list(user_id).await? {
            let Ok(session_id) = id.parse::<Uuid>() else {
                continue;
            };
            sessions.push(self.stored_session(user_id, session_id, &stored, now)?);
        }
        sessions.sort_by_key(|s| (s.created_at, s.session_id));
        Ok(sessions)
    }
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
    fn stored_form_round_trips_and_keeps_pipes_in_the_user_agent() {
        let metadata = Metadata {
            platform: Platform::Android,
            user_agent: Some("Game|1.0 (Android)".into()),
            ip_address: Some("2001:db8::1".into()),
            device_id: Some("dev-42".into()),
        };
        let value = encode(1_700_000_000_000, 1_700_000_500_000, &metadata);
        assert!(value.starts_with("1700000500000|"));
        let decoded = decode(&value).unwrap();
        assert_eq!(decoded.created_ms, 1_700_000_000_000);
        assert_eq!(decoded.last_active_ms, 1_700_000_500_000);
        assert_eq!(decoded.metadata, metadata);
    }

    #[test]
    fn absent_metadata_fields_stay_absent() {
        let metadata = Metadata {
            platform: Platform::Web,
            user_agent: None,
            ip_address: None,
            device_id: None,
        };
        let decoded = decode(&encode(1, 2, &metadata)).unwrap();
        assert_eq!(decoded.metadata, metadata);
    }

    #[test]
    fn garbage_is_reported_not_panicked_on() {
        for v in ["", "x", "0000000000001|2|0|w|||", "0000000000001|1|0|z|||"] {
            assert!(decode(v).is_err(), "{v}");
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
                ip_address: Some("10.0.0.1".into()),
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
