//! Per-caller rate limits, decided after the token is verified (CPU only) and before anything
//! touches Redis or the upstream. A caller with a valid token is counted by user id, any other
//! caller by client IP (an IPv6 one by its /64), so that a flood of bad or missing tokens is
//! limited too while players behind one carrier NAT keep their own quotas.
//!
//! Quotas are GCRA (governor): `burst` at once, refilling at `requests` per `per`. Which quota:
//! the session API uses `rate_limit.sessions_api`; a proxied route its own `rate_limit`, else
//! `rate_limit.proxy` (a path whose readings reach several routes, those of each: see
//! [`crate::routes::Routes`]); requests without a valid token also `rate_limit.anonymous`.
//! Responses on a limited route carry `RateLimit-Limit`, `RateLimit-Remaining` and
//! `RateLimit-Reset`; a refusal is 429 `RATE_LIMITED` with `Retry-After`. Limits are per
//! process.
//!
//! Each limiter tracks at most `rate_limit.max_tracked_callers` callers, so that a flood from
//! many addresses cannot grow its table without bound between two `gc_interval` evictions: a
//! caller it does not track yet, arriving while it is full, is refused (429, `Retry-After: 1`)
//! and has the eviction task make room by evicting idle callers (asked at most once a second).

use std::future::Ready;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use foldhash::quality::RandomState;
use futures_util::future::Either;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::RateLimiter;
use http::{HeaderName, HeaderValue, Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use smallvec::SmallVec;
use tokio::sync::Notify;
use tower::{Layer, Service};

use crate::config::{Quota, RateLimitConfig, RouteConfig, RouteLimit, DEFAULT_MAX_TRACKED_CALLERS};
use crate::error::Rejection;
use crate::facts::RequestFacts;
use crate::metrics::LimiterLabels;
use crate::on_response::OnResponse;
use crate::peer::canonical;
use crate::routes::RouteClass;
use crate::Body;

/// Who a request is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CallerKey {
    User(Arc<str>),
    /// An anonymous caller's address as [`CallerKey::ip`] keys it.
    Ip(IpAddr),
}

impl CallerKey {
    /// An anonymous caller: an IPv4 address on its own, an IPv6 address by its first
    /// `ipv6_prefix` bits (`rate_limit.ipv6_prefix`; 64 by default, the smallest block a
    /// subscriber is given), so that rotating through the block neither escapes the limit nor
    /// grows the key map. An IPv6 address that carries an IPv4 one (NAT64, Teredo, 6to4) counts
    /// as that IPv4 address: their /64s hold many unrelated callers, or a whole site's worth of
    /// /64s, so keying them by prefix would let one caller spend the quota of everyone behind
    /// the same translator, or a 6to4 site escape the limit.
    pub fn ip(ip: IpAddr, ipv6_prefix: u8) -> Self {
        CallerKey::Ip(match canonical(ip) {
            IpAddr::V6(v6) => match embedded_ipv4(v6) {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let keep = u32::from(ipv6_prefix.min(128));
                    let mask = u128::MAX.checked_shl(128 - keep).unwrap_or(0);
                    IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
                }
            },
            v4 => v4,
        })
    }
}

/// The IPv4 address an IPv6 one stands for, where its prefix says where to find it.
fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let low32 = (u32::from(s[6]) << 16) | u32::from(s[7]);
    match s {
        // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052): the IPv4 address is the last 32 bits.
        [0x64, 0xff9b, 0, 0, 0, 0, ..] => Some(Ipv4Addr::from(low32)),
        // Teredo 2001::/32 (RFC 4380): the client's public address, inverted, in the last 32 bits.
        [0x2001, 0, ..] => Some(Ipv4Addr::from(!low32)),
        // 6to4 2002::/16 (RFC 3056): the site's address in bits 16..48.
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        _ => None,
    }
}

/// What one limiter said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The quota's burst size.
    pub limit: u32,
    pub remaining: u32,
    /// Whole seconds until the quota is full again (allowed) or until a retry can pass (refused).
    pub reset_secs: u64,
}

fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs();
    if d.subsec_nanos() > 0 {
        secs + 1
    } else {
        secs
    }
}

/// A limiter's callers: governor's DashMap store, shared with the [`Limiter`] so that it can see
/// whether a caller is tracked, and keeping a count of its keys, since `DashMap::len` locks
/// every shard in turn and the count is read on every request.
#[derive(Clone)]
struct Table(Arc<TableInner>);

struct TableInner {
    map: DashMapStateStore<CallerKey, RandomState>,
    /// Keys in `map`. Exact but for inserts that race a recount after an eviction, which may go
    /// uncounted until the next one: never more than the keys there are.
    len: AtomicUsize,
}

/// An eviction holds each shard's write lock while it walks that shard, and a request whose
/// caller hashes there waits for it (on a worker thread that serves other connections too).
/// Many small shards keep each wait short: about 8,000 keys per shard at a million.
const TABLE_SHARDS: usize = 128;

