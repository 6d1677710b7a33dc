//! The only door to Redis (the CacheService): connection management, command timeouts, the
//! general-purpose namespaced cache, and the session operations as Lua scripts, one round trip
//! each.
//!
//! The connection is opened lazily on first use and re-opened in the background with a linear
//! backoff, `min(attempt x 50 ms, 2 s)`. While Redis is down nothing queues: a command fails at
//! once with [`StoreError::Unavailable`], and every command is bounded by
//! `redis.command_timeout`. The caller decides what a failure means (the proxy fails closed).
//!
//! A server that cannot take writes is left like a lost connection: a master demoted by a
//! failover (`READONLY`), a replica cut off from its master (`MASTERDOWN`), Redis loading its
//! data (`LOADING`). Redis keeps the connection open through all three, and after a failover
//! the master is elsewhere: re-opening resolves the configured host again, and a new
//! connection is only used once `PING` and `ROLE` say it reaches a master.
//!
//! Keys: `{prefix}:cache:{type}:{id}` for cache entries; `{prefix}:sessions:{{userId}}` for all
//! of a user's sessions, one string in the layout of [`crate::session::record`]. The braces are
//! a Redis Cluster hash tag.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::config::RedisConfig;
use crate::metrics::Metrics;
use crate::session::cache::HEARTBEAT;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("Redis is unavailable")]
    Unavailable,
    #[error("Redis cannot take writes: {0}")]
    NotWritable(String),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis error: {0}")]
    Redis(String),
    #[error("stored value is not valid: {0}")]
    Corrupt(String),
    #[error("the store was closed")]
    Closed,
    /// The caller's token was issued before the user last signed out everywhere: an answer,
    /// not a failure.
    #[error("the user signed out everywhere after this token was issued")]
    SignedOut,
    /// The session the caller's token is bound to has ended: an answer, not a failure.
    #[error("the session this token is bound to has ended")]
    SessionEnded,
}

impl StoreError {
    /// Redis answered, and the caller's token was refused (see [`TokenCheck`]).
    pub fn is_refusal(&self) -> bool {
        matches!(self, StoreError::SignedOut | StoreError::SessionEnded)
    }
}

/// The error codes a session script refuses a caller's token with (see [`TokenCheck`]).
const SIGNED_OUT_CODE: &str = "SIGNED_OUT";
const SESSION_ENDED_CODE: &str = "SESSION_ENDED";

