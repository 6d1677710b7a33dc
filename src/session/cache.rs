//! The local session cache: a session that Redis confirmed (and slid) is admitted from memory
//! for up to `slide_interval`, then checked in Redis again.
//!
//! It is kept exact by Redis client-side caching: the store's connection runs
//! `CLIENT TRACKING ON BCAST PREFIX <prefix>:sessions: NOLOOP`, so any write to a user's
//! sessions key by another client (another replica's destroy or slide, an expiry, an
//! operator's DEL) pushes an invalidation that removes that user's entries here within
//! milliseconds. Writes by this process do not come back (NOLOOP); this process removes those
//! entries itself. The cache is only consulted while the tracking connection is up: on
//! disconnect it is flushed and every request goes to Redis (and fails closed if Redis cannot
//! answer).
//!
//! Being connected is not enough: a partitioned or paused Redis would leave the connection
//! open while invalidations stop arriving. So the store pings Redis every few milliseconds on
//! the same connection, and the cache only answers while a ping *sent* at most
//! [`MAX_STALENESS`] ago has been answered: replies and pushes arrive in order on one
//! connection, so every invalidation for a write made before that ping has been applied. A
//! session destroyed anywhere is refused here within that bound.
//!
//! A reply and an invalidation for the same key can race (the reply is read first, but the task
//! that fills the cache may run after the invalidation was handled). Each user id hashes to one of
//! a fixed set of epoch counters, bumped by every invalidation; a fill is dropped when its
//! counter moved since the lookup began.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use foldhash::quality::RandomState;
use uuid::Uuid;

use crate::session::Platform;

const EPOCH_SLOTS: usize = 1024;

/// How old the latest answered ping may be for the cache to answer.
pub const MAX_STALENESS: Duration = Duration::from_millis(60);

/// How often the store pings Redis to prove invalidations are flowing.
pub const HEARTBEAT: Duration = Duration::from_millis(20);

/// Sessions of one user kept at most; a user with more is asked about in Redis more often.
const SESSIONS_PER_USER: usize = 8;

/// How often a full cache may sweep itself to make room for a new user. A sweep walks every
/// entry; were each insert into a full cache of fresh entries to sweep, every request of an
/// uncached user would pay that walk (and hold the shards' locks through it).
const FULL_SWEEP_SPACING: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Entry {
    session: Uuid,
    platform: Platform,
    /// Until when the entry may admit requests without asking Redis.
    fresh_until: Instant,
}

/// Sessions recently confirmed by Redis, by user id (the user's Redis key holds them all).
pub struct SessionCache {
    entries: DashMap<Box<str>, Vec<Entry>, RandomState>,
    epochs: Box<[AtomicU64]>,
    hasher: RandomState,
    max_entries: usize,
    /// True while the connection that delivers invalidations is up and tracking.
    live: AtomicBool,
    /// Reference point for `confirmed_nanos`.
    origin: Instant,
    /// When (after `origin`) the latest answered ping was sent.
    confirmed_nanos: AtomicU64,
    /// When (after `origin`) a full cache last swept itself, to make room.
    full_sweep_nanos: AtomicU64,
}

/// Where a lookup began, to decide whether its result may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