impl Table {
    fn new() -> Self {
        Table(Arc::new(TableInner {
            map: DashMapStateStore::with_hasher_and_shard_amount(
                RandomState::default(),
                TABLE_SHARDS,
            ),
            len: AtomicUsize::new(0),
        }))
    }

    fn approximate_len(&self) -> usize {
        self.0.len.load(Ordering::Relaxed)
    }

    fn contains(&self, key: &CallerKey) -> bool {
        self.0.map.contains_key(key)
    }
}

impl StateStore for Table {
    type Key = CallerKey;

    /// What governor's own DashMap store does, counting the keys it adds.
    fn measure_and_replace<T, F, E>(&self, key: &CallerKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.0.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let state = match self.0.map.entry(key.clone()) {
            Entry::Occupied(entry) => entry.into_ref(),
            Entry::Vacant(entry) => {
                self.0.len.fetch_add(1, Ordering::Relaxed);
                entry.insert(InMemoryState::default())
            }
        };
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl ShrinkableKeyedStateStore<CallerKey> for Table {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&self.0.map, drop_below);
        self.0.len.store(self.0.map.len(), Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.0.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.map.len()
    }

    fn is_empty(&self) -> bool {
        self.0.map.is_empty()
    }
}

/// A full limiter asks for room at most this often: a flood of new callers must not keep the
/// eviction task walking the table.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A full limiter says so in the log at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Takes the turn recorded in `last` (nanoseconds since the limiter started, plus one; 0 for
/// never) if `every` has passed since the last one. Of callers racing for a turn, one wins.
fn take_turn(last: &AtomicU64, now: Nanos, every: Duration) -> bool {
    let now = now.as_u64().saturating_add(1);
    let prev = last.load(Ordering::Relaxed);
    let every = u64::try_from(every.as_nanos()).unwrap_or(u64::MAX);
    if prev != 0 && now.saturating_sub(prev) < every {
        return false;
    }
    last.compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

/// One keyed GCRA limiter, tracking at most `max_tracked` callers.
pub struct Limiter<C: Clock = DefaultClock> {
    inner: RateLimiter<CallerKey, Table, C, StateInformationMiddleware>,
    table: Table,
    limit: u32,
    per_request: Duration,
    max_tracked: usize,
    /// Which limiter this is, for the log.
    class: &'static str,
    /// For a route's own quota, the route's path prefix, for the log.
    route: Option<Box<str>>,
    /// New callers refused because the table was full.
    refused: Counter,
    start: C::Instant,
    /// The last time room was asked for, and the last warning (see [`take_turn`]).
    last_sweep: AtomicU64,
    last_warning: AtomicU64,
    /// Wakes the eviction task when the table is full.
    sweeper: Arc<Notify>,
}

impl Limiter<DefaultClock> {
    /// A limiter with the default bound, `rate_limit.max_tracked_callers`' default.
    pub fn new(quota: Quota) -> Self {
        Limiter::with_clock(quota, DefaultClock::default())
    }
}

impl<C: Clock> Limiter<C> {
    pub fn with_clock(quota: Quota, clock: C) -> Self {
        let per_request = quota.per / quota.requests.get();
        let gov = governor::Quota::with_period(per_request)
            .unwrap_or_else(|| governor::Quota::per_second(quota.requests))
            .allow_burst(quota.burst);
        let table = Table::new();
        let start = clock.now();
        Limiter {
            inner: RateLimiter::new(gov, table.clone(), clock),
            table,
            limit: quota.burst.get(),
            per_request,
            max_tracked: DEFAULT_MAX_TRACKED_CALLERS,
            class: "",
            route: None,
            refused: Counter::default(),
            start,
            last_sweep: AtomicU64::new(0),
            last_warning: AtomicU64::new(0),
            sweeper: Arc::new(Notify::new()),
        }
    }

    /// Tracks at most `max_tracked` callers (at least one); new callers refused for want of room
    /// are counted in `refused` and logged as limiter `class`, and wake `sweeper` to make room.
    pub fn bounded(
        self,
        max_tracked: usize,
        class: &'static str,
        refused: Counter,
        sweeper: Arc<Notify>,
    ) -> Self {
        Limiter {
            max_tracked: max_tracked.max(1),
            class,
            refused,
            sweeper,
            ..self
        }
    }

    pub fn check(&self, key: &CallerKey) -> Decision {
        // Below the cap this costs one atomic load; at the cap, one lookup more. Looking and
        // adding are not one step: new callers racing for the last free place may all be added,
        // so the table can exceed `max_tracked` by about as many keys as threads are adding one
        // at that moment, and no more, since every later new caller finds it full.
        if self.is_full() && !self.table.contains(key) {
            return self.refuse_for_want_of_room();
        }
        match self.inner.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity().min(self.limit);
                let missing = self.limit - remaining;
                Decision {
                    allowed: true,
                    limit: self.limit,
                    remaining,
                    reset_secs: ceil_secs(self.per_request * missing),
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.inner.clock().now());
                Decision {
                    allowed: false,
                    limit: self.limit,
                    remaining: 0,
                    reset_secs: ceil_secs(wait).max(1),
                }
            }
        }
    }

