//! The only door to Redis (the CacheService): connection management, command timeouts, the
//! general-purpose namespaced cache, and the session operations as Lua scripts, one round trip
//! each.
//!
//! The connection is opened lazily on first use and re-opened in the background with a linear
//! backoff, `min(attempt x 50 ms, 2 s)`. While Redis is down nothing queues: a command fails at
//! once with [`StoreError::Unavailable`], and every command is bounded by
//! `redis.command_timeout`. The caller decides what a failure means (the proxy fails closed).
//!
//! Keys: `{prefix}:cache:{type}:{id}` for cache entries; `{prefix}:session:{{userId}}:{sessionId}`
//! for a session and `{prefix}:user:{{userId}}:sessions` for the user's index, a hash whose
//! fields are the session ids (a small hash is a compact listpack, where a set of strings would
//! be a hashtable). The braces are a Redis Cluster hash tag, so a session and its index always
//! share a slot.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Notify;

use crate::config::RedisConfig;
use crate::metrics::Metrics;
use crate::session::cache::HEARTBEAT;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("Redis is unavailable")]
    Unavailable,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis error: {0}")]
    Redis(String),
    #[error("stored value is not valid: {0}")]
    Corrupt(String),
    #[error("the store was closed")]
    Closed,
}

/// Receives Redis client-side-caching invalidations (see `session::cache`).
pub trait Tracking: Send + Sync + 'static {
    /// A tracked key changed.
    fn invalidate(&self, key: &[u8]);
    /// Everything may have changed.
    fn flush(&self);
    /// Whether invalidations are being delivered; false flushes.
    fn set_live(&self, live: bool);
    /// A ping sent at `sent` on the tracking connection was answered.
    fn confirm(&self, sent: std::time::Instant);
}

/// Consecutive timeouts after which the connection is presumed dead and re-opened.
const TIMEOUTS_BEFORE_RECONNECT: u32 = 3;
const BACKOFF_STEP: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The reconnect delay after `attempt` consecutive failures.
pub fn backoff(attempt: u32) -> Duration {
    BACKOFF_STEP.saturating_mul(attempt).min(BACKOFF_MAX)
}

#[derive(Default)]
struct LinkState {
    /// The live connection and its generation.
    conn: Option<(u64, MultiplexedConnection)>,
    generation: u64,
    /// At least one connection attempt has finished (either way).
    tried: bool,
    closed: bool,
}

/// A single multiplexed connection, kept alive by a background task.
struct Link {
    client: redis::Client,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    state: Mutex<LinkState>,
    /// Wakes commands waiting for the first connection.
    changed: Notify,
    /// Wakes the reconnect task when the connection broke.
    broken: Notify,
    started: AtomicBool,
    timeouts: AtomicU32,
    /// Client-side caching: who to tell, and the key prefix tracked (BCAST).
    tracking: Option<(Arc<dyn Tracking>, String)>,
    /// The runtime the store was made on, which outlives the workers: the connection's tasks
    /// run there, not on whichever worker happened to send the first command.
    runtime: Option<tokio::runtime::Handle>,
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The current connection; waits only for the very first connection attempt.
    async fn get(self: &Arc<Self>) -> Result<(u64, MultiplexedConnection), StoreError> {
        if !self.started.swap(true, Ordering::SeqCst) {
            let maintain = Link::maintain(self.clone());
            match &self.runtime {
                Some(runtime) => runtime.spawn(maintain),
                None => tokio::spawn(maintain),
            };
        }
        let waited = self.changed.notified();
        tokio::pin!(waited);
        waited.as_mut().enable();
        {
            let state = self.lock();
            if state.closed {
                return Err(StoreError::Closed);
            }
            if let Some((generation, conn)) = &state.conn {
                return Ok((*generation, conn.clone()));
            }
            if state.tried {
                return Err(StoreError::Unavailable);
            }
        }
        let _ = tokio::time::timeout(self.connect_timeout, waited).await;
        let state = self.lock();
        match &state.conn {
            Some((generation, conn)) => Ok((*generation, conn.clone())),
            None => Err(StoreError::Unavailable),
        }
    }

