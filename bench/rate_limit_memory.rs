//! Memory of the rate limiter per tracked key, and at one million keys.
//!
//! `cargo bench --bench rate_limit_memory` measures with 1,000,000 keys; under `cargo test`
//! (no `--bench` argument) it runs a 10,000-key smoke pass so the benchmark cannot rot.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use portcullis::config::Quota;
use portcullis::rate_limit::{CallerKey, Limiter};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn measure(name: &str, keys: u32, key: impl Fn(u32) -> CallerKey) {
    // No bound on callers: the whole table is what is measured.
    let limiter = Limiter::new(Quota {
        requests: NonZeroU32::new(100).unwrap(),
        per: Duration::from_secs(900),
        burst: NonZeroU32::new(100).unwrap(),
    })
    .bounded(
        usize::MAX,
        "bench",
        Counter::default(),
        Arc::new(Notify::new()),
    );
    let before = rss_bytes();
    for i in 0..keys {
        assert!(limiter.check(&key(i)).allowed);
    }
    assert_eq!(limiter.tracked_keys(), keys as usize);
    let after = rss_bytes();
    let per_key = after.saturating_sub(before) as f64 / f64::from(keys);
    println!(
        "{name:<28} {keys:>9} keys  RSS +{:>8.1} MiB  {per_key:>6.1} bytes/key",
        after.saturating_sub(before) as f64 / (1024.0 * 1024.0)
    );
    limiter.evict_idle();
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let keys = if full { 1_000_000 } else { 10_000 };
    println!(
        "rate limiter memory ({} mode)",
        if full { "full" } else { "smoke" }
    );
    measure("client IPv4 address", keys, |i| {
        CallerKey::Ip(IpAddr::from(i.to_be_bytes()))
    });
    measure("user id (36-char UUID)", keys, |i| {
        let id: Arc<str> = format!("{:08x}-0000-4000-8000-000000000000", i).into();
        CallerKey::User(id)
    });
}