/// Receives Redis client-side-caching invalidations (see `session::cache`).
pub trait Tracking: Send + Sync + 'static {
    /// The sessions key of the user `user_id` changed.
    fn invalidate(&self, user_id: &[u8]);
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
    /// The attempt whose connection was reported lost while it was still being set up: it
    /// must not be installed.
    lost: Option<u64>,
    /// Why the last connection attempt failed, until one succeeds: `/readyz` names it.
    failure: Option<String>,
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
    /// Whether checks send `ROLE` with their `PING`: false once the server refused it (an ACL
    /// may deny it, being an admin command), so as not to fill its ACL log 50 times a second.
    ask_role: AtomicBool,
    /// Client-side caching: who to tell, and the key prefix tracked (BCAST).
    tracking: Option<(Arc<dyn Tracking>, String)>,
    /// Where the heartbeat counts a demoted master it meets (op `heartbeat`): with the local
    /// cache on, it usually meets one before any request does.
    metrics: Arc<Metrics>,
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
        if self.drop_connection(generation) {
            tracing::warn!("Redis connection lost; reconnecting");
        }
    }

    /// As [`Link::mark_broken`], for a server that answered but cannot take writes (`reply`).
    fn mark_not_writable(&self, generation: u64, reply: &str) {
        if self.drop_connection(generation) {
            tracing::warn!(error = %reply, "Redis cannot take writes; reconnecting");
        }
    }

    /// Drops connection `generation` if still current, flushing the local cache, and wakes the
    /// reconnect task; false when another caller already did. A connection still being set up
    /// is marked lost instead, so that it is not installed.
    fn drop_connection(&self, generation: u64) -> bool {
        let mut state = self.lock();
        if !matches!(&state.conn, Some((g, _)) if *g == generation) {
            if state.conn.is_none() && state.generation == generation {
                state.lost = Some(generation);
            }
            return false;
        }
        state.conn = None;
        drop(state);
        if let Some((tracking, _)) = &self.tracking {
            tracking.set_live(false);
        }
        self.broken.notify_one();
        true
    }

    async fn maintain(self: Arc<Self>) {
        let mut attempt: u32 = 0;
        loop {
            if self.lock().closed {
                return;
            }
            // Every attempt has its own generation, so that nothing a connection that failed
            // or was dropped reports later can be taken for the current one's.
            let generation = {
                let mut state = self.lock();
                state.generation += 1;
                state.generation
            };
            let opened = match self.open(generation).await {
                Ok(conn) => {
                    let tracking_on = self.start_tracking(conn.clone()).await;
                    // The cache goes live before the connection is published, so that a loss
                    // reported once it is (`drop_connection`) always has the last word.
                    if let Some((tracking, _)) = &self.tracking {
                        tracking.set_live(tracking_on);
                    }
                    if self.install(generation, conn) {
                        Ok(tracking_on)
                    } else {
                        if let Some((tracking, _)) = &self.tracking {
                            tracking.set_live(false);
                        }
                        Err("the connection was lost as it was set up".to_string())
                    }
                }
                Err(reason) => Err(reason),
            };
            match opened {
                Ok(tracking_on) => {
                    if attempt > 0 {
                        tracing::info!(attempts = attempt, "Redis connection restored");
                    }
                    attempt = 0;
                    self.timeouts.store(0, Ordering::Relaxed);
                    if tracking_on {
                        tokio::spawn(Link::heartbeat(self.clone(), generation));
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
                Err(reason) => {
                    attempt = attempt.saturating_add(1);
                    self.failed_attempt(attempt, &reason);
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
    }

    /// Publishes connection `generation`, unless it was reported lost while it was set up.
    fn install(&self, generation: u64, conn: MultiplexedConnection) -> bool {
        let mut state = self.lock();
        if state.lost == Some(generation) {
            return false;
        }
        state.conn = Some((generation, conn));
        state.tried = true;
        state.failure = None;
        true
    }

    /// Connects, and checks that the server can take writes: after a failover the host may
    /// still name the demoted master for a while. The reason when not.
    async fn open(self: &Arc<Self>, generation: u64) -> Result<MultiplexedConnection, String> {
        let config = match &self.tracking {
            Some((tracking, prefix)) => {
                let (tracking, prefix) = (tracking.clone(), prefix.clone());
                let link = Arc::downgrade(self);
                self.config.clone().set_push_sender(
                    move |push: redis::PushInfo| -> Result<(), std::convert::Infallible> {
                        // A connection that is gone concerns the cache only while current: a
                        // late word from one already replaced must not turn the cache off.
                        let disconnected = || {
                            if let Some(link) = link.upgrade() {
                                link.mark_broken(generation);
                            }
                        };
                        deliver(tracking.as_ref(), &prefix, push, disconnected);
                        Ok(())
                    },
                )
            }
            None => self.config.clone(),
        };
        let connect = self
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let conn = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("connect timed out".into()),
        };
        match tokio::time::timeout(self.connect_timeout, probe(conn.clone(), true)).await {
            Ok(Ok(role_answered)) => self.ask_role.store(role_answered, Ordering::Relaxed),
            Ok(Err(e)) => match classify(&e) {
                Failure::NotWritable => {
                    return Err(format!("it cannot take writes: {}", reply_text(&e)))
                }
                Failure::Broken | Failure::Timeout => return Err(e.to_string()),
                // PING refused for another reason: the commands and `/readyz` will tell, as
                // they did before this check.
                Failure::Command => {}
            },
            Err(_) => return Err("no answer to PING".into()),
        }
        Ok(conn)
    }

    /// Pings the tracking connection every [`HEARTBEAT`]; each answer proves every
    /// invalidation sent before the ping has been delivered (see `session::cache`). The ping
    /// asks the role too: a demoted master keeps answering PING, and its invalidations only
    /// follow the new master's writes while it replicates them.
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
            let ping = probe(conn, self.ask_role.load(Ordering::Relaxed));
            match tokio::time::timeout(HEARTBEAT * 5, ping).await {
                Ok(Ok(_)) => tracking.confirm(sent),
                Ok(Err(e)) if classify(&e) == Failure::NotWritable => {
                    self.metrics.redis_error("heartbeat", "not_writable");
                    self.mark_not_writable(generation, &reply_text(&e));
                    return;
                }
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
        state.failure = Some(reason.to_string());
        drop(state);
        self.changed.notify_waiters();
        if attempt == 1 || attempt.is_power_of_two() {
            // The address only: the connection info's password is never logged.
            let redis = self.client.get_connection_info().addr();
            tracing::warn!(attempt, %redis, error = %reason, "cannot connect to Redis");
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

/// The Redis door. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    link: Arc<Link>,
    prefix: Arc<str>,
    /// `{prefix}:sessions:`, where every user's sessions key starts ([`Store::sessions_key`]).
    sessions_prefix: Arc<str>,
    command_timeout: Duration,
    scripts: Arc<Scripts>,
    metrics: Arc<Metrics>,
}

struct Scripts {
    touch: Script,
    create: Script,
    get: Script,
    replace: Script,
    destroy: Script,
    destroy_all: Script,
    list: Script,
    count: Script,
}

/// What every session script shares: the layout of `session::record`, read in Redis. Times
/// come from Redis' own clock (`TIME`), so replicas never disagree about what has expired.
macro_rules! session_lib {
    () => {
        r"
local function u48(s, i)
  local a, b, c, d, e, f = string.byte(s, i, i + 5)
  return ((((a * 256 + b) * 256 + c) * 256 + d) * 256 + e) * 256 + f
end
local function be48(n)
  local b = {}
  for i = 6, 1, -1 do b[i] = n % 256; n = (n - b[i]) / 256 end
  return string.char(b[1], b[2], b[3], b[4], b[5], b[6])
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The records of a value as {first byte of the body, body length, session id, expires_at},
-- or nil when the value is not in the layout.
local function records(v)
  if string.byte(v, 1) ~= 1 then return nil end
  local out, pos, n = {}, 2, #v
  while pos <= n do
    local hi, lo = string.byte(v, pos, pos + 1)
    if lo == nil then return nil end
    local len = hi * 256 + lo
    local body = pos + 2
    if len < 37 or body + len - 1 > n then return nil end
    out[#out + 1] = {body, len, string.sub(v, body, body + 15), u48(v, body + 16)}
    pos = body + len
  end
  return out
end
-- The body (start, length) of the record of session `sid`, expired or not, without building
-- the others: nil when there is none, false when the value is not in the layout (all of it is
-- looked through, the records after the one found too).
local function find(v, sid)
  if string.byte(v, 1) ~= 1 then return false end
  local pos, n, found, found_len = 2, #v, nil, nil
  while pos <= n do
    local hi, lo = string.byte(v, pos, pos + 1)
    if lo == nil then return false end
    local len = hi * 256 + lo
    local body = pos + 2
    if len < 37 or body + len - 1 > n then return false end
    if not found and string.sub(v, body, body + 15) == sid then found, found_len = body, len end
    pos = body + len
  end
  return found, found_len
end
local function corrupt()
  return redis.error_reply('ERR ' .. KEYS[1] .. ' does not hold sessions in the known layout')
end
-- What the caller's token must pass before a script acts, from ARGV[n] and ARGV[n + 1] (absent
-- or empty when not asked): the session it is bound to (its `sid`, ARGV[n + 1]) is live, else
-- SESSION_ENDED; it was not issued (ARGV[n], Unix seconds plus the allowed clock skew) before
-- the user last signed out everywhere (KEYS[2]), else SIGNED_OUT. The refusal, or nil.
local function refusal(n)
  local bound = ARGV[n + 1]
  if bound and bound ~= '' then
    local v = redis.call('GET', KEYS[1])
    local body = nil
    if v then
      body = find(v, bound)
      if body == false then return corrupt() end
    end
    if not body or u48(v, body + 16) <= now_ms() then
      return redis.error_reply('SESSION_ENDED the session this token is bound to has ended')
    end
  end
  local issued = ARGV[n]
  if issued and issued ~= '' then
    local at = redis.call('GET', KEYS[2])
    if at and tonumber(issued) < tonumber(at) then
      return redis.error_reply('SIGNED_OUT the user signed out everywhere after this token was issued')
    end
  end
  return nil
end
local function body_of(v, r) return string.sub(v, r[1], r[1] + r[2] - 1) end
-- The record with its length, as stored.
local function record_of(v, r) return string.sub(v, r[1] - 2, r[1] + r[2] - 1) end
local function framed(body) return string.char(math.floor(#body / 256), #body % 256) .. body end
-- Writes the user's records back, the key expiring with the last of them; none left, no key.
-- (PX rather than PXAT, and no EXPIRE ... GT elsewhere: both need Redis 7.)
local function save(parts, longest, now)
  if #parts == 1 then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], table.concat(parts), 'PX', math.max(longest - now, 1))
  end
end
"
    };
}

/// Finds the session and slides it in place: lastActive moves to now when it is older than
/// the resolution (ARGV[3]), and the expiry back to now + ttl (ARGV[2]) unless it was slid less
/// than `slide` (ARGV[4]) ago. Both are one SETRANGE, and nothing is written when neither is
/// due, so other replicas' caches are not invalidated. Returns the (updated) body, or nil. The
/// caller's token is checked first, from ARGV[5] and ARGV[6] (see `refusal`).
const TOUCH: &str = concat!(
    session_lib!(),
    r"
local refused = refusal(5)
if refused then return refused end
local v = redis.call('GET', KEYS[1])
if not v then return false end
local body, len = find(v, ARGV[1])
if body == false then return corrupt() end
if not body then return false end
local now = now_ms()
local expires = u48(v, body + 16)
if expires <= now then return false end
local ttl = tonumber(ARGV[2])
local last = u48(v, body + 22)
local active = now - last >= tonumber(ARGV[3])
local slide = expires - now <= ttl - tonumber(ARGV[4])
if not active and not slide then return string.sub(v, body, body + len - 1) end
if active then last = now end
if slide then expires = now + ttl end
local times = be48(expires) .. be48(last)
redis.call('SETRANGE', KEYS[1], body + 15, times)
if redis.call('PTTL', KEYS[1]) < expires - now then
  redis.call('PEXPIRE', KEYS[1], expires - now)
end
return ARGV[1] .. times .. string.sub(v, body + 28, body + len - 1)
"
);

/// Adds a session (id ARGV[1], ttl ARGV[2], details ARGV[3]), dropping expired ones; when the
/// user would have more than ARGV[4], the least recently active make room. Returns Redis' time
/// and the bodies of the sessions that made room. The caller's token is checked first, from
/// ARGV[5] and ARGV[6] (see `refusal`); refused, nothing is added.
const CREATE: &str = concat!(
    session_lib!(),
    r"
local refused = refusal(5)
if refused then return refused end
local now = now_ms()
local v = redis.call('GET', KEYS[1]) or string.char(1)
local recs = records(v)
if not recs then return corrupt() end
local kept = {}
for _, r in ipairs(recs) do
  if r[4] > now and r[3] ~= ARGV[1] then kept[#kept + 1] = r end
end
local reply = {now}
local room = tonumber(ARGV[4]) - 1
if #kept > room then
  local order = {}
  for i, r in ipairs(kept) do order[i] = {u48(v, r[1] + 22), i} end
  table.sort(order, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
  for i = 1, #kept - room do
    local r = kept[order[i][2]]
    reply[#reply + 1] = body_of(v, r)
    r[4] = 0
  end
end
local expires = now + tonumber(ARGV[2])
local parts, longest = {string.char(1)}, expires
for _, r in ipairs(kept) do
  if r[4] > 0 then
    parts[#parts + 1] = record_of(v, r)
    if r[4] > longest then longest = r[4] end
  end
end
parts[#parts + 1] = framed(ARGV[1] .. be48(expires) .. be48(now) .. be48(now) .. ARGV[3])
save(parts, longest, now)
return reply
"
);

/// The body of a live session, without touching it. The caller's token is checked first, from
/// ARGV[2] and ARGV[3] (see `refusal`).
const GET: &str = concat!(
    session_lib!(),
    r"
local refused = refusal(2)
if refused then return refused end
local v = redis.call('GET', KEYS[1])
if not v then return false end
local body, len = find(v, ARGV[1])
if body == false then return corrupt() end
if not body or u48(v, body + 16) <= now_ms() then return false end
return string.sub(v, body, body + len - 1)
"
);

/// Replaces a live session's details (ARGV[2]) and records activity now, keeping its expiry
/// and creation time; expired sessions are dropped on the way. 1 when it existed.
const REPLACE: &str = concat!(
    session_lib!(),
    r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local recs = records(v)
if not recs then return corrupt() end
local now = now_ms()
local parts, longest, found = {string.char(1)}, 0, false
for _, r in ipairs(recs) do
  if r[4] > now then
    local body = body_of(v, r)
    if r[3] == ARGV[1] then
      found = true
      body = string.sub(body, 1, 22) .. be48(now) .. string.sub(body, 29, 34) .. ARGV[2]
    end
    parts[#parts + 1] = framed(body)
    if r[4] > longest then longest = r[4] end
  end
end
if not found then return 0 end
save(parts, longest, now)
return 1
"
);

/// Removes a session (and any expired one); the key then expires with the longest-lived
/// remaining session, or goes. Returns the removed body. The caller's token is checked first,
/// from ARGV[2] and ARGV[3] (see `refusal`).
const DESTROY: &str = concat!(
    session_lib!(),
    r"
local refused = refusal(2)
if refused then return refused end
local v = redis.call('GET', KEYS[1])
if not v then return false end
local recs = records(v)
if not recs then return corrupt() end
local now = now_ms()
local parts, longest, gone = {string.char(1)}, 0, false
for _, r in ipairs(recs) do
  if r[4] > now then
    if r[3] == ARGV[1] then
      gone = body_of(v, r)
    else
      parts[#parts + 1] = record_of(v, r)
      if r[4] > longest then longest = r[4] end
    end
  end
end
if #parts <= #recs then save(parts, longest, now) end
return gone
"
);

/// Removes all of a user's sessions (the key goes), and notes in KEYS[2] when (Unix seconds),
/// for ARGV[1] milliseconds or what an earlier sign-out's note had left, whichever is longer
/// (a later sign-out never shortens how long an earlier one shuts out older tokens): tokens
/// issued before then open no session. Returns the bodies of the sessions that were live. The
/// caller's token is checked first, from ARGV[2] and ARGV[3] (see `refusal`).
/// Nothing is written when the sessions cannot be read, so a sign-out that failed can be made
/// again with the same token.
const DESTROY_ALL: &str = concat!(
    session_lib!(),
    r"
local refused = refusal(2)
if refused then return refused end
local now = now_ms()
local v = redis.call('GET', KEYS[1])
local recs = {}
if v then
  recs = records(v)
  if not recs then return corrupt() end
end
local hold = tonumber(ARGV[1])
local left = redis.call('PTTL', KEYS[2])
if left > hold then hold = left end
-- Never moved back, should Redis' clock be (stepped back, or a failover to a server behind):
-- the tokens an earlier sign-out shut out stay shut out.
local at = math.floor(now / 1000)
local before = tonumber(redis.call('GET', KEYS[2]))
if before and before > at then at = before end
redis.call('SET', KEYS[2], at, 'PX', hold)
if not v then return {} end
local out = {}
for _, r in ipairs(recs) do
  if r[4] > now then out[#out + 1] = body_of(v, r) end
end
redis.call('DEL', KEYS[1])
return out
"
);

/// The bodies of a user's live sessions; expired ones are dropped on the way. The caller's
/// token is checked first, from ARGV[1] and ARGV[2] (see `refusal`).
const LIST: &str = concat!(
    session_lib!(),
    r"
local refused = refusal(1)
if refused then return refused end
local v = redis.call('GET', KEYS[1])
if not v then return {} end
local recs = records(v)
if not recs then return corrupt() end
local now = now_ms()
local out, parts, longest = {}, {string.char(1)}, 0
for _, r in ipairs(recs) do
  if r[4] > now then
    out[#out + 1] = body_of(v, r)
    parts[#parts + 1] = record_of(v, r)
    if r[4] > longest then longest = r[4] end
  end
end
if #out < #recs then save(parts, longest, now) end
return out
"
);

/// The number of live sessions under the given keys (values not in the layout, or not strings,
/// count none).
const COUNT: &str = concat!(
    session_lib!(),
    r"
local now, n = now_ms(), 0
for _, k in ipairs(KEYS) do
  local v = redis.pcall('GET', k)
  local recs = type(v) == 'string' and records(v)
  if recs then
    for _, r in ipairs(recs) do
      if r[4] > now then n = n + 1 end
    end
  end
end
return n
"
);

/// Hands one push message to the cache: `invalidate` with keys, or with nil after FLUSHALL;
/// a lost connection calls `disconnected`. `sessions_prefix` is `{prefix}:sessions:`, the
/// tracked prefix.
fn deliver(
    tracking: &dyn Tracking,
    sessions_prefix: &str,
    push: redis::PushInfo,
    disconnected: impl FnOnce(),
) {
    let changed = |key: &[u8]| match user_of_sessions_key(sessions_prefix, key) {
        Some(user_id) => tracking.invalidate(user_id),
        // Not a key this store writes: nothing cached can be matched to it, so all of it goes.
        None => tracking.flush(),
    };
    match push.kind {
        redis::PushKind::Invalidate => {
            for value in push.data {
                match value {
                    redis::Value::Array(keys) => {
                        for key in keys {
                            if let redis::Value::BulkString(bytes) = key {
                                changed(&bytes);
                            }
                        }
                    }
                    redis::Value::BulkString(bytes) => changed(&bytes),
                    _ => tracking.flush(),
                }
            }
        }
        redis::PushKind::Disconnection => disconnected(),
        _ => {}
    }
}

/// The user whose sessions key `key` is (`{sessions_prefix}{userId}`, braces included; see
/// [`Store::sessions_key`]), or `None` for any other key.
fn user_of_sessions_key<'k>(sessions_prefix: &str, key: &'k [u8]) -> Option<&'k [u8]> {
    key.strip_prefix(sessions_prefix.as_bytes())?
        .strip_prefix(b"{")?
        .strip_suffix(b"}")
}

/// What a failed command says about its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No answer in time; the connection may still be fine.
    Timeout,
    /// The connection is dead or unusable.
    Broken,
    /// The server answered but cannot take writes now: a master demoted to replica
    /// (`READONLY`), a replica cut off from its master (`MASTERDOWN`), Redis loading its data
    /// (`LOADING`). It keeps the connection open, so only re-opening finds the master.
    NotWritable,
    /// Redis refused this command; the connection is fine.
    Command,
}

fn classify(e: &redis::RedisError) -> Failure {
    use redis::{ErrorKind, ServerErrorKind};
    if e.is_timeout() {
        return Failure::Timeout;
    }
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        return Failure::Broken;
    }
    match e.kind() {
        ErrorKind::Server(
            ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown | ServerErrorKind::BusyLoading,
        ) => Failure::NotWritable,
        _ => Failure::Command,
    }
}

/// Whether the server behind `conn` can take writes, in one round trip. `PING` is refused
/// (`LOADING`, `MASTERDOWN`) while Redis loads its data or is a replica cut off from its
/// master; a replica in sync answers it as a master would, so with `ask_role` `ROLE` goes
/// along, and any role but master comes back as a `READONLY` error, to be handled as a
/// refused write is. Returns whether `ROLE` was answered: an ACL may deny it (an admin
/// command), and a proxy in front of Redis may not know it; then `PING` alone decides, and
/// the first write refused with `READONLY` still re-opens the connection.
async fn probe(mut conn: MultiplexedConnection, ask_role: bool) -> redis::RedisResult<bool> {
    if !ask_role {
        let ping = redis::cmd("PING").query_async::<String>(&mut conn).await;
        return ping.map(|_| false);
    }
    let mut pipe = redis::pipe();
    pipe.cmd("PING").cmd("ROLE").ignore_errors();
    let (ping, role): (redis::RedisResult<String>, redis::RedisResult<redis::Value>) =
        pipe.query_async(&mut conn).await?;
    ping?;
    match role {
        Ok(reply) => match role_of(&reply) {
            Some(role) if role == "master" => Ok(true),
            Some(role) => Err(not_master(role)),
            None => Ok(false),
        },
        Err(e) if classify(&e) == Failure::NotWritable => Err(e),
        Err(_) => Ok(false),
    }
}

/// The role named first in a `ROLE` reply: `master`, `slave` or `sentinel`.
fn role_of(reply: &redis::Value) -> Option<String> {
    match reply {
        redis::Value::Array(items) => redis::from_redis_value_ref(items.first()?).ok(),
        _ => None,
    }
}

fn not_master(role: String) -> redis::RedisError {
    let kind = redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
    redis::RedisError::from((
        kind,
        "not the master",
        format!("ROLE is {role}, not master"),
    ))
}

/// A Redis error reply as Redis wrote it (`READONLY You can't write against a read only
/// replica.`), for logs and `/readyz`.
fn reply_text(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
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
        let sessions_prefix = format!("{}:sessions:", config.key_prefix);
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.command_timeout));
        if tracking.is_some() {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info = info.set_redis_settings(settings);
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
            ask_role: AtomicBool::new(true),
            tracking: tracking.map(|t| (t, sessions_prefix.clone())),
            metrics: metrics.clone(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        };
        Ok(Store {
            link: Arc::new(link),
            prefix: config.key_prefix.as_str().into(),
            sessions_prefix: sessions_prefix.into(),
            command_timeout: config.command_timeout,
            scripts: Arc::new(Scripts {
                touch: Script::new(TOUCH),
                create: Script::new(CREATE),
                get: Script::new(GET),
                replace: Script::new(REPLACE),
                destroy: Script::new(DESTROY),
                destroy_all: Script::new(DESTROY_ALL),
                list: Script::new(LIST),
                count: Script::new(COUNT),
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
                StoreError::NotWritable(_) => "not_writable",
                StoreError::Timeout(_) => "timeout",
                StoreError::Redis(_) | StoreError::Corrupt(_) => "error",
                // Redis answered; the caller is refused.
                StoreError::SignedOut | StoreError::SessionEnded => return result,
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
            Ok(Err(e)) => match classify(&e) {
                Failure::Timeout => {
                    self.note_timeout(generation);
                    Err(StoreError::Timeout(self.command_timeout))
                }
                Failure::Broken => {
                    self.link.mark_broken(generation);
                    Err(StoreError::Unavailable)
                }
                // This command fails (closed); the next gets a connection to a master, or none.
                Failure::NotWritable => {
                    let reply = reply_text(&e);
                    self.link.mark_not_writable(generation, &reply);
                    Err(StoreError::NotWritable(reply))
                }
                Failure::Command if e.code() == Some(SIGNED_OUT_CODE) => Err(StoreError::SignedOut),
                Failure::Command if e.code() == Some(SESSION_ENDED_CODE) => {
                    Err(StoreError::SessionEnded)
                }
                Failure::Command => Err(StoreError::Redis(e.to_string())),
            },
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

    /// PING and ROLE in one round trip: used by `/readyz`, which so fails while the server
    /// cannot take writes (a replica answers PING), and re-opens the connection then, as a
    /// refused write would.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let ask_role = self.link.ask_role.load(Ordering::Relaxed);
        self.run(
            "ping",
            |c| async move { probe(c, ask_role).await.map(|_| ()) },
        )
        .await
    }

    /// Why the last attempt to connect failed, while no attempt since has succeeded.
    pub fn connect_failure(&self) -> Option<String> {
        self.link.lock().failure.clone()
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

    /// `{prefix}:sessions:{{userId}}`, which holds every session of the user (the braces are
    /// a Redis Cluster hash tag).
    pub fn sessions_key(&self, user_id: &str) -> String {
        // Built by hand: `format!` costs several times more.
        let mut key = String::with_capacity(self.sessions_prefix.len() + user_id.len() + 2);
        key.push_str(&self.sessions_prefix);
        key.push('{');
        key.push_str(user_id);
        key.push('}');
        key
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
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        self.run(name, |mut c| async move {
            invocation.invoke_async(&mut c).await
        })
        .await
    }

    /// Adds a session (see `session::record`) and returns Redis' time, in Unix milliseconds,
    /// and the bodies of the least recently active sessions that made room for it when the
    /// user already had `max_per_user`. The caller's `token` is checked first (see
    /// [`TokenCheck`]).
    pub async fn session_create(
        &self,
        user_id: &str,
        session_id: &Uuid,
        details: &[u8],
        ttl: Duration,
        max_per_user: usize,
        token: TokenCheck,
    ) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
        let key = self.sessions_key(user_id);
        let check = self.token_check(user_id, token);
        let (ttl, max_per_user) = (ms(ttl).to_string(), max_per_user.to_string());
        let mut args: Args = smallvec::smallvec![
            &session_id.as_bytes()[..],
            ttl.as_bytes(),
            details,
            max_per_user.as_bytes(),
        ];
        let keys = check.extend(&key, &mut args);
        let reply: Vec<redis::Value> = self
            .invoke("session_create", &self.scripts.create, &keys, &args)
            .await?;
        let bad = || StoreError::Corrupt("session create reply".into());
        let (now, evicted) = reply.split_first().ok_or_else(bad)?;
        let now: u64 = redis::from_redis_value_ref(now).map_err(|_| bad())?;
        let evicted = evicted
            .iter()
            .map(|body| redis::from_redis_value_ref(body).map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        Ok((now, evicted))
    }

    /// Reads and slides a session in one round trip; its body (see `session::record`), or
    /// `None` when it does not exist. The caller's `token` is checked first (see
    /// [`TokenCheck`]).
    pub async fn session_touch(
        &self,
        user_id: &str,
        session_id: &Uuid,
        ttl: Duration,
        resolution: Duration,
        slide: Duration,
        token: TokenCheck,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.sessions_key(user_id);
        let check = self.token_check(user_id, token);
        let (ttl, resolution, slide) = (
            ms(ttl).to_string(),
            ms(resolution).to_string(),
            ms(slide).to_string(),
        );
        let mut args: Args = smallvec::smallvec![
            &session_id.as_bytes()[..],
            ttl.as_bytes(),
            resolution.as_bytes(),
            slide.as_bytes(),
        ];
        let keys = check.extend(&key, &mut args);
        self.invoke("session_touch", &self.scripts.touch, &keys, &args)
            .await
    }

    /// A live session's body, without touching it. The caller's `token` is checked first (see
    /// [`TokenCheck`]).
    pub async fn session_get(
        &self,
        user_id: &str,
        session_id: &Uuid,
        token: TokenCheck,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.sessions_key(user_id);
        let check = self.token_check(user_id, token);
        let mut args: Args = smallvec::smallvec![&session_id.as_bytes()[..]];
        let keys = check.extend(&key, &mut args);
        self.invoke("session_get", &self.scripts.get, &keys, &args)
            .await
    }

    /// What a script needs to make `check`: the sign-out key and issue time, the bound session.
    fn token_check(&self, user_id: &str, check: TokenCheck) -> ScriptTokenCheck {
        ScriptTokenCheck {
            signed_out_key: check.issued_by.map(|_| self.signed_out_key(user_id)),
            issued_by: check.issued_by.map(|at| at.to_string()).unwrap_or_default(),
            bound_to: check.bound_to,
        }
    }

    /// Replaces a session's details, keeping its expiry; false when it does not exist.
    pub async fn session_replace(
        &self,
        user_id: &str,
        session_id: &Uuid,
        details: &[u8],
    ) -> Result<bool, StoreError> {
        let key = self.sessions_key(user_id);
        let replaced: i64 = self
            .invoke(
                "session_replace",
                &self.scripts.replace,
                &[&key],
                &[session_id.as_bytes(), details],
            )
            .await?;
        Ok(replaced == 1)
    }

    /// Deletes a session, returning its body when it existed. The caller's `token` is checked
    /// first (see [`TokenCheck`]).
    pub async fn session_destroy(
        &self,
        user_id: &str,
        session_id: &Uuid,
        token: TokenCheck,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.sessions_key(user_id);
        let check = self.token_check(user_id, token);
        let mut args: Args = smallvec::smallvec![&session_id.as_bytes()[..]];
        let keys = check.extend(&key, &mut args);
        self.invoke("session_destroy", &self.scripts.destroy, &keys, &args)
            .await
    }

    /// Deletes all of a user's sessions, returning the bodies of those that were live, and
    /// refuses new sessions to tokens issued before now for `remember` (see `session_create`).
    /// The caller's `token` is checked first (see [`TokenCheck`]).
    pub async fn session_destroy_all(
        &self,
        user_id: &str,
        remember: Duration,
        token: TokenCheck,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let key = self.sessions_key(user_id);
        let marker = self.signed_out_key(user_id);
        let remember = ms(remember).max(1).to_string();
        let check = self.token_check(user_id, token);
        let mut args: Args = smallvec::smallvec![remember.as_bytes()];
        // The script writes the sign-out key whatever is checked, so it always has it.
        check.extend(&key, &mut args);
        self.invoke(
            "session_destroy_all",
            &self.scripts.destroy_all,
            &[&key, &marker],
            &args,
        )
        .await
    }

    /// When the user last signed out everywhere: `{prefix}:signed-out:{userId}`, in the hash
    /// slot of the user's sessions key.
    pub fn signed_out_key(&self, user_id: &str) -> String {
        format!("{}:signed-out:{{{user_id}}}", self.prefix)
    }

    /// Counts live sessions: SCAN over the users' keys in batches, each batch counted by one
    /// script. Costs one pass over the keyspace, whatever the request rate. (A batch spans hash
    /// slots, which Redis Cluster refuses in one script (CROSSSLOT): moving to Cluster means
    /// counting key by key. The store speaks to one server.)
    pub async fn count_sessions(&self) -> Result<u64, StoreError> {
        let pattern = format!("{}*", self.sessions_prefix);
        let mut cursor: u64 = 0;
        let mut total: u64 = 0;
        loop {
            let pattern = pattern.clone();
            let (next, keys): (u64, Vec<String>) = self
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
            if !keys.is_empty() {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                let n: u64 = self
                    .invoke("session_count", &self.scripts.count, &keys, &[])
                    .await?;
                // Counted by a script: trusted to be a count, not to be small.
                total = total.saturating_add(n);
            }
            if next == 0 {
                return Ok(total);
            }
            cursor = next;
        }
    }

    /// The bodies of every live session of a user. The caller's `token` is checked first (see
    /// [`TokenCheck`]).
    pub async fn session_list(
        &self,
        user_id: &str,
        token: TokenCheck,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let key = self.sessions_key(user_id);
        let check = self.token_check(user_id, token);
        let mut args = Args::new();
        let keys = check.extend(&key, &mut args);
        self.invoke("session_list", &self.scripts.list, &keys, &args)
            .await
    }
}

/// What a session script checks about the caller's token before it acts. The checks are in
/// the script, so that they cost no round trip of their own and are one step with what the
/// script does: nothing can end the bound session, or sign the user out, in between.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCheck {
    /// The session the token is bound to (its `sid` claim): refused
    /// ([`StoreError::SessionEnded`]) unless it is live. Checked first, and without sliding it.
    pub bound_to: Option<Uuid>,
    /// Refused ([`StoreError::SignedOut`]) when the user signed out everywhere after this time
    /// (Unix seconds: the token's issue time plus the allowed clock skew).
    pub issued_by: Option<u64>,
}

impl TokenCheck {
    /// No check: the proxied path, which checks the session itself, and tunnels.
    pub const NONE: TokenCheck = TokenCheck {
        bound_to: None,
        issued_by: None,
    };
}

/// A script's arguments, on the stack: the per-request check passes six at most.
type Args<'a> = smallvec::SmallVec<[&'a [u8]; 6]>;

/// A [`TokenCheck`] as a script's extra key (the user's sign-out key, when the issue time is
/// checked) and last two arguments (the issue time and the bound session, either empty).
struct ScriptTokenCheck {
    signed_out_key: Option<String>,
    issued_by: String,
    bound_to: Option<Uuid>,
}

impl ScriptTokenCheck {
    /// The script's keys (the sessions key, then the sign-out key when checking the issue
    /// time), with the check's arguments appended to `args` when there is one.
    fn extend<'a>(&'a self, key: &'a str, args: &mut Args<'a>) -> smallvec::SmallVec<[&'a str; 2]> {
        if self.signed_out_key.is_some() || self.bound_to.is_some() {
            args.push(self.issued_by.as_bytes());
            args.push(
                self.bound_to
                    .as_ref()
                    .map_or(&[][..], |id| &id.as_bytes()[..]),
            );
        }
        match &self.signed_out_key {
            Some(marker) => smallvec::smallvec![key, marker.as_str()],
            None => smallvec::smallvec![key],
        }
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

    fn store(prefix: &str) -> Store {
        let config = RedisConfig {
            connection: "redis://127.0.0.1:1".parse().unwrap(),
            key_prefix: prefix.into(),
            command_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
        };
        Store::new(&config, Arc::new(Metrics::new()), None).unwrap()
    }

    #[test]
    fn a_sessions_key_names_its_user() {
        let store = store("app");
        for user in ["alice", "a:{b}", "", "ü"] {
            let key = store.sessions_key(user);
            assert_eq!(
                user_of_sessions_key(&store.sessions_prefix, key.as_bytes()),
                Some(user.as_bytes()),
                "{key}"
            );
        }
        for other in [
            "app:sessions:alice",
            "app:cache:x:{alice}",
            "other:sessions:{alice}",
        ] {
            assert_eq!(
                user_of_sessions_key("app:sessions:", other.as_bytes()),
                None
            );
        }
    }

    /// The error of a Redis error reply (`-CODE detail`).
    fn error_reply(reply: &str) -> redis::RedisError {
        match redis::parse_redis_value(format!("-{reply}\r\n").as_bytes()) {
            Ok(redis::Value::ServerError(e)) => e.into(),
            other => panic!("{reply:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn a_server_that_cannot_take_writes_is_left_like_a_broken_connection() {
        for reply in [
            "READONLY You can't write against a read only replica.",
            "READONLY You can't write against a read only replica. script: 2466aaf81bbfc77363f98c3be5e38bcaa7ccc024, on @user_script:1.",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "LOADING Redis is loading the dataset in memory",
        ] {
            let e = error_reply(reply);
            assert_eq!(classify(&e), Failure::NotWritable, "{reply}");
            assert_eq!(reply_text(&e), reply);
        }
        for reply in [
            "ERR unknown command 'ROLE', with args beginning with: ",
            "NOPERM User portcullis has no permissions to run the 'role' command",
            "NOSCRIPT No matching script. Please use EVAL.",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        ] {
            assert_eq!(classify(&error_reply(reply)), Failure::Command, "{reply}");
        }
        let io = |kind: std::io::ErrorKind| redis::RedisError::from(std::io::Error::from(kind));
        assert_eq!(
            classify(&io(std::io::ErrorKind::ConnectionReset)),
            Failure::Broken
        );
        assert_eq!(
            classify(&io(std::io::ErrorKind::TimedOut)),
            Failure::Timeout
        );
    }

    #[test]
    fn any_role_but_master_counts_as_a_refused_write() {
        use redis::Value::{Array, BulkString, Int};
        let bulk = |s: &str| BulkString(s.as_bytes().to_vec());
        let master = Array(vec![bulk("master"), Int(3129659), Array(vec![])]);
        assert_eq!(role_of(&master).as_deref(), Some("master"));
        let replica = Array(vec![
            bulk("slave"),
            bulk("127.0.0.1"),
            Int(9999),
            bulk("connected"),
            Int(3167038),
        ]);
        assert_eq!(role_of(&replica).as_deref(), Some("slave"));
        assert_eq!(role_of(&redis::Value::Okay), None);
        assert_eq!(role_of(&Array(vec![])), None);

        let refused = not_master("slave".into());
        assert_eq!(classify(&refused), Failure::NotWritable);
        assert_eq!(reply_text(&refused), "READONLY ROLE is slave, not master");
    }

    #[derive(Default)]
    struct Recorded {
        invalidated: Mutex<Vec<Vec<u8>>>,
        flushes: AtomicU32,
        turned_off: AtomicBool,
    }

    impl Tracking for Recorded {
        fn invalidate(&self, user_id: &[u8]) {
            self.invalidated.lock().unwrap().push(user_id.to_vec());
        }
        fn flush(&self) {
            self.flushes.fetch_add(1, Ordering::Relaxed);
        }
        fn set_live(&self, live: bool) {
            self.turned_off.fetch_or(!live, Ordering::Relaxed);
        }
        fn confirm(&self, _: std::time::Instant) {}
    }

    #[test]
    fn invalidations_reach_the_cache_by_user_and_unknown_keys_flush_it() {
        let recorded = Recorded::default();
        let key = |k: &str| redis::Value::BulkString(k.as_bytes().to_vec());
        let push = redis::PushInfo {
            kind: redis::PushKind::Invalidate,
            data: vec![redis::Value::Array(vec![
                key("app:sessions:{alice}"),
                key("app:sessions:{bob}"),
            ])],
        };
        deliver(&recorded, "app:sessions:", push, || {
            panic!("not a disconnection")
        });
        assert_eq!(
            *recorded.invalidated.lock().unwrap(),
            vec![b"alice".to_vec(), b"bob".to_vec()]
        );
        assert_eq!(recorded.flushes.load(Ordering::Relaxed), 0);

        let push = redis::PushInfo {
            kind: redis::PushKind::Invalidate,
            data: vec![key("app:sessions:stray")],
        };
        deliver(&recorded, "app:sessions:", push, || {
            panic!("not a disconnection")
        });
        assert_eq!(recorded.flushes.load(Ordering::Relaxed), 1);
        // FLUSHALL: a nil instead of keys.
        let push = redis::PushInfo {
            kind: redis::PushKind::Invalidate,
            data: vec![redis::Value::Nil],
        };
        deliver(&recorded, "app:sessions:", push, || {
            panic!("not a disconnection")
        });
        assert_eq!(recorded.flushes.load(Ordering::Relaxed), 2);
    }

    /// A lost connection is the link's to judge (it may have been replaced already: see
    /// `Link::open`), not the cache's.
    #[test]
    fn a_disconnection_is_handed_to_the_link_not_the_cache() {
        let recorded = Recorded::default();
        let mut called = 0;
        let push = redis::PushInfo {
            kind: redis::PushKind::Disconnection,
            data: vec![],
        };
        deliver(&recorded, "app:sessions:", push, || called += 1);
        assert_eq!(called, 1);
        assert_eq!(recorded.flushes.load(Ordering::Relaxed), 0);
        assert!(!recorded.turned_off.load(Ordering::Relaxed));
    }
}
