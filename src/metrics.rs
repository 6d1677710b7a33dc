//! Prometheus metrics, served at `GET /metrics` on the admin listener (OpenMetrics text).
//!
//! Counters and histograms are updated where things happen (access log, Redis door, session
//! API); gauges that mirror live state (connections, tunnels, rate-limit keys) are read when
//! scraped; `portcullis_sessions_active` is refreshed by a background SCAN every
//! `metrics.active_sessions_interval`, so its cost grows with the number of sessions, never
//! with the number of requests.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::error::Rejection;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `api`, `session`, `jwt`, `none` or `invalid`.
    pub route_class: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub route_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    /// `token`, `session`, `rate_limit`, `redis_unavailable`, `upstream`, `request`.
    pub reason: &'static str,
    /// The stable error code.
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimiterLabels {
    /// `proxy`, `sessions_api`, `anonymous`, `route` (the routes' own quotas, for users) or
    /// `route_anonymous` (the same, for addresses).
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisErrorLabels {
    pub op: &'static str,
    /// `unavailable`, `timeout`, `not_writable` or `error`.
    pub kind: &'static str,
}

/// Every metric portcullis exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<ClassLabels, Histogram>,
    pub upstream_duration: Histogram,
    pub rejections: Family<RejectionLabels, Counter>,
    pub redis_duration: Family<RedisLabels, Histogram>,
    pub redis_errors: Family<RedisErrorLabels, Counter>,
    pub sessions_created: Counter,
    pub sessions_extended: Counter,
    pub sessions_destroyed: Counter,
    pub sessions_evicted: Counter,
    pub sessions_active: Gauge,
    pub open_connections: Gauge,
    pub resting_connections: Gauge,
    pub open_tunnels: Gauge,
    pub tunnels_session_ended: Counter,
    pub tokens_verified_with_previous_key: Counter,
    /// What the upstream pools count, shared by every worker's pool.
    pub upstream_pool: crate::forward::PoolCounters,
    pub rate_limit_keys: Gauge,
    pub rate_limit_table_full: Family<LimiterLabels, Counter>,
    pub certificate_reloads: Family<ReloadLabels, Counter>,
    pub session_cache_lookups: Family<CacheLabels, Counter>,
    pub session_cache_entries: Gauge,
    /// The series nearly every request updates, kept once first used: a `Family` lookup hashes
    /// its labels and takes a lock every time. A series still appears only once it is counted.
    hot: HotSeries,
}

/// Route classes (see `access_log`), and the results of a session cache lookup.
const ROUTE_CLASSES: [&str; 5] = ["api", "session", "jwt", "none", "unknown"];
const CACHE_RESULTS: [&str; 4] = ["hit", "miss", "stale", "off"];