    /// Forgets callers whose quota has fully refilled, and returns the memory.
    pub fn evict_idle(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }

    fn elapsed(&self) -> Nanos {
        self.inner.clock().now().duration_since(self.start)
    }

    fn is_full(&self) -> bool {
        self.table.approximate_len() >= self.max_tracked
    }

    /// When the table is full, evicts its idle callers. The memory is kept: the table is likely
    /// to fill again. Walks the table, so the eviction task does it, never a request.
    pub fn make_room(&self) {
        if self.is_full() {
            self.inner.retain_recent();
        }
    }

    fn refuse_for_want_of_room(&self) -> Decision {
        self.refused.inc();
        let now = self.elapsed();
        if take_turn(&self.last_sweep, now, SWEEP_EVERY) {
            self.sweeper.notify_one();
        }
        if take_turn(&self.last_warning, now, WARN_EVERY) {
            tracing::warn!(
                limiter = self.class,
                route = self.route.as_deref(),
                max_tracked_callers = self.max_tracked,
                refused_so_far = self.refused.get(),
                "rate limiter full: callers it does not track yet are refused until tracked ones go idle (rate_limit.max_tracked_callers)"
            );
        }
        Decision {
            allowed: false,
            limit: self.limit,
            remaining: 0,
            // Room is being made, or asked for again within a second.
            reset_secs: 1,
        }
    }

    pub fn tracked_keys(&self) -> usize {
        self.inner.len()
    }
}

enum RouteLimiter {
    Inherit,
    Off,
    Own(Box<RouteQuota>),
}

/// A route's own quota, kept in two tables: a flood of new addresses can fill the one for
/// addresses, never the one for users.
struct RouteQuota {
    users: Limiter,
    addresses: Limiter,
}

/// Every limiter of the process.
pub struct RateLimits {
    proxy: Option<Limiter>,
    sessions_api: Option<Limiter>,
    anonymous: Option<Limiter>,
    /// Indexed like `config.routes`.
    routes: Vec<RouteLimiter>,
    gc_interval: Duration,
    /// How much of an anonymous IPv6 caller's address is its key.
    ipv6_prefix: u8,
    /// Woken by a full limiter: the eviction task then makes room.
    sweeper: Arc<Notify>,
}

impl RateLimits {
    /// `table_full` counts, per limiter, the new callers refused because it was full.
    pub fn new(
        config: &RateLimitConfig,
        routes: &[RouteConfig],
        table_full: &Family<LimiterLabels, Counter>,
    ) -> Self {
        let sweeper = Arc::new(Notify::new());
        let limiter = |class: &'static str, quota: Quota| {
            let refused = table_full.get_or_create(&LimiterLabels { class }).clone();
            Limiter::new(quota).bounded(config.max_tracked_callers, class, refused, sweeper.clone())
        };
        RateLimits {
            proxy: config.proxy.map(|q| limiter("proxy", q)),
            sessions_api: config.sessions_api.map(|q| limiter("sessions_api", q)),
            anonymous: config.anonymous.map(|q| limiter("anonymous", q)),
            routes: routes
                .iter()
                .map(|r| match r.rate_limit {
                    RouteLimit::Inherit => RouteLimiter::Inherit,
                    RouteLimit::Off => RouteLimiter::Off,
                    RouteLimit::Own(quota) => {
                        let own = |class| Limiter {
                            route: Some(r.path_prefix.as_str().into()),
                            ..limiter(class, quota)
                        };
                        RouteLimiter::Own(Box::new(RouteQuota {
                            users: own("route"),
                            addresses: own("route_anonymous"),
                        }))
                    }
                })
                .collect(),
            gc_interval: config.gc_interval,
            ipv6_prefix: config.ipv6_prefix,
            sweeper,
        }
    }

    fn all(&self) -> impl Iterator<Item = &Limiter> {
        [&self.proxy, &self.sessions_api, &self.anonymous]
            .into_iter()
            .flatten()
            .chain(
                self.routes
                    .iter()
                    .flat_map(|r| match r {
                        RouteLimiter::Own(own) => [Some(&own.users), Some(&own.addresses)],
                        _ => [None, None],
                    })
                    .flatten(),
            )
    }

    /// Keys tracked across all limiters.
    pub fn tracked_keys(&self) -> usize {
        self.all().map(Limiter::tracked_keys).sum()
    }

    pub fn evict_idle(&self) {
        for limiter in self.all() {
            limiter.evict_idle();
        }
    }

    /// Evicts idle keys from full limiters.
    pub fn make_room(&self) {
        for limiter in self.all() {
            limiter.make_room();
        }
    }

    /// Evicts idle keys every `rate_limit.gc_interval`, and from full limiters when one asks for
    /// room, forever. A walk takes milliseconds at a million keys (one shard lock after
    /// another), so it runs on the blocking pool: the runtime's own work (accepting, Redis)
    /// does not wait for it.
    pub async fn run_eviction(self: Arc<Self>) {
        // The tables start empty: the first eviction is one interval away.
        let first = tokio::time::Instant::now() + self.gc_interval;
        let mut tick = tokio::time::interval_at(first, self.gc_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let asked_for_room = tokio::select! {
                _ = tick.tick() => false,
                () = self.sweeper.notified() => true,
            };
            let limits = self.clone();
            let walk = tokio::task::spawn_blocking(move || {
                if asked_for_room {
                    limits.make_room();
                } else {
                    limits.evict_idle();
                }
            });
            if let Err(e) = walk.await {
                tracing::warn!(error = %e, "rate limiter eviction failed");
            }
        }
    }

    /// Checks every limiter that applies, each once; the most restrictive outcome is reported
    /// (of two refusals, the longer wait). `None` when no limit applies to this request.
    pub fn decide(&self, class: RouteClass, key: &CallerKey) -> Option<Decision> {
        let anonymous = matches!(key, CallerKey::Ip(_));
        let mut applied: SmallVec<[&Limiter; 4]> = SmallVec::new();
        match class {
            RouteClass::Api { .. } if !anonymous => {
                apply_once(&mut applied, self.sessions_api.as_ref())
            }
            RouteClass::Api { .. } => {}
            // Refused before the rate limit, by `limits`.
            RouteClass::Invalid(_) => {}
            RouteClass::Proxy { routes, .. } => {
                for route in routes.iter() {
                    let limiter = match route.and_then(|i| self.routes.get(i)) {
                        Some(RouteLimiter::Own(own)) if anonymous => Some(&own.addresses),
                        Some(RouteLimiter::Own(own)) => Some(&own.users),
                        Some(RouteLimiter::Off) => None,
                        Some(RouteLimiter::Inherit) | None if !anonymous => self.proxy.as_ref(),
                        Some(RouteLimiter::Inherit) | None => None,
                    };
                    apply_once(&mut applied, limiter);
                }
            }
        }
        if anonymous {
            apply_once(&mut applied, self.anonymous.as_ref());
        }
        applied
            .into_iter()
            .map(|limiter| limiter.check(key))
            .min_by_key(|d| (d.allowed, d.remaining, std::cmp::Reverse(d.reset_secs)))
    }
}

