//! The budget: one Redis round trip per proxied request, counted by the server itself
//! (INFO commandstats) and cross-checked with MONITOR, which tells the commands a client sent
//! apart from those a Lua script ran. The local session cache is off here, so that every
//! request pays its check (tests/session_cache.rs covers the cached path).

mod support;

use std::collections::BTreeMap;

use support::*;

const N: u64 = 20;

struct Setup {
    redis: RedisServer,
    upstream: Upstream,
    proxy: Proxy,
    sid: String,
}

async fn setup() -> Setup {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let extra = "[session]\nlocal_cache = false\n\n[[routes]]\npath_prefix = \"/public\"\nauth = \"none\"\n\n[[routes]]\npath_prefix = \"/profile\"\nauth = \"jwt\"\n";
    let proxy = Proxy::start(&session_config(&upstream, &redis, extra)).await;
    let sid = create_session(&proxy, &token("alice", None)).await;
    let s = Setup {
        redis,
        upstream,
        proxy,
        sid,
    };
    // Warm-up: the first use of the script may load it.
    for _ in 0..2 {
        assert_eq!(s.request("/game", Some(&s.sid.clone())).await, 200);
    }
    s
}

impl Setup {
    async fn request(&self, path: &str, sid: Option<&str>) -> u16 {
        client()
            .get(self.proxy.url(path))
            .bearer_auth(token("alice", sid))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Runs `work` between two markers and returns (commandstats delta, commands clients sent,
/// commands scripts ran), leaving out the measuring itself.
async fn measure<F, Fut>(s: &Setup, work: F) -> (BTreeMap<String, u64>, Vec<String>, Vec<String>)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let monitor = Monitor::start(&s.redis);
    let mut conn = s.redis.conn();
    monitor.sync(&s.redis, "budget-begin");
    let before = commandstats(&mut conn);
    work().await;
    let after = commandstats(&mut conn);
    monitor.sync(&s.redis, "budget-end");
    let lines = monitor.between("budget-begin", "budget-end");
    let (lua, sent): (Vec<String>, Vec<String>) =
        lines.into_iter().partition(|l| monitor_line_is_lua(l));
    let sent: Vec<String> = sent
        .iter()
        .map(|l| monitor_command(l))
        .filter(|c| c != "info")
        .collect();
    let lua = lua.iter().map(|l| monitor_command(l)).collect();
    (delta(&before, &after), sent, lua)
}

#[tokio::test]
async fn n_proxied_requests_cost_exactly_n_session_scripts_and_nothing_else() {
    let s = setup().await;
    let evalsha_before = s.redis.command_calls("evalsha");
    let total_before = s.redis.total_calls();
    let (stats, sent, lua) = measure(&s, || async {
        for _ in 0..N {
            assert_eq!(s.request("/game", Some(&s.sid)).await, 200);
        }
    })
    .await;
    let evalsha = s.redis.command_calls("evalsha") - evalsha_before;
    // Measuring added MONITOR and two ECHO markers; nothing else ran besides the proxy's.
    let total = s.redis.total_calls() - total_before - 3;
    println!(
        "{N} requests: sent {sent:?} (count {}), inside scripts {} commands, stats {stats:?}",
        sent.len(),
        lua.len()
    );

    assert_eq!(evalsha, N, "EVALSHA calls");
    assert_eq!(stats.get("evalsha").copied(), Some(N));
    // Round trips: what the proxy sent, leaving out what its scripts ran inside Redis.
    assert_eq!(sent.len() as u64, N, "commands sent by the proxy: {sent:?}");
    assert!(sent.iter().all(|c| c == "evalsha"), "{sent:?}");
    // commandstats also counts the commands a script runs; all the rest is accounted for.
    assert_eq!(
        total,
        N + lua.len() as u64,
        "total_calls() minus the commands run inside the scripts"
    );
    assert_eq!(stats.values().sum::<u64>(), N + lua.len() as u64);
    assert_eq!(s.upstream.count() as u64, N + 2);
}

#[tokio::test]
async fn a_refused_session_costs_one_script_too() {
    let s = setup().await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let (stats, sent, _) = measure(&s, || async {
        for _ in 0..N {
            assert_eq!(s.request("/game", Some(&unknown)).await, 401);
        }
    })
    .await;
    assert_eq!(sent.len() as u64, N, "{sent:?}");
    assert!(sent.iter().all(|c| c == "evalsha"), "{sent:?}");
    assert_eq!(stats.get("evalsha").copied(), Some(N));
}

#[tokio::test]
async fn jwt_and_open_routes_cost_no_redis_command() {
    let s = setup().await;
    let (stats, sent, lua) = measure(&s, || async {
        for _ in 0..N {
            assert_eq!(s.request("/profile/me", Some(&s.sid)).await, 200);
            assert_eq!(s.request("/public/news", None).await, 200);
        }
    })
    .await;
    assert!(sent.is_empty(), "{sent:?}");
    assert!(lua.is_empty(), "{lua:?}");
    assert!(stats.is_empty(), "{stats:?}");
}

#[tokio::test]
async fn concurrent_requests_keep_the_budget() {
    let s = setup().await;
    let (stats, sent, _) = measure(&s, || async {
        let requests = (0..N).map(|_| s.request("/game", Some(&s.sid)));
        let statuses = futures_util::future::join_all(requests).await;
        assert!(statuses.iter().all(|st| *st == 200), "{statuses:?}");
    })
    .await;
    assert_eq!(sent.len() as u64, N, "{sent:?}");
    assert_eq!(stats.get("evalsha").copied(), Some(N));
}

/// A session API call made with a token bound to a session (a `sid` claim) checks that the
/// session lives inside the call's own script: one round trip per call, whatever the endpoint,
/// and nothing can end the session between the check and the call.
#[tokio::test]
async fn a_session_api_call_with_a_bound_token_costs_one_script() {
    let s = setup().await;
    let bound = token("alice", Some(&s.sid));
    let api = |path: &str| s.proxy.url(&format!("/api/v1/sessions{path}"));
    let calls = [
        (reqwest::Method::GET, api("/user/sessions"), 200),
        (reqwest::Method::GET, api(&format!("/{}", s.sid)), 200),
        (
            reqwest::Method::POST,
            api(&format!("/{}/extend", s.sid)),
            200,
        ),
        (reqwest::Method::POST, api("/create"), 201),
    ];
    let make_calls = || async {
        for (method, url, status) in &calls {
            let resp = client()
                .request(method.clone(), url)
                .bearer_auth(&bound)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), *status, "{method} {url}");
        }
    };
    make_calls().await; // loads the scripts
    let (stats, sent, _) = measure(&s, make_calls).await;
    assert_eq!(sent.len(), calls.len(), "{sent:?}");
    assert!(sent.iter().all(|c| c == "evalsha"), "{sent:?}");
    assert_eq!(stats.get("evalsha").copied(), Some(calls.len() as u64));
}