    /// Drops connection `generation` (if still current) and wakes the reconnect task.
    fn mark_broken(&self, generation: u64) {
        let mut state = self.lock();
        if matches!(&state.conn, Some((g, _)) if *g == generation) {
            state.conn = None;
            drop(state);
            if let Some((tracking, _)) = &self.tracking {
                tracking.set_live(false);
            }
            tracing::warn!("Redis connection lost; reconnecting");
            self.broken.notify_one();
        }
    }

    async fn maintain(self: Arc<Self>) {
        let mut attempt: u32 = 0;
        loop {
            if self.lock().closed {
                return;
            }
            let connected = tokio::time::timeout(
                self.connect_timeout,
                self.client
                    .get_multiplexed_async_connection_with_config(&self.config),
            )
            .await;
            match connected {
                Ok(Ok(conn)) => {
                    if attempt > 0 {
                        tracing::info!(attempts = attempt, "Redis connection restored");
                    }
                    attempt = 0;
                    self.timeouts.store(0, Ordering::Relaxed);
                    let tracking_on = self.start_tracking(conn.clone()).await;
                    {
                        let mut state = self.lock();
                        state.generation += 1;
                        let generation = state.generation;
                        state.conn = Some((generation, conn));
                        state.tried = true;
                    }
                    let generation = self.lock().generation;
                    if let Some((tracking, _)) = &self.tracking {
                        tracking.set_live(tracking_on);
                        if tracking_on {
                            tokio::spawn(Link::heartbeat(self.clone(), generation));
                        }
                    }
                    self.changed.notify_waiters();
                    // Sleep until a command reports the connection broken (or close()).
                    loop {
                        self.broken.notified().await;
                        let state = self.lock();
                        if state.conn.is_none() || state.closed {
                            break;
                        }
                    }
                }
                Ok(Err(e)) => {
                    attempt = attempt.saturating_add(1);
                    self.failed_attempt(attempt, &e.to_string());
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(_) => {
                    attempt = attempt.saturating_add(1);
                    self.failed_attempt(attempt, "connect timed out");
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
    }

    /// Pings the tracking connection every [`HEARTBEAT`]; each answer proves every
    /// invalidation sent before the ping has been delivered (see `session::cache`).
    async fn heartbeat(self: Arc<Self>, generation: u64) {
        let Some((tracking, _)) = &self.tracking else {
            return;
        };
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            let conn = {
                let state = self.lock();
                match &state.conn {
                    Some((g, conn)) if *g == generation && !state.closed => conn.clone(),
                    _ => return,
                }
            };
            let sent = std::time::Instant::now();
            let mut conn = conn;
            let cmd = redis::cmd("PING");
            let ping = cmd.query_async::<String>(&mut conn);
            match tokio::time::timeout(HEARTBEAT * 5, ping).await {
                Ok(Ok(_)) => tracking.confirm(sent),
                Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped() => {
                    self.mark_broken(generation);
                    return;
                }
                // Slow or failing: no confirmation, so the cache stops answering on its own.
                _ => {}
            }
        }
    }

    /// Turns on invalidation pushes for session keys on a new connection. Without them the
    /// local cache stays off and every check goes to Redis.
    async fn start_tracking(&self, mut conn: MultiplexedConnection) -> bool {
        let Some((_, prefix)) = &self.tracking else {
            return false;
        };
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg("TRACKING")
            .arg("ON")
            .arg("BCAST")
            .arg("PREFIX")
            .arg(prefix)
            .arg("NOLOOP");
        match tokio::time::timeout(self.connect_timeout, cmd.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Redis client tracking unavailable; the local session cache is off");
                false
            }
            Err(_) => {
                tracing::warn!("Redis client tracking timed out; the local session cache is off");
                false
            }
        }
    }

    fn failed_attempt(&self, attempt: u32, reason: &str) {
        let mut state = self.lock();
        state.tried = true;
        state.conn = None;
        drop(state);
        self.changed.notify_waiters();
        if attempt == 1 || attempt.is_power_of_two() {
            tracing::warn!(attempt, error = %reason, "cannot connect to Redis");
        }
    }
}

/// Remaining lifetime of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyTtl {
    Missing,
    Persistent,
    Expires(Duration),
}

/// A session as stored: its encoded value and remaining lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub value: String,
    pub ttl: Duration,
}