/// Adds `limiter` to those a request is checked against, unless it is there already: two
/// routes may share one (the proxy quota), and each check takes from it.
fn apply_once<'a>(applied: &mut SmallVec<[&'a Limiter; 4]>, limiter: Option<&'a Limiter>) {
    if let Some(limiter) = limiter {
        if !applied.iter().any(|seen| std::ptr::eq(*seen, limiter)) {
            applied.push(limiter);
        }
    }
}

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

fn set_headers(decision: Decision, response: &mut Response<Body>) {
    let headers = response.headers_mut();
    headers.insert(RATELIMIT_LIMIT.clone(), number(decision.limit.into()));
    headers.insert(
        RATELIMIT_REMAINING.clone(),
        number(decision.remaining.into()),
    );
    headers.insert(RATELIMIT_RESET.clone(), number(decision.reset_secs));
    if !decision.allowed {
        headers.insert(http::header::RETRY_AFTER, number(decision.reset_secs));
    }
}

/// The numbers below this are served from one static string, without allocating: every
/// limited response carries three of them.
const PREWRITTEN: u64 = 10_000;

/// "0123456789101112...9999": each number's digits, one after another.
static DIGITS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use std::fmt::Write;
    let mut all = String::with_capacity(38_890);
    for n in 0..PREWRITTEN {
        let _ = write!(all, "{n}");
    }
    all
});

/// `n` as a header value.
fn number(n: u64) -> HeaderValue {
    if n >= PREWRITTEN {
        return HeaderValue::from(n);
    }
    // Where n's digits start in DIGITS: all the shorter numbers come first.
    let (start, width) = match n {
        0..=9 => (n, 1),
        10..=99 => (10 + (n - 10) * 2, 2),
        100..=999 => (190 + (n - 100) * 3, 3),
        _ => (2890 + (n - 1000) * 4, 4),
    };
    let digits: &'static str = &DIGITS;
    match digits.get(start as usize..(start + width) as usize) {
        Some(text) => HeaderValue::from_maybe_shared(bytes::Bytes::from_static(text.as_bytes()))
            .unwrap_or_else(|_| HeaderValue::from(n)),
        None => HeaderValue::from(n),
    }
}

#[derive(Clone)]
pub struct RateLimitLayer(pub Arc<RateLimits>);

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limits: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limits: Arc<RateLimits>,
}