#[derive(Default)]
struct HotSeries {
    ok_by_class: [OnceLock<Counter>; ROUTE_CLASSES.len()],
    duration_by_class: [OnceLock<Histogram>; ROUTE_CLASSES.len()],
    cache_lookups: [OnceLock<Counter>; CACHE_RESULTS.len()],
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `hit` (admitted from memory), `miss` (checked in Redis: not cached, or older than the
    /// slide interval), `stale` (checked in Redis: the heartbeat is late), or `off` (the
    /// tracking connection is down: checked in Redis).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~26 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

fn redis_histogram() -> Histogram {
    // 50 µs .. ~0.4 s.
    Histogram::new(exponential_buckets(0.00005, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("portcullis");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route class and status code",
            requests.clone(),
        );
        let request_duration =
            Family::<ClassLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register_with_unit(
            "request_duration",
            "Time from request head to response head, by route class",
            Unit::Seconds,
            request_duration.clone(),
        );
        let upstream_duration = latency_histogram();
        registry.register_with_unit(
            "upstream_duration",
            "Time the upstream took to produce its response head",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        let rejections = Family::<RejectionLabels, Counter>::default();
        registry.register(
            "rejections",
            "Requests portcullis answered itself instead of forwarding, by reason and code",
            rejections.clone(),
        );
        let redis_duration =
            Family::<RedisLabels, Histogram>::new_with_constructor(redis_histogram as fn() -> _);
        registry.register_with_unit(
            "redis_command_duration",
            "Latency of Redis operations (one script or command each), by operation",
            Unit::Seconds,
            redis_duration.clone(),
        );
        let redis_errors = Family::<RedisErrorLabels, Counter>::default();
        registry.register(
            "redis_errors",
            "Failed Redis operations, by operation and kind",
            redis_errors.clone(),
        );
        let sessions_created = Counter::default();
        registry.register(
            "sessions_created",
            "Sessions created",
            sessions_created.clone(),
        );
        let sessions_extended = Counter::default();
        registry.register(
            "sessions_extended",
            "Sessions extended through the API",
            sessions_extended.clone(),
        );
        let sessions_destroyed = Counter::default();
        registry.register(
            "sessions_destroyed",
            "Sessions destroyed through the API",
            sessions_destroyed.clone(),
        );
        let sessions_evicted = Counter::default();
        registry.register(
            "sessions_evicted",
            "Least recently active sessions ended to stay within session.max_per_user",
            sessions_evicted.clone(),
        );
        let tunnels_session_ended = Counter::default();
        registry.register(
            "tunnels_session_ended",
            "WebSocket tunnels closed because the session they were admitted on ended",
            tunnels_session_ended.clone(),
        );
        let tokens_verified_with_previous_key = Counter::default();
        registry.register(
            "tokens_verified_with_previous_key",
            "Tokens accepted whose signature only the key being rotated out (jwt.previous_*) verified, counted when verified in full (a remembered token is not verified again)",
            tokens_verified_with_previous_key.clone(),
        );
        let upstream_pool = crate::forward::PoolCounters::default();
        registry.register(
            "upstream_connections_opened",
            "Connections opened to the upstream. Under steady load it levels off once the pools are warm; a steady rise means the upstream closes kept-alive connections (Connection: close, a keep-alive timeout below upstream.pool_idle_timeout)",
            upstream_pool.opened.clone(),
        );
        registry.register(
            "upstream_connections_idle",
            "Kept-alive connections to the upstream waiting in the pools for a request",
            upstream_pool.idle.clone(),
        );
        registry.register(
            "upstream_requests_waiting",
            "Requests waiting for a connection to the upstream because upstream.max_connections are open",
            upstream_pool.waiting.clone(),
        );
        registry.register(
            "upstream_requests_replayed",
            "Bodiless idempotent requests sent again on a new connection because the upstream closed their pooled one under them",
            upstream_pool.replayed.clone(),
        );
        let sessions_active = Gauge::default();
        registry.register(
            "sessions_active",
            "Live sessions in Redis under this key prefix, from the last periodic SCAN (-1 before the first)",
            sessions_active.clone(),
        );
        sessions_active.set(-1);
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Open client connections on the public listener",
            open_connections.clone(),
        );
        let resting_connections = Gauge::default();
        registry.register(
            "resting_connections",
            "Open HTTP/1.1 connections at rest: idle between requests, holding no parser or buffers",
            resting_connections.clone(),
        );
        let open_tunnels = Gauge::default();
        registry.register(
            "open_tunnels",
            "Open WebSocket (HTTP Upgrade) tunnels",
            open_tunnels.clone(),
        );
        let rate_limit_keys = Gauge::default();
        registry.register(
            "rate_limit_tracked_keys",
            "Callers currently tracked by the rate limiters",
            rate_limit_keys.clone(),
        );
        let rate_limit_table_full = Family::<LimiterLabels, Counter>::default();
        registry.register(
            "rate_limit_table_full",
            "New callers refused because their rate limiter already tracked rate_limit.max_tracked_callers callers, by limiter",
            rate_limit_table_full.clone(),
        );
        let certificate_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "certificate_reloads",
            "TLS certificate reloads, by outcome",
            certificate_reloads.clone(),
        );
        let session_cache_lookups = Family::<CacheLabels, Counter>::default();
        registry.register(
            "session_cache_lookups",
            "Session checks on proxied requests and open tunnels, by how the local cache answered",
            session_cache_lookups.clone(),
        );
        let session_cache_entries = Gauge::default();
        registry.register(
            "session_cache_entries",
            "Users with sessions held in the local cache",
            session_cache_entries.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            rejections,
            redis_duration,
            redis_errors,
            sessions_created,
            sessions_extended,
            sessions_destroyed,
            sessions_evicted,
            sessions_active,
            open_connections,
            resting_connections,
            open_tunnels,
            tunnels_session_ended,
            tokens_verified_with_previous_key,
            upstream_pool,
            rate_limit_keys,
            rate_limit_table_full,
            certificate_reloads,
            session_cache_lookups,
            session_cache_entries,
            hot: HotSeries::default(),
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts a request answered with `status` after `elapsed`.
    pub fn observe_request(&self, route_class: &'static str, status: u16, elapsed: Duration) {
        let class = ROUTE_CLASSES.iter().position(|c| *c == route_class);
        let requests = || {
            self.requests
                .get_or_create(&RequestLabels {
                    route_class,
                    status,
                })
                .clone()
        };
        match class.and_then(|i| self.hot.ok_by_class.get(i)) {
            Some(ok) if status == 200 => ok.get_or_init(requests).inc(),
            _ => requests().inc(),
        };
        let duration = || {
            self.request_duration
                .get_or_create(&ClassLabels { route_class })
                .clone()
        };
        match class.and_then(|i| self.hot.duration_by_class.get(i)) {
            Some(histogram) => histogram
                .get_or_init(duration)
                .observe(elapsed.as_secs_f64()),
            None => duration().observe(elapsed.as_secs_f64()),
        }
    }

    /// Counts how the session cache answered a proxied request's check.
    pub fn session_cache_lookup(&self, result: &'static str) {
        let counter = || {
            self.session_cache_lookups
                .get_or_create(&CacheLabels { result })
                .clone()
        };
        let slot = CACHE_RESULTS
            .iter()
            .position(|r| *r == result)
            .and_then(|i| self.hot.cache_lookups.get(i));
        match slot {
            Some(slot) => slot.get_or_init(counter).inc(),
            None => counter().inc(),
        };
    }

    pub fn observe_redis(&self, op: &'static str, elapsed: Duration) {
        self.redis_duration
            .get_or_create(&RedisLabels { op })
            .observe(elapsed.as_secs_f64());
    }

    pub fn redis_error(&self, op: &'static str, kind: &'static str) {
        self.redis_errors
            .get_or_create(&RedisErrorLabels { op, kind })
            .inc();
    }

    pub fn rejected(&self, rejection: &Rejection) {
        self.rejections
            .get_or_create(&RejectionLabels {
                reason: rejection_reason(rejection),
                code: rejection.code(),
            })
            .inc();
    }
}

/// The coarse reason a rejection is counted under.
pub fn rejection_reason(rejection: &Rejection) -> &'static str {
    match rejection {
        Rejection::TokenMissing
        | Rejection::TokenInvalid
        | Rejection::TokenExpired
        | Rejection::SignedOut => "token",
        Rejection::SessionInvalid | Rejection::SessionNotFound => "session",
        Rejection::RateLimited => "rate_limit",
        Rejection::StoreUnavailable | Rejection::ChangeUnconfirmed => "redis_unavailable",
        Rejection::UpstreamUnavailable
        | Rejection::UpstreamTimeout(_)
        | Rejection::UpstreamBusy => "upstream",
        Rejection::PayloadTooLarge(_)
        | Rejection::HeadersTooLarge(_)
        | Rejection::BadRequest(_)
        | Rejection::InvalidPath(_)
        | Rejection::Malformed(_)
        | Rejection::TransferCodingUnsupported
        | Rejection::ConnectUnsupported
        | Rejection::NotFound
        | Rejection::MethodNotAllowed
        | Rejection::InvalidSessionId(_)
        | Rejection::OriginNotAllowed
        | Rejection::BodyStalled => "request",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_kept_for_speed_count_into_their_families() {
        let m = Metrics::new();
        for status in [200, 200, 404] {
            m.observe_request("session", status, Duration::from_millis(2));
        }
        m.observe_request("elsewhere", 200, Duration::from_millis(2));
        m.session_cache_lookup("hit");
        m.session_cache_lookup("hit");
        let text = m.encode();
        for line in [
            "portcullis_requests_total{route_class=\"session\",status=\"200\"} 2",
            "portcullis_requests_total{route_class=\"session\",status=\"404\"} 1",
            "portcullis_requests_total{route_class=\"elsewhere\",status=\"200\"} 1",
            "portcullis_request_duration_seconds_count{route_class=\"session\"} 3",
            "portcullis_session_cache_lookups_total{result=\"hit\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // Only what was counted appears.
        assert!(!text.contains("route_class=\"jwt\""), "{text}");
        assert!(!text.contains("result=\"miss\""), "{text}");
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                route_class: "session",
                status: 200,
            })
            .inc();
        m.request_duration
            .get_or_create(&ClassLabels {
                route_class: "session",
            })
            .observe(0.002);
        m.rejected(&Rejection::RateLimited);
        let text = m.encode();
        assert!(
            text.contains("portcullis_requests_total{route_class=\"session\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("portcullis_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains(
                "portcullis_rejections_total{reason=\"rate_limit\",code=\"RATE_LIMITED\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("portcullis_sessions_active -1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