/// The Redis door. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    link: Arc<Link>,
    prefix: Arc<str>,
    command_timeout: Duration,
    scripts: Arc<Scripts>,
    metrics: Arc<Metrics>,
}

struct Scripts {
    touch: Script,
    create: Script,
    get: Script,
    destroy: Script,
    list: Script,
}

/// Reads the session, moves lastActive forward when it is older than the resolution, slides
/// the session's TTL back to full unless it was slid less than `slide` ago (then nothing is
/// written, so other replicas' caches are not invalidated), and makes sure the user's index
/// lives at least as long. Returns the (possibly updated) value, or nil when the session does
/// not exist.
const TOUCH: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return false end
local ttl = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local due = ttl - tonumber(ARGV[5])
local last = tonumber(string.sub(v, 1, 13))
if last == nil or now - last >= tonumber(ARGV[3]) then
  redis.call('SETRANGE', KEYS[1], 0, ARGV[2])
  v = ARGV[2] .. string.sub(v, 14)
end
if redis.call('PTTL', KEYS[1]) <= due then redis.call('PEXPIRE', KEYS[1], ttl) end
local t = redis.call('PTTL', KEYS[2])
if t == -2 then redis.call('HSET', KEYS[2], ARGV[4], '') end
if t <= due then redis.call('PEXPIRE', KEYS[2], ttl) end
return v
";