impl<S> Service<Request<Body>> for RateLimit<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<Body>, S::Error>>, OnResponse<S::Future, Decision>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let facts = RequestFacts::of(&req);
        let key = match (&facts.who, facts.client_ip) {
            (Some(who), _) => Some(CallerKey::User(who.user_id.clone())),
            (None, Some(ip)) => Some(CallerKey::ip(ip, self.limits.ipv6_prefix)),
            (None, None) => None,
        };
        let class = facts.route;
        let decision = match (key, class) {
            (Some(key), Some(class)) => self.limits.decide(class, &key),
            _ => None,
        };
        match decision {
            None => Either::Right(OnResponse::unchanged(self.inner.call(req))),
            Some(decision) if !decision.allowed => {
                let mut response = Rejection::RateLimited.into_response();
                set_headers(decision, &mut response);
                Either::Left(std::future::ready(Ok(response)))
            }
            Some(decision) => {
                Either::Right(OnResponse::new(self.inner.call(req), decision, set_headers))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthMode;
    use crate::routes::Routes;
    use governor::clock::FakeRelativeClock;
    use std::num::NonZeroU32;

    fn quota(requests: u32, per: Duration, burst: u32) -> Quota {
        Quota {
            requests: NonZeroU32::new(requests).unwrap(),
            per,
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    fn user(id: &str) -> CallerKey {
        CallerKey::User(id.into())
    }

    #[test]
    fn numbers_are_written_in_decimal_prewritten_or_not() {
        let large = [999_999, 1_000_000, u64::from(u32::MAX), u64::MAX];
        for n in (0..PREWRITTEN + 20).chain(large) {
            assert_eq!(number(n).to_str().unwrap(), n.to_string(), "{n}");
        }
    }

    #[test]
    fn burst_passes_then_the_next_is_refused_with_the_wait() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(quota(100, Duration::from_secs(900), 100), clock.clone());
        for i in 0..100 {
            let d = limiter.check(&user("a"));
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 99 - i);
        }
        let refused = limiter.check(&user("a"));
        assert!(!refused.allowed);
        assert_eq!(refused.reset_secs, 9, "one request refills every 900s/100");
        assert!(
            limiter.check(&user("b")).allowed,
            "other users are unaffected"
        );
        clock.advance(Duration::from_secs(9));
        assert!(limiter.check(&user("a")).allowed);
    }

    #[test]
    fn the_longest_quotas_the_config_accepts_count_without_overflow() {
        const YEAR: u64 = 31_557_600;
        // 500 years for one request; 30 days a request with a burst of 100 (8 years).
        for (per, burst) in [(500 * YEAR, 1), (30 * 86_400, 100)] {
            let limiter = Limiter::with_clock(
                quota(1, Duration::from_secs(per), burst),
                FakeRelativeClock::default(),
            );
            for _ in 0..burst {
                assert!(limiter.check(&user("a")).allowed);
            }
            let refused = limiter.check(&user("a"));
            assert!(!refused.allowed);
            assert_eq!(refused.reset_secs, per, "{per}");
        }
    }

    #[test]
    fn reset_is_the_time_until_the_quota_is_full_again() {
        let limiter = Limiter::with_clock(
            quota(10, Duration::from_secs(10), 10),
            FakeRelativeClock::default(),
        );
        let first = limiter.check(&user("a"));
        assert_eq!((first.limit, first.remaining, first.reset_secs), (10, 9, 1));
        for _ in 0..4 {
            limiter.check(&user("a"));
        }
        let sixth = limiter.check(&user("a"));
        assert_eq!((sixth.remaining, sixth.reset_secs), (4, 6));
    }

    #[test]
    fn idle_keys_are_evicted_once_their_quota_refilled() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(quota(10, Duration::from_secs(1), 10), clock.clone());
        for i in 0..10_000u32 {
            limiter.check(&CallerKey::ip(IpAddr::from(i.to_be_bytes()), 64));
        }
        assert_eq!(limiter.tracked_keys(), 10_000);
        limiter.evict_idle();
        assert_eq!(limiter.tracked_keys(), 10_000, "still inside their window");
        clock.advance(Duration::from_secs(2));
        limiter.evict_idle();
        assert_eq!(limiter.tracked_keys(), 0);
        assert_eq!(limiter.table.approximate_len(), 0, "the count follows");
    }

    /// Two requests at once, then one every 100 ms; at most two callers.
    fn small_table(
        clock: &FakeRelativeClock,
    ) -> (Limiter<FakeRelativeClock>, Counter, Arc<Notify>) {
        let refused = Counter::default();
        let sweeper = Arc::new(Notify::new());
        let limiter = Limiter::with_clock(quota(2, Duration::from_millis(200), 2), clock.clone())
            .bounded(2, "test", refused.clone(), sweeper.clone());
        (limiter, refused, sweeper)
    }

    /// Whether room was asked for since the last look.
    fn asked_for_room(sweeper: &Notify) -> bool {
        futures_util::FutureExt::now_or_never(sweeper.notified()).is_some()
    }

    #[test]
    fn a_full_table_refuses_new_callers_and_still_serves_tracked_ones() {
        let clock = FakeRelativeClock::default();
        let (limiter, refused, _) = small_table(&clock);
        assert!(limiter.check(&user("a")).allowed);
        assert!(limiter.check(&user("b")).allowed);
        let d = limiter.check(&user("c"));
        assert_eq!(
            d,
            Decision {
                allowed: false,
                limit: 2,
                remaining: 0,
                reset_secs: 1,
            }
        );
        assert_eq!(refused.get(), 1);
        assert_eq!(
            limiter.tracked_keys(),
            2,
            "the refused caller is not tracked"
        );
        let a = limiter.check(&user("a"));
        assert!(a.allowed, "a tracked caller is decided as ever");
        assert_eq!(a.remaining, 0);
        assert!(
            !limiter.check(&user("a")).allowed,
            "and its quota still counts"
        );
        assert_eq!(refused.get(), 1, "that refusal was the quota's");
    }

    #[test]
    fn room_is_asked_for_at_most_once_a_second_and_made_by_evicting_idle_callers() {
        let clock = FakeRelativeClock::default();
        let (limiter, refused, sweeper) = small_table(&clock);
        assert!(limiter.check(&user("a")).allowed);
        assert!(limiter.check(&user("b")).allowed);
        assert!(!asked_for_room(&sweeper), "not while there is room");
        // The first new caller at the cap asks for room; a and b have just been seen, so
        // making it evicts nobody.
        assert!(!limiter.check(&user("c")).allowed);
        assert!(asked_for_room(&sweeper));
        limiter.make_room();
        assert_eq!(limiter.tracked_keys(), 2);
        // 500 ms on, a and b are idle (their quota refilled after 100 ms), but room was asked
        // for less than a second ago: c is refused without asking again.
        clock.advance(Duration::from_millis(500));
        assert!(!limiter.check(&user("c")).allowed);
        assert!(!asked_for_room(&sweeper));
        // A second after the first ask, c asks again, and making room evicts a and b.
        clock.advance(Duration::from_millis(500));
        assert!(!limiter.check(&user("c")).allowed);
        assert!(asked_for_room(&sweeper));
        limiter.make_room();
        assert_eq!(limiter.tracked_keys(), 0);
        let c = limiter.check(&user("c"));
        assert!(c.allowed);
        assert_eq!(c.remaining, 1, "a new caller's full quota");
        assert_eq!(limiter.tracked_keys(), 1);
        assert_eq!(refused.get(), 3);
        // The next new caller finds room without a sweep.
        assert!(limiter.check(&user("d")).allowed);
        assert_eq!(limiter.tracked_keys(), 2);
    }

    #[test]
    fn turns_are_taken_at_most_once_per_interval() {
        let last = AtomicU64::new(0);
        let second = Duration::from_secs(1);
        let at = |ms: u64| Nanos::from(Duration::from_millis(ms));
        assert!(take_turn(&last, at(0), second), "the first");
        assert!(!take_turn(&last, at(0), second));
        assert!(!take_turn(&last, at(999), second));
        assert!(take_turn(&last, at(1000), second));
        assert!(!take_turn(&last, at(1500), second));
        assert!(take_turn(&last, at(5000), second));
    }

    #[test]
    fn max_tracked_callers_bounds_every_limiter_and_refusals_are_counted_per_limiter() {
        let table_full = Family::<LimiterLabels, Counter>::default();
        let l = RateLimits::new(
            &RateLimitConfig {
                proxy: Some(quota(10, Duration::from_secs(60), 10)),
                sessions_api: None,
                anonymous: Some(quota(10, Duration::from_secs(60), 10)),
                gc_interval: Duration::from_secs(60),
                ipv6_prefix: 64,
                max_tracked_callers: 1,
            },
            &[],
            &table_full,
        );
        let game = RouteClass::Proxy {
            auth: AuthMode::Session,
            routes: Routes::one(None),
        };
        let ip = |ip: &str| CallerKey::ip(ip.parse().unwrap(), 64);
        assert!(l.decide(game, &ip("192.0.2.1")).unwrap().allowed);
        assert!(!l.decide(game, &ip("192.0.2.2")).unwrap().allowed);
        assert!(l.decide(game, &user("u")).unwrap().allowed);
        assert!(!l.decide(game, &user("v")).unwrap().allowed);
        let count = |class| table_full.get_or_create(&LimiterLabels { class }).get();
        assert_eq!((count("anonymous"), count("proxy")), (1, 1));
    }

    /// A config with no process-wide quota, tracking at most `max_tracked_callers` callers.
    fn without_quotas(max_tracked_callers: usize) -> RateLimitConfig {
        RateLimitConfig {
            proxy: None,
            sessions_api: None,
            anonymous: None,
            gc_interval: Duration::from_secs(60),
            ipv6_prefix: 64,
            max_tracked_callers,
        }
    }

    #[test]
    fn an_address_flood_on_a_routes_own_quota_leaves_room_for_users() {
        let table_full = Family::<LimiterLabels, Counter>::default();
        let l = RateLimits::new(
            &without_quotas(2),
            &[RouteConfig {
                path_prefix: "/login".into(),
                auth: AuthMode::None,
                rate_limit: RouteLimit::Own(quota(10, Duration::from_secs(60), 10)),
            }],
            &table_full,
        );
        let login = RouteClass::Proxy {
            auth: AuthMode::None,
            routes: Routes::one(Some(0)),
        };
        for i in 1..=3 {
            let ip = CallerKey::ip(format!("192.0.2.{i}").parse().unwrap(), 64);
            let allowed = l.decide(login, &ip).unwrap().allowed;
            assert_eq!(allowed, i <= 2, "address {i}");
        }
        assert!(l.decide(login, &user("u")).unwrap().allowed);
        assert!(l.decide(login, &user("v")).unwrap().allowed);
        let count = |class| table_full.get_or_create(&LimiterLabels { class }).get();
        assert_eq!((count("route_anonymous"), count("route")), (1, 0));
        assert_eq!(l.tracked_keys(), 4);
    }

    #[tokio::test]
    async fn the_eviction_task_makes_room_when_a_full_limiter_asks() {
        let l = Arc::new(RateLimits::new(
            &RateLimitConfig {
                proxy: None,
                sessions_api: None,
                anonymous: Some(quota(1, Duration::from_millis(20), 1)),
                // No periodic eviction during the test: only asking for room can evict.
                gc_interval: Duration::from_secs(3600),
                ipv6_prefix: 64,
                max_tracked_callers: 1,
            },
            &[],
            &Family::default(),
        ));
        let game = RouteClass::Proxy {
            auth: AuthMode::Session,
            routes: Routes::one(None),
        };
        let ip = |ip: &str| CallerKey::ip(ip.parse().unwrap(), 64);
        assert!(l.decide(game, &ip("192.0.2.1")).unwrap().allowed);
        let eviction = tokio::spawn(l.clone().run_eviction());
        // 192.0.2.1 goes idle 20 ms after its request; room is asked for on the first refusal
        // and again a second later, when it can be made.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !l.decide(game, &ip("192.0.2.2")).unwrap().allowed {
            assert!(std::time::Instant::now() < deadline, "no room was made");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(l.tracked_keys(), 1, "192.0.2.1 was evicted to make room");
        eviction.abort();
    }

    #[test]
    fn the_applicable_quota_depends_on_route_and_caller() {
        let l = limits();
        let api = RouteClass::Api { public: false };
        let game = RouteClass::Proxy {
            auth: AuthMode::Session,
            routes: Routes::one(None),
        };
        let login = RouteClass::Proxy {
            auth: AuthMode::None,
            routes: Routes::one(Some(0)),
        };
        let ip = CallerKey::ip("192.0.2.1".parse().unwrap(), 64);
        assert_eq!(l.decide(api, &user("u")).unwrap().limit, 2);
        assert_eq!(l.decide(game, &user("u")).unwrap().limit, 1000);
        assert_eq!(l.decide(login, &user("u")).unwrap().limit, 1);
        // Anonymous: the anonymous quota, and a route's own one when it has it.
        assert_eq!(l.decide(game, &ip).unwrap().limit, 3);
        let d = l.decide(login, &ip).unwrap();
        assert_eq!((d.limit, d.allowed), (1, true));
        assert!(!l.decide(login, &ip).unwrap().allowed);
        // A route with requests = 0 has no per-caller quota, not even the proxy one.
        let unlimited = RouteClass::Proxy {
            auth: AuthMode::Session,
            routes: Routes::one(Some(1)),
        };
        assert!(l.decide(unlimited, &user("u")).is_none());
        assert_eq!(
            l.decide(unlimited, &ip).unwrap().limit,
            3,
            "anonymous still applies"
        );
    }

    #[test]
    fn of_two_refusals_the_longer_wait_is_reported() {
        let l = RateLimits::new(
            &RateLimitConfig {
                proxy: None,
                sessions_api: None,
                anonymous: Some(quota(1, Duration::from_secs(60), 1)),
                gc_interval: Duration::from_secs(60),
                ipv6_prefix: 64,
                max_tracked_callers: DEFAULT_MAX_TRACKED_CALLERS,
            },
            &[RouteConfig {
                path_prefix: "/login".into(),
                auth: AuthMode::None,
                rate_limit: RouteLimit::Own(quota(1, Duration::from_secs(1), 1)),
            }],
            &Family::default(),
        );
        let login = RouteClass::Proxy {
            auth: AuthMode::None,
            routes: Routes::one(Some(0)),
        };
        let ip = CallerKey::ip("192.0.2.1".parse().unwrap(), 64);
        assert!(l.decide(login, &ip).unwrap().allowed);
        // The route's quota is back in a second, the anonymous one in a minute.
        let d = l.decide(login, &ip).unwrap();
        assert!(!d.allowed);
        assert!(d.reset_secs > 1, "{d:?}");
    }

    fn limits() -> RateLimits {
        RateLimits::new(
            &RateLimitConfig {
                proxy: Some(quota(1000, Duration::from_secs(1), 1000)),
                sessions_api: Some(quota(2, Duration::from_secs(60), 2)),
                anonymous: Some(quota(3, Duration::from_secs(60), 3)),
                gc_interval: Duration::from_secs(60),
                ipv6_prefix: 64,
                max_tracked_callers: DEFAULT_MAX_TRACKED_CALLERS,
            },
            &[
                RouteConfig {
                    path_prefix: "/login".into(),
                    auth: AuthMode::None,
                    rate_limit: RouteLimit::Own(quota(1, Duration::from_secs(60), 1)),
                },
                RouteConfig {
                    path_prefix: "/unlimited".into(),
                    auth: AuthMode::Session,
                    rate_limit: RouteLimit::Off,
                },
            ],
            &Family::default(),
        )
    }

    #[test]
    fn ipv6_callers_share_a_quota_per_64_and_ipv4_callers_have_one_each() {
        let l = limits();
        let game = RouteClass::Proxy {
            auth: AuthMode::Session,
            routes: Routes::one(None),
        };
        let decide = |ip: &str| {
            l.decide(game, &CallerKey::ip(ip.parse().unwrap(), 64))
                .unwrap()
        };
        // The anonymous quota is 3, spent across one /64.
        assert_eq!(decide("2001:db8:1:2::1").remaining, 2);
        assert_eq!(decide("2001:db8:1:2::2").remaining, 1);
        assert_eq!(decide("2001:db8:1:2:ffff:ffff:ffff:ffff").remaining, 0);
        assert!(!decide("2001:db8:1:2:abcd::9").allowed);
        assert_eq!(decide("2001:db8:1:3::1").remaining, 2, "the next /64");
        assert_eq!(decide("2001:db8:1:3::2").remaining, 1);

        assert_eq!(decide("192.0.2.1").remaining, 2);
        assert_eq!(decide("192.0.2.2").remaining, 2, "IPv4 is per address");
        assert_eq!(
            decide("::ffff:192.0.2.1").remaining,
            1,
            "a mapped IPv4 address is that address, not the ::/64"
        );
    }

    #[test]
    fn ipv6_addresses_that_carry_an_ipv4_one_count_as_that_address() {
        let key = |ip: &str| CallerKey::ip(ip.parse().unwrap(), 64);
        let v4 = |ip: &str| CallerKey::Ip(ip.parse().unwrap());
        // NAT64: two IPv4 callers behind one translator, in the same /64, are two callers.
        assert_eq!(key("64:ff9b::c000:201"), v4("192.0.2.1"));
        assert_eq!(key("64:ff9b::c000:202"), v4("192.0.2.2"));
        // Teredo: server 65.54.227.120, client 192.0.2.45 (inverted: 3fff:fdd2).
        assert_eq!(
            key("2001:0:4136:e378:8000:63bf:3fff:fdd2"),
            v4("192.0.2.45")
        );
        // 6to4: every /64 of the site 192.0.2.4 is one caller.
        assert_eq!(key("2002:c000:204:1::1"), v4("192.0.2.4"));
        assert_eq!(key("2002:c000:204:ffff::1"), v4("192.0.2.4"));
        // Near misses stay /64s.
        assert_eq!(key("64:ff9b:1::c000:201"), v4("64:ff9b:1::"));
        assert_eq!(key("2001:db8::1"), v4("2001:db8::"));
    }

    #[test]
    fn ipv6_callers_are_keyed_by_the_configured_prefix() {
        let key = |ip: &str, prefix| CallerKey::ip(ip.parse().unwrap(), prefix);
        let net = |ip: &str| CallerKey::Ip(ip.parse().unwrap());
        assert_eq!(key("2001:db8:1:2ff:1::1", 56), net("2001:db8:1:200::"));
        assert_eq!(key("2001:db8:1:2ff:1::1", 48), net("2001:db8:1::"));
        assert_eq!(key("2001:db8:1:2ff:1::1", 128), net("2001:db8:1:2ff:1::1"));
        assert_eq!(key("2001:db8:1:2ff:1::1", 64), net("2001:db8:1:2ff::"));
        // IPv4 is always per address, whatever the prefix.
        assert_eq!(key("192.0.2.7", 48), net("192.0.2.7"));
    }

    #[test]
    fn no_section_means_no_limit() {
        let l = RateLimits::new(
            &without_quotas(DEFAULT_MAX_TRACKED_CALLERS),
            &[],
            &Family::default(),
        );
        let game = RouteClass::Proxy {
            auth: AuthMode::Session,
            routes: Routes::one(None),
        };
        assert!(l.decide(game, &user("u")).is_none());
        assert!(l
            .decide(game, &CallerKey::ip("192.0.2.1".parse().unwrap(), 64))
            .is_none());
    }
}