impl SessionCache {
    pub fn new(max_entries: usize) -> Self {
        SessionCache {
            entries: DashMap::with_hasher(RandomState::default()),
            epochs: (0..EPOCH_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::default(),
            max_entries,
            live: AtomicBool::new(false),
            origin: Instant::now(),
            confirmed_nanos: AtomicU64::new(0),
            full_sweep_nanos: AtomicU64::new(0),
        }
    }

    /// `at` as nanoseconds after `origin`.
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// A ping sent at `sent` was answered: every invalidation before it has arrived.
    pub fn confirm(&self, sent: Instant) {
        self.confirmed_nanos
            .fetch_max(self.nanos(sent), Ordering::AcqRel);
    }

    /// Live, and a recent enough ping has been answered.
    fn trustworthy(&self, now: Instant) -> bool {
        if !self.live.load(Ordering::Acquire) {
            return false;
        }
        let confirmed = Duration::from_nanos(self.confirmed_nanos.load(Ordering::Acquire));
        now.saturating_duration_since(self.origin)
            .saturating_sub(confirmed)
            <= MAX_STALENESS
    }

    fn slot(&self, user_id: &[u8]) -> &AtomicU64 {
        &self.epochs[(self.hasher.hash_one(user_id) as usize) % EPOCH_SLOTS]
    }

    /// The platform of a session confirmed recently enough, if the cache may be trusted now.
    pub fn get(&self, user_id: &str, session: Uuid) -> Option<Platform> {
        self.get_at(user_id, session, Instant::now())
    }

    fn get_at(&self, user_id: &str, session: Uuid, now: Instant) -> Option<Platform> {
        if !self.trustworthy(now) {
            return None;
        }
        let entry = *self
            .entries
            .get(user_id)?
            .iter()
            .find(|e| e.session == session)?;
        (now < entry.fresh_until).then_some(entry.platform)
    }

    /// Call before asking Redis; pass the result to [`SessionCache::insert`].
    pub fn epoch(&self, user_id: &str) -> Epoch {
        Epoch(self.slot(user_id.as_bytes()).load(Ordering::Acquire))
    }

    /// Remembers a session of `user_id` Redis just confirmed, unless an invalidation of that
    /// user's key (or a flush) arrived since `epoch` was taken.
    pub fn insert(
        &self,
        user_id: &str,
        epoch: Epoch,
        session: Uuid,
        platform: Platform,
        fresh_for: Duration,
    ) {
        self.insert_at(user_id, epoch, session, platform, fresh_for, Instant::now());
    }

    fn insert_at(
        &self,
        user_id: &str,
        epoch: Epoch,
        session: Uuid,
        platform: Platform,
        fresh_for: Duration,
        now: Instant,
    ) {
        if fresh_for.is_zero() || !self.live.load(Ordering::Acquire) {
            return;
        }
        if self.entries.len() >= self.max_entries && !self.entries.contains_key(user_id) {
            // Full: make room at most once per FULL_SWEEP_SPACING; until then, a new user is
            // simply not cached (each of its requests asks Redis, as without a cache).
            if !self.may_sweep_when_full(now) {
                return;
            }
            self.sweep_at(now);
            if self.entries.len() >= self.max_entries {
                return;
            }
        }
        let entry = Entry {
            session,
            platform,
            fresh_until: now + fresh_for,
        };
        {
            let mut sessions = self.entries.entry(user_id.into()).or_default();
            sessions.retain(|e| e.session != session && now < e.fresh_until);
            if sessions.len() >= SESSIONS_PER_USER {
                sessions.remove(0);
            }
            sessions.push(entry);
        }
        // Re-check after inserting: an invalidation handled in between bumped the epoch and
        // may have removed nothing (the entry was not there yet).
        if self.slot(user_id.as_bytes()).load(Ordering::Acquire) != epoch.0 {
            self.entries.remove(user_id);
        }
    }

    /// The user's key changed in Redis: every session of theirs is asked about again.
    pub fn invalidate(&self, user_id: &[u8]) {
        self.slot(user_id).fetch_add(1, Ordering::AcqRel);
        if let Ok(user_id) = std::str::from_utf8(user_id) {
            self.entries.remove(user_id);
        }
    }

    /// Forget everything (tracking lost, or Redis flushed).
    pub fn flush(&self) {
        for slot in self.epochs.iter() {
            slot.fetch_add(1, Ordering::AcqRel);
        }
        self.entries.clear();
    }

    /// Marks whether invalidations are being delivered. Going down flushes.
    pub fn set_live(&self, live: bool) {
        if !live {
            self.live.store(false, Ordering::Release);
            self.flush();
        } else {
            self.flush();
            self.live.store(true, Ordering::Release);
        }
    }

    /// Live, and a ping answered recently enough for the cache to answer now.
    pub fn is_trustworthy(&self) -> bool {
        self.trustworthy(Instant::now())
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Claims the full cache's next sweep, if one is due at `now`.
    fn may_sweep_when_full(&self, now: Instant) -> bool {
        let now = self.nanos(now);
        let last = self.full_sweep_nanos.load(Ordering::Acquire);
        let spacing = FULL_SWEEP_SPACING.as_nanos() as u64;
        // `last == 0`: none yet. One caller wins the claim; the others go on uncached.
        (last == 0 || now.saturating_sub(last) >= spacing)
            && self
                .full_sweep_nanos
                .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Drops entries that are no longer fresh.
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        self.entries.retain(|_, sessions| {
            sessions.retain(|e| now < e.fresh_until);
            !sessions.is_empty()
        });
    }

    /// Users with a cached session.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Uuid = Uuid::from_u128(1);
    const B: Uuid = Uuid::from_u128(2);
    const MINUTE: Duration = Duration::from_secs(60);

    /// A live cache of at most `max` users, a ping answered at the returned instant. The tests
    /// pass that instant (or one after it) as the clock, so none depends on how fast it runs.
    fn live_cache_of(max: usize) -> (SessionCache, Instant) {
        let c = SessionCache::new(max);
        c.set_live(true);
        let now = Instant::now();
        c.confirm(now);
        (c, now)
    }

    fn live_cache() -> (SessionCache, Instant) {
        live_cache_of(10)
    }

    fn fill_at(c: &SessionCache, key: &str, session: Uuid, fresh: Duration, now: Instant) {
        let e = c.epoch(key);
        c.insert_at(key, e, session, Platform::Web, fresh, now);
    }

    fn fill(c: &SessionCache, key: &str, session: Uuid, platform: Platform, now: Instant) {
        let e = c.epoch(key);
        c.insert_at(key, e, session, platform, MINUTE, now);
    }

    #[test]
    fn a_confirmed_session_is_served_until_it_goes_stale() {
        let (c, t) = live_cache();
        fill(&c, "k", A, Platform::Ios, t);
        assert_eq!(c.get_at("k", A, t), Some(Platform::Ios));
        assert_eq!(
            c.get_at("k", B, t),
            None,
            "another session of the same user"
        );
        assert_eq!(
            c.get_at("other", A, t),
            None,
            "the same id under another user"
        );
        let fresh = Duration::from_millis(10);
        fill_at(&c, "old", A, fresh, t);
        assert_eq!(c.get_at("old", A, t + fresh / 2), Some(Platform::Web));
        assert_eq!(c.get_at("old", A, t + fresh), None);
    }

    #[test]
    fn an_invalidation_removes_every_session_under_the_key() {
        let (c, t) = live_cache();
        fill(&c, "k", A, Platform::Web, t);
        fill(&c, "k", B, Platform::Ios, t);
        fill(&c, "j", A, Platform::Web, t);
        assert_eq!(c.get_at("k", B, t), Some(Platform::Ios));
        c.invalidate(b"k");
        assert_eq!(c.get_at("k", A, t), None);
        assert_eq!(c.get_at("k", B, t), None);
        assert_eq!(
            c.get_at("j", A, t),
            Some(Platform::Web),
            "other users keep theirs"
        );
    }

    #[test]
    fn a_fill_racing_an_invalidation_is_dropped() {
        let (c, t) = live_cache();
        let e = c.epoch("k");
        c.invalidate(b"k"); // arrives while the lookup is in flight
        c.insert_at("k", e, A, Platform::Web, MINUTE, t);
        assert_eq!(c.get_at("k", A, t), None);
    }

    #[test]
    fn nothing_is_served_or_kept_while_tracking_is_down() {
        let (c, t) = live_cache();
        fill(&c, "k", A, Platform::Web, t);
        c.set_live(false);
        assert_eq!(c.get_at("k", A, t), None);
        assert!(c.is_empty());
        fill(&c, "k", A, Platform::Web, t);
        assert!(c.is_empty());
    }

    #[test]
    fn without_a_recent_answered_ping_nothing_is_served() {
        let (c, t) = live_cache();
        fill(&c, "k", A, Platform::Web, t);
        assert_eq!(c.get_at("k", A, t + MAX_STALENESS), Some(Platform::Web));
        let later = t + MAX_STALENESS + Duration::from_millis(1);
        assert_eq!(
            c.get_at("k", A, later),
            None,
            "invalidations may have stopped flowing"
        );
        c.confirm(later);
        assert_eq!(c.get_at("k", A, later), Some(Platform::Web));
    }

    #[test]
    fn the_cache_stays_within_its_bounds() {
        let (c, t) = live_cache();
        for i in 0..100 {
            fill(&c, &format!("k{i}"), A, Platform::Web, t);
        }
        assert_eq!(c.len(), 10, "users");
        for i in 0..20 {
            fill(&c, "k0", Uuid::from_u128(i), Platform::Web, t);
        }
        let kept = (0..20)
            .filter(|i| c.get_at("k0", Uuid::from_u128(*i), t).is_some())
            .count();
        assert_eq!(kept, SESSIONS_PER_USER, "sessions of one user");
        assert!(
            c.get_at("k0", Uuid::from_u128(19), t).is_some(),
            "the newest stays"
        );
    }

    #[test]
    fn a_full_cache_makes_room_at_most_once_per_spacing() {
        let (c, t) = live_cache_of(2);
        let short = Duration::from_millis(1);
        fill_at(&c, "stale1", A, short, t);
        fill_at(&c, "stale2", A, short, t);
        // Full, both entries stale: the first new user sweeps them out and is cached.
        let t1 = t + short;
        fill_at(&c, "new1", A, short, t1);
        assert_eq!(c.len(), 1, "swept");
        fill_at(&c, "new2", A, MINUTE, t1);
        assert_eq!(c.len(), 2);
        // Full again, new1 gone stale, but the last sweep was just now: a new user is not
        // cached, and the stale entry stays until the next sweep is due.
        let t2 = t1 + short;
        fill_at(&c, "new3", A, MINUTE, t2);
        assert_eq!(c.get_at("new3", A, t2), None);
        assert_eq!(c.len(), 2);
        // Once the spacing has passed, the next new user makes room again.
        let t3 = t1 + FULL_SWEEP_SPACING;
        c.confirm(t3);
        fill_at(&c, "new3", A, MINUTE, t3);
        assert_eq!(c.get_at("new3", A, t3), Some(Platform::Web));
        assert_eq!(c.get_at("new2", A, t3), Some(Platform::Web), "fresh stays");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn a_session_confirmed_again_is_kept_once() {
        let (c, t) = live_cache();
        fill(&c, "k", A, Platform::Web, t);
        fill(&c, "k", A, Platform::Android, t);
        assert_eq!(c.get_at("k", A, t), Some(Platform::Android));
        assert_eq!(c.entries.get("k").map(|s| s.len()), Some(1));
    }
}