/// Stores a new session, adds it to the user's index (pruning sessions that have expired) and
/// extends the index to at least the session's lifetime.
const CREATE: &str = r"
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for _, s in ipairs(redis.call('HKEYS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[4] .. s) == 0 then redis.call('HDEL', KEYS[2], s) end
end
redis.call('HSET', KEYS[2], ARGV[3], '')
local t = redis.call('PTTL', KEYS[2])
if t < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
";

const GET: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('PTTL', KEYS[1])}
";

/// Deletes a session, removes it from the index, prunes the index, and shortens the index's
/// lifetime to that of the user's longest-lived remaining session. Returns the deleted value.
const DESTROY: &str = r"
local v = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local longest = -1
for _, s in ipairs(redis.call('HKEYS', KEYS[2])) do
  local t = redis.call('PTTL', ARGV[2] .. s)
  if t == -2 then redis.call('HDEL', KEYS[2], s) elseif t > longest then longest = t end
end
if longest > 0 then redis.call('PEXPIRE', KEYS[2], longest) end
return v
";

/// Every live session of a user as (id, value, pttl) triples; ids whose session is gone are
/// removed from the index on the way.
const LIST: &str = r"
local out = {}
local longest = -1
for _, s in ipairs(redis.call('HKEYS', KEYS[1])) do
  local k = ARGV[1] .. s
  local v = redis.call('GET', k)
  if v then
    local t = redis.call('PTTL', k)
    table.insert(out, s)
    table.insert(out, v)
    table.insert(out, t)
    if t > longest then longest = t end
  else
    redis.call('HDEL', KEYS[1], s)
  end
end
if longest > 0 then redis.call('PEXPIRE', KEYS[1], longest) end
return out
";

/// Hands one push message to the cache: `invalidate` with keys, or with nil after FLUSHALL;
/// a lost connection turns the cache off.
fn deliver(tracking: &dyn Tracking, push: redis::PushInfo) {
    match push.kind {
        redis::PushKind::Invalidate => {
            for value in push.data {
                match value {
                    redis::Value::Array(keys) => {
                        for key in keys {
                            if let redis::Value::BulkString(bytes) = key {
                                tracking.invalidate(&bytes);
                            }
                        }
                    }
                    redis::Value::BulkString(bytes) => tracking.invalidate(&bytes),
                    _ => tracking.flush(),
                }
            }
        }
        redis::PushKind::Disconnection => tracking.set_live(false),
        _ => {}
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ttl_from_pttl(pttl: i64) -> Duration {
    Duration::from_millis(u64::try_from(pttl).unwrap_or(0))
}

impl Store {
    /// Prepares the store; nothing connects until the first command, but the connection's tasks
    /// will run on the runtime this is called on, if any. With `tracking`, the
    /// connection speaks RESP3 and delivers invalidations of session keys to it.
    pub fn new(
        config: &RedisConfig,
        metrics: Arc<Metrics>,
        tracking: Option<Arc<dyn Tracking>>,
    ) -> Result<Store, StoreError> {
        let mut info = config.connection.clone();
        let mut connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout));
        if let Some(tracking) = &tracking {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info = info.set_redis_settings(settings);
            let sink = tracking.clone();
            connection_config = connection_config.set_push_sender(
                move |push: redis::PushInfo| -> Result<(), std::convert::Infallible> {
                    deliver(sink.as_ref(), push);
                    Ok(())
                },
            );
        }
        let client = redis::Client::open(info).map_err(|e| StoreError::Redis(e.to_string()))?;
        let link = Link {
            client,
            config: connection_config,
            connect_timeout: config.connect_timeout,
            state: Mutex::new(LinkState::default()),
            changed: Notify::new(),
            broken: Notify::new(),
            started: AtomicBool::new(false),
            timeouts: AtomicU32::new(0),
            tracking: tracking.map(|t| (t, format!("{}:session:", config.key_prefix))),
            runtime: tokio::runtime::Handle::try_current().ok(),
        };
        Ok(Store {
            link: Arc::new(link),
            prefix: config.key_prefix.as_str().into(),
            command_timeout: config.command_timeout,
            scripts: Arc::new(Scripts {
                touch: Script::new(TOUCH),
                create: Script::new(CREATE),
                get: Script::new(GET),
                destroy: Script::new(DESTROY),
                list: Script::new(LIST),
            }),
            metrics,
        })
    }

    /// Runs one Redis operation on the shared connection, bounded by the command timeout.
    /// Connection-level failures hand the connection to the reconnect task.
    async fn run<T, F, Fut>(&self, name: &'static str, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let started = std::time::Instant::now();
        let result = self.attempt(op).await;
        self.metrics.observe_redis(name, started.elapsed());
        if let Err(e) = &result {
            let kind = match e {
                StoreError::Unavailable | StoreError::Closed => "unavailable",
                StoreError::Timeout(_) => "timeout",
                StoreError::Redis(_) | StoreError::Corrupt(_) => "error",
            };
            self.metrics.redis_error(name, kind);
        }
        result
    }

    async fn attempt<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let (generation, conn) = self.link.get().await?;
        match tokio::time::timeout(self.command_timeout, op(conn)).await {
            Ok(Ok(value)) => {
                self.link.timeouts.store(0, Ordering::Relaxed);
                Ok(value)
            }
            Ok(Err(e)) => {
                if e.is_timeout() {
                    self.note_timeout(generation);
                    return Err(StoreError::Timeout(self.command_timeout));
                }
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error()
                {
                    self.link.mark_broken(generation);
                    return Err(StoreError::Unavailable);
                }
                Err(StoreError::Redis(e.to_string()))
            }
            Err(_) => {
                self.note_timeout(generation);
                Err(StoreError::Timeout(self.command_timeout))
            }
        }
    }

    fn note_timeout(&self, generation: u64) {
        let n = self.link.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= TIMEOUTS_BEFORE_RECONNECT {
            self.link.timeouts.store(0, Ordering::Relaxed);
            self.link.mark_broken(generation);
        }
    }

    /// PING: used by `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run("ping", |mut c| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map(|_| ())
        })
        .await
    }

    /// Stops the background reconnects and drops the connection.
    pub fn close(&self) {
        let mut state = self.link.lock();
        state.closed = true;
        state.conn = None;
        drop(state);
        if let Some((tracking, _)) = &self.link.tracking {
            tracking.set_live(false);
        }
        self.link.broken.notify_one();
        self.link.changed.notify_waiters();
    }

    // ---------------------------------------------------------------------------------------
    // Keys.
    // ---------------------------------------------------------------------------------------

    pub fn cache_key(&self, kind: &str, id: &str) -> String {
        format!("{}:cache:{kind}:{id}", self.prefix)
    }

    /// `{prefix}:session:{{userId}}:` — followed by the session id.
    fn session_key_prefix(&self, user_id: &str) -> String {
        // Built by hand: this runs on every request, and `format!` costs several times more.
        let mut key = String::with_capacity(self.prefix.len() + user_id.len() + 48);
        key.push_str(&self.prefix);
        key.push_str(":session:{");
        key.push_str(user_id);
        key.push_str("}:");
        key
    }

    pub fn session_key(&self, user_id: &str, session_id: &str) -> String {
        let mut key = self.session_key_prefix(user_id);
        key.push_str(session_id);
        key
    }

    pub fn index_key(&self, user_id: &str) -> String {
        format!("{}:user:{{{user_id}}}:sessions", self.prefix)
    }

    // ---------------------------------------------------------------------------------------
    // The cache.
    // ---------------------------------------------------------------------------------------

    /// A JSON value from `{prefix}:cache:{kind}:{id}`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        let key = self.cache_key(kind, id);
        let raw: Option<Vec<u8>> = self
            .run("cache_get", |mut c| async move {
                redis::cmd("GET").arg(&key).query_async(&mut c).await
            })
            .await?;
        raw.map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .transpose()
    }

    /// Stores a JSON value, expiring after `ttl` when given.
    pub async fn set<T: Serialize>(
        &self,
        kind: &str,
        id: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let key = self.cache_key(kind, id);
        let json = serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.run("cache_set", |mut c| async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key).arg(json);
            if let Some(ttl) = ttl {
                cmd.arg("PX").arg(ms(ttl).max(1));
            }
            cmd.query_async::<()>(&mut c).await
        })
        .await
    }

    /// Deletes an entry; true when it existed.
    pub async fn delete(&self, kind: &str, id: &str) -> Result<bool, StoreError> {
        let key = self.cache_key(kind, id);
        let n: i64 = self
            .run("cache_delete", |mut c| async move {
                redis::cmd("DEL").arg(&key).query_async(&mut c).await
            })
            .await?;
        Ok(n > 0)
    }

    pub async fn exists(&self, kind: &str, id: &str) -> Result<bool, StoreError> {
        let key = self.cache_key(kind, id);
        let n: i64 = self
            .run("cache_exists", |mut c| async move {
                redis::cmd("EXISTS").arg(&key).query_async(&mut c).await
            })
            .await?;
        Ok(n > 0)
    }

    pub async fn ttl(&self, kind: &str, id: &str) -> Result<KeyTtl, StoreError> {
        let key = self.cache_key(kind, id);
        let pttl: i64 = self
            .run("cache_ttl", |mut c| async move {
                redis::cmd("PTTL").arg(&key).query_async(&mut c).await
            })
            .await?;
        Ok(match pttl {
            -2 => KeyTtl::Missing,
            -1 => KeyTtl::Persistent,
            n => KeyTtl::Expires(ttl_from_pttl(n)),
        })
    }

    // ---------------------------------------------------------------------------------------
    // Sessions: each operation is one script, one round trip.
    // ---------------------------------------------------------------------------------------

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        name: &'static str,
        script: &Script,
        keys: &[&str],
        args: &[String],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(arg.as_str());
        }
        self.run(name, |mut c| async move {
            invocation.invoke_async(&mut c).await
        })
        .await
    }

    pub async fn session_create(
        &self,
        user_id: &str,
        session_id: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = self.session_key(user_id, session_id);
        let index = self.index_key(user_id);
        let _: i64 = self
            .invoke(
                "session_create",
                &self.scripts.create,
                &[&key, &index],
                &[
                    value.to_string(),
                    ms(ttl).to_string(),
                    session_id.to_string(),
                    self.session_key_prefix(user_id),
                ],
            )
            .await?;
        Ok(())
    }

    /// Reads and slides a session in one round trip: `None` when it does not exist.
    /// `last_active` is a 13-digit Unix millisecond timestamp.
    pub async fn session_touch(
        &self,
        user_id: &str,
        session_id: &str,
        now_ms: u64,
        ttl: Duration,
        resolution: Duration,
        slide: Duration,
    ) -> Result<Option<String>, StoreError> {
        let key = self.session_key(user_id, session_id);
        let index = self.index_key(user_id);
        self.invoke(
            "session_touch",
            &self.scripts.touch,
            &[&key, &index],
            &[
                ms(ttl).to_string(),
                format!("{now_ms:013}"),
                ms(resolution).to_string(),
                session_id.to_string(),
                ms(slide).to_string(),
            ],
        )
        .await
    }

    pub async fn session_get(
        &self,
        user_id: &str,
        session_id: &str,
    ) -> Result<Option<StoredSession>, StoreError> {
        let key = self.session_key(user_id, session_id);
        let found: Option<(String, i64)> = self
            .invoke("session_get", &self.scripts.get, &[&key], &[])
            .await?;
        Ok(found.map(|(value, pttl)| StoredSession {
            value,
            ttl: ttl_from_pttl(pttl),
        }))
    }

    /// Replaces a session's stored value, keeping its TTL; false when it does not exist.
    pub async fn session_replace(
        &self,
        user_id: &str,
        session_id: &str,
        value: &str,
    ) -> Result<bool, StoreError> {
        let key = self.session_key(user_id, session_id);
        let value = value.to_string();
        let ok: Option<String> = self
            .run("session_replace", |mut c| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(value)
                    .arg("XX")
                    .arg("KEEPTTL")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(ok.is_some())
    }

    /// Deletes a session, returning its stored value when it existed.
    pub async fn session_destroy(
        &self,
        user_id: &str,
        session_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let key = self.session_key(user_id, session_id);
        let index = self.index_key(user_id);
        self.invoke(
            "session_destroy",
            &self.scripts.destroy,
            &[&key, &index],
            &[session_id.to_string(), self.session_key_prefix(user_id)],
        )
        .await
    }

    /// Counts session keys with SCAN, in batches, each batch one bounded command. Costs one pass
    /// over the keyspace, whatever the request rate.
    pub async fn count_sessions(&self) -> Result<u64, StoreError> {
        let pattern = format!("{}:session:*", self.prefix);
        let mut cursor: u64 = 0;
        let mut total: u64 = 0;
        loop {
            let pattern = pattern.clone();
            let (next, keys): (u64, Vec<redis::Value>) = self
                .run("session_count_scan", |mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            total += keys.len() as u64;
            if next == 0 {
                return Ok(total);
            }
            cursor = next;
        }
    }

    /// Every live session of a user, as (session id, stored session).
    pub async fn session_list(
        &self,
        user_id: &str,
    ) -> Result<Vec<(String, StoredSession)>, StoreError> {
        let index = self.index_key(user_id);
        let flat: Vec<redis::Value> = self
            .invoke(
                "session_list",
                &self.scripts.list,
                &[&index],
                &[self.session_key_prefix(user_id)],
            )
            .await?;
        let mut out = Vec::with_capacity(flat.len() / 3);
        for triple in flat.chunks(3) {
            let [id, value, pttl] = triple else {
                return Err(StoreError::Corrupt("session list reply".into()));
            };
            let id: String =
                redis::from_redis_value_ref(id).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let value: String = redis::from_redis_value_ref(value)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let pttl: i64 = redis::from_redis_value_ref(pttl)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push((
                id,
                StoredSession {
                    value,
                    ttl: ttl_from_pttl(pttl),
                },
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_linearly_to_two_seconds() {
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(4), Duration::from_millis(200));
        assert_eq!(backoff(40), Duration::from_secs(2));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(2));
    }
}
