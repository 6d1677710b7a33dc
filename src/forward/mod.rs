//! The innermost service: send the request to the upstream and stream the answer back.
//!
//! Header hygiene happens here, strip before set: hop-by-hop headers (RFC 9110 7.6.1, and every
//! header the Connection header names) are removed in both directions, and X-Forwarded-For /
//! -Proto / -Host are rewritten (and the other headers that speak for a proxy removed unless a
//! trusted one sent them). The path goes upstream as the router made it canonical, the
//! query byte for byte. A WebSocket upgrade (Socket.IO's included) that the upstream accepts
//! with 101 becomes a bidirectional tunnel.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderName};
use http::uri::PathAndQuery;
use http::{Extensions, HeaderMap, HeaderValue, Request, Response, Uri, Version};
use smallvec::SmallVec;

use crate::config::{IdentityConfig, UpstreamConfig};
use crate::error::{source_chain_has, Rejection};
use crate::facts::RequestFacts;
use crate::peer::{ConnInfo, TrustedProxies};
use crate::request_id::X_REQUEST_ID;
use crate::session::gate::Identity;
use crate::session::tunnels::TunnelSession;
use crate::{Body, BoxResponse};

mod client;
mod pool;
mod tunnel;

pub use pool::{Pool, PoolCounters, PoolError, Upgraded, UpstreamSlots, REPLAY_AFTER_IDLE};
pub use tunnel::{Tunnel, TunnelCount, UpgradeHandoff};

/// Headers [`Upstream::upstream_request`] may add to a request.
const UPSTREAM_HEADERS_ADDED: usize = 8;

// Statics, so that the names are parsed at compile time: `from_static` in a function body
// runs its lookup on every call.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Where requests go and how they are rewritten; shared by every worker. Each worker's
/// [`Forward`] owns its own connection [`Pool`]: a request and the upstream connection it uses
/// then live on one thread, and handing one to the other costs no cross-thread wakeup.
pub struct Upstream {
    config: UpstreamConfig,
    max_body_bytes: u64,
    trusted: TrustedProxies,
    identity: IdentityConfig,
    tunnels: Arc<TunnelCount>,
    /// The headers portcullis sets, whose underscore spellings are removed.
    aliased: Aliased,
    /// Counted by every worker's pool.
    pool_counters: PoolCounters,
    /// Connections open to the upstream, all workers' pools together (`max_connections`).
    slots: Arc<UpstreamSlots>,
    /// Warnings of failures to get an answer, and, apart so that neither kind hides the
    /// other, of answers that did not come in time.
    failures: FailureWarnings,
    timeouts: FailureWarnings,
}

/// How often, at most, an upstream failure is logged as a warning.
const FAILURE_WARN_EVERY: Duration = Duration::from_secs(10);

/// Upstream failures as warnings: the first at once, then at most one per
/// [`FAILURE_WARN_EVERY`] (each saying how many it stands for), so that a dead or misconfigured
/// upstream is named in the log without one line per refused request. The rest are DEBUG.
#[derive(Debug)]
struct FailureWarnings {
    since: Instant,
    /// When the last warning was written: milliseconds from `since`, plus one (0: never).
    last: std::sync::atomic::AtomicU64,
    /// Failures since then that were not warned of.
    unwarned: std::sync::atomic::AtomicU64,
}

impl FailureWarnings {
    fn new() -> Self {
        FailureWarnings {
            since: Instant::now(),
            last: 0.into(),
            unwarned: 0.into(),
        }
    }

    fn note(&self, failure: &str, error: &dyn std::fmt::Display) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let last = self.last.load(Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= FAILURE_WARN_EVERY.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            let also = self.unwarned.swap(0, Relaxed);
            tracing::warn!(
                error = %error,
                also_since_last_warning = also,
                "{failure} (warned at most every {}s)",
                FAILURE_WARN_EVERY.as_secs()
            );
        } else {
            self.unwarned.fetch_add(1, Relaxed);
            tracing::debug!(error = %error, "{failure}");
        }
    }
}

/// Names some backends would confuse with these (see `Upstream::remove_aliases`), and with
/// those of [`PROXY_SAID`]; the bit of each one's length is set, so that most names are passed
/// over without reading them.
struct Aliased {
    names: Vec<HeaderName>,
    lengths: u64,
}

impl Aliased {
    fn new(names: Vec<HeaderName>) -> Self {
        let lengths = names.iter().fold(PROXY_SAID_LENGTHS, |bits, n| {
            bits | length_bit(n.as_str().len())
        });
        Aliased { names, lengths }
    }

    /// `key` is one of the names, or of [`PROXY_SAID`], with `_` for some `-`.
    fn aliases(&self, key: &HeaderName) -> bool {
        let key = key.as_str();
        self.lengths & length_bit(key.len()) != 0
            && key.contains('_')
            && (self
                .names
                .iter()
                .any(|name| underscored(name.as_str(), key))
                || PROXY_SAID.iter().any(|name| underscored(name, key)))
    }
}

/// The bit standing for names of `len` bytes in a set of lengths; names of 63 bytes or more
/// share the last, so that no length falls outside the set.
const fn length_bit(len: usize) -> u64 {
    1 << if len < 63 { len } else { 63 }
}

/// Whether `key` is `name` with `_` for some of its `-`.
fn underscored(name: &str, key: &str) -> bool {
    name.len() == key.len()
        && name
            .bytes()
            .zip(key.bytes())
            .all(|(n, k)| n == k || (n == b'-' && k == b'_'))
}

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        max_body_bytes: u64,
        trusted: TrustedProxies,
        identity: IdentityConfig,
        pool_counters: PoolCounters,
    ) -> Self {
        let aliased = Aliased::new(vec![
            identity.user_id.clone(),
            identity.session_id.clone(),
            identity.platform.clone(),
            X_FORWARDED_FOR.clone(),
            X_FORWARDED_PROTO.clone(),
            X_FORWARDED_HOST.clone(),
            X_REQUEST_ID.clone(),
            // Framing: a server that took these for the real ones would find the body
            // elsewhere than portcullis did.
            http::header::CONTENT_LENGTH,
            http::header::TRANSFER_ENCODING,
        ]);
        Upstream {
            config: config.clone(),
            max_body_bytes,
            trusted,
            identity,
            tunnels: Arc::new(TunnelCount::default()),
            aliased,
            pool_counters,
            slots: UpstreamSlots::new(config.max_connections),
            failures: FailureWarnings::new(),
            timeouts: FailureWarnings::new(),
        }
    }

    pub fn tunnels(&self) -> Arc<TunnelCount> {
        self.tunnels.clone()
    }

    /// Forwards one request; every failure becomes a [`Rejection`] response. The request's
    /// facts come back on the response, with the upstream's time when it answered.
    pub async fn forward(&self, pool: &Pool, mut req: Request<Body>) -> Response<Body> {
        // Handed over whole, the extension map costs no allocation on the response.
        let mut extensions = std::mem::take(req.extensions_mut());
        let mut response = match self.exchange(pool, req, &mut extensions).await {
            Ok((response, elapsed)) => {
                if let Some(facts) = extensions.get_mut::<RequestFacts>() {
                    facts.upstream_time = Some(elapsed);
                }
                response
            }
            Err(rejection) => rejection.into_response(),
        };
        response.extensions_mut().extend(extensions);
        response
    }

    /// Sends the request upstream and returns its answer, with how long the answer's head took.
    async fn exchange(
        &self,
        pool: &Pool,
        req: Request<Body>,
        extensions: &mut Extensions,
    ) -> Result<(Response<Body>, Duration), Rejection> {
        // The client connection hands one over with each request that asks to switch to
        // WebSocket (`wants_upgrade`), and with no other.
        let handoff = extensions.remove::<UpgradeHandoff>();
        let upgrade = handoff.is_some();
        let req = self.upstream_request(req, extensions.get::<RequestFacts>(), upgrade);
        // `request_timeout` is the upstream's time, not the client's upload: with a body, the
        // clock starts once all of it has gone upstream. An upload that stalls is the client
        // connection's `idle_timeout` to end.
        let (req, uploaded) = if http_body::Body::is_end_stream(req.body()) {
            (req, None)
        } else {
            let uploaded = Arc::new(tokio::sync::Notify::new());
            let announce = uploaded.clone();
            let req = req.map(|body| {
                Body::new(Announced {
                    body,
                    done: Some(announce),
                })
            });
            (req, Some(uploaded))
        };

        let started = Instant::now();
        let timeout = self.config.request_timeout;
        // Pinned in place: the timeout then holds a pointer, not a copy of the whole exchange.
        let mut send = std::pin::pin!(pool.send(req));
        let result = match uploaded {
            None => tokio::time::timeout(timeout, send).await,
            Some(uploaded) => tokio::select! {
                result = send.as_mut() => Ok(result),
                () = uploaded.notified() => tokio::time::timeout(timeout, send).await,
            },
        };
        let elapsed = started.elapsed();
        let (response, switched) = match result {
            Err(_) => {
                self.timeouts.note(
                    "upstream did not answer in time",
                    &format_args!(
                        "no answer head within upstream.request_timeout ({:?})",
                        self.config.request_timeout
                    ),
                );
                return Err(Rejection::UpstreamTimeout(self.config.request_timeout));
            }
            Ok(Err(e)) => return Err(self.classify(e)),
            Ok(Ok(answer)) => answer,
        };

        let upgraded = switched.is_some();
        if let Some(upstream) = switched {
            // Only WebSocket was offered: a 101 that switches to anything else, or names
            // nothing, would tunnel bytes no check understands.
            let websocket = names_websocket(response.headers());
            match handoff {
                Some(handoff) if websocket => handoff.give(Tunnel::new(
                    upstream,
                    &self.tunnels,
                    extensions
                        .remove::<TunnelSession>()
                        .map(TunnelSession::watch),
                )),
                // A 101 we did not ask for cannot be honoured: the client never offered to switch.
                _ => {
                    self.failures.note(
                        "upstream request failed",
                        &"a 101 switching to something other than the WebSocket asked for",
                    );
                    return Err(Rejection::UpstreamUnavailable);
                }
            }
        }

        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgraded, &[]);
        Ok((Response::from_parts(parts, Body::new(body)), elapsed))
    }

    /// Rewrites the client's request into the one the upstream receives; `upgrade` says whether
    /// it asks to switch protocols.
    fn upstream_request(
        &self,
        req: Request<Body>,
        facts: Option<&RequestFacts>,
        upgrade: bool,
    ) -> Request<Body> {
        let (mut parts, body) = req.into_parts();
        // Room for what is set below (X-Forwarded-*, the identity headers, perhaps Host and
        // Transfer-Encoding) in one growth of the map, not one rehash after another.
        parts.headers.reserve(UPSTREAM_HEADERS_ADDED);
        let conn = facts.and_then(|f| f.conn);

        // The Host the client asked for: its Host header (HTTP/1) or :authority (HTTP/2).
        let client_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        // Origin-form, as an HTTP/1.1 request to an origin server is written. An absolute-form
        // target with an empty path (`http://host?q`) was judged as `/`, and goes as that.
        parts.uri = Uri::from(match parts.uri.path_and_query() {
            Some(target) if target.as_str().starts_with(['/', '*']) => target.clone(),
            Some(target) => PathAndQuery::try_from(format!("/{}", target.as_str()))
                .unwrap_or_else(|_| PathAndQuery::from_static("/")),
            None => PathAndQuery::from_static("/"),
        });

        let upgrade_protocol = upgrade
            .then(|| parts.headers.get(header::UPGRADE).cloned())
            .flatten();

        // The request id is portcullis' own: a Connection header naming it does not drop it.
        strip_hop_by_hop(&mut parts.headers, false, &[&X_REQUEST_ID]);
        // The upstream client frames a body as the head says: one that came chunked
        // (HTTP/1.1, its Transfer-Encoding just removed) or in DATA frames without a length
        // (HTTP/2) goes up chunked.
        if !http_body::Body::is_end_stream(&body)
            && !parts.headers.contains_key(header::CONTENT_LENGTH)
        {
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        self.remove_aliases(&mut parts.headers);
        if parts.version == Version::HTTP_2 {
            join_cookies(&mut parts.headers);
        }
        if let Some(protocol) = upgrade_protocol {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
        }

        if let Some(conn) = conn {
            self.set_forwarded(&mut parts.headers, conn, client_host.as_ref());
        }
        set_identity(
            &mut parts.headers,
            &self.identity,
            facts.and_then(|f| f.identity.as_ref()),
        );
        match (&self.config.host, client_host) {
            (Some(fixed), _) => {
                parts.headers.insert(header::HOST, fixed.clone());
            }
            (None, Some(host)) => {
                parts.headers.insert(header::HOST, host);
            }
            // HTTP/1.1 requires a Host; a client that sent none gets the upstream's.
            (None, None) => {
                if let Ok(host) = HeaderValue::from_str(self.config.authority.as_str()) {
                    parts.headers.insert(header::HOST, host);
                }
            }
        }
        // The pool speaks HTTP/1.1 to the upstream whatever the client spoke to us.
        parts.version = Version::HTTP_11;
        Request::from_parts(parts, body)
    }

    fn set_forwarded(&self, headers: &mut HeaderMap, conn: ConnInfo, host: Option<&HeaderValue>) {
        let peer = crate::peer::canonical(conn.peer.ip());
        let trusted = self.trusted.contains(peer);
        // A trusted proxy's lines, as bytes: a line with bytes that are not UTF-8 (which a client
        // may have put in front of its own address) still carries the address the proxy
        // appended, which the upstream needs to see as portcullis did (see `peer`).
        let mut prior: Vec<u8> = Vec::new();
        if trusted {
            for line in headers.get_all(&X_FORWARDED_FOR) {
                prior.extend_from_slice(line.as_bytes());
                prior.extend_from_slice(b", ");
            }
        }
        let chain = if prior.is_empty() {
            ip_value(peer)
        } else {
            prior.extend_from_slice(peer.to_string().as_bytes());
            HeaderValue::from_bytes(&prior).ok()
        };
        // `insert` replaces every value the client sent.
        match chain {
            Some(v) => headers.insert(X_FORWARDED_FOR.clone(), v),
            None => headers.remove(&X_FORWARDED_FOR),
        };

        if !trusted {
            // A peer that is not a trusted proxy could otherwise choose the address or scheme a
            // backend believes.
            remove_named(headers, |name| proxy_said(name.as_str()));
        }
        if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
            let proto = if conn.tls { "https" } else { "http" };
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
        }
        if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
            match host {
                Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host.clone()),
                None => headers.remove(&X_FORWARDED_HOST),
            };
        }
    }

    /// Removes the headers some backends would read as one portcullis sets: CGI-style servers
    /// (WSGI, Rack, PHP) map `X_User_Id` and `X-User-Id` alike to `HTTP_X_USER_ID`, so a client's
    /// `X_User_Id` would reach them next to, or instead of, the verified one.
    fn remove_aliases(&self, headers: &mut HeaderMap) {
        remove_named(headers, |k| self.aliased.aliases(k));
    }

    fn classify(&self, error: PoolError) -> Rejection {
        if source_chain_has::<http_body_util::LengthLimitError>(&error) {
            return Rejection::PayloadTooLarge(self.max_body_bytes);
        }
        if matches!(error, PoolError::Busy) {
            self.failures.note("upstream request failed", &error);
            return Rejection::UpstreamBusy;
        }
        // Reading the client's body failed: it broke its own framing (the upstream's answers
        // are not read with that error type), stalled, or broke off. The client's doing, not
        // the upstream's.
        if source_chain_has::<crate::h1::FramingError>(&error)
            || source_chain_has::<crate::error::BodyStalled>(&error)
            || matches!(error, PoolError::Exchange(client::Error::Upload(_)))
        {
            tracing::debug!(error = %error_chain(&error), "request body failed");
            return Rejection::of_request_body(&error);
        }
        self.failures
            .note("upstream request failed", &error_chain(&error));
        Rejection::UpstreamUnavailable
    }
}

/// An address as a header value. IPv4, the usual case on every request's X-Forwarded-For, is
/// written digit by digit: the formatting machinery costs several times more.
fn ip_value(ip: std::net::IpAddr) -> Option<HeaderValue> {
    let std::net::IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string()).ok();
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        let digits = [octet / 100, octet / 10 % 10, octet % 10];
        let skip = if octet >= 100 {
            0
        } else if octet >= 10 {
            1
        } else {
            2
        };
        for d in &digits[skip..] {
            text[len] = b'0' + d;
            len += 1;
        }
    }
    HeaderValue::from_bytes(&text[..len]).ok()
}

/// The message's Upgrade header names WebSocket, the one protocol portcullis tunnels.
fn names_websocket(headers: &HeaderMap) -> bool {
    headers.get(header::UPGRADE).is_some_and(|protocol| {
        protocol
            .to_str()
            .is_ok_and(|p| p.trim().eq_ignore_ascii_case("websocket"))
    })
}

/// True when the request asks to switch to WebSocket (an HTTP/1.1 GET with `Connection:
/// upgrade` + `Upgrade: websocket`). No other protocol is offered to the upstream: behind an
/// `h2c` (or any other) tunnel the client could send the upstream requests that no check ever
/// sees. Such a request goes upstream as an ordinary one, its Upgrade header stripped as
/// hop-by-hop.
pub fn wants_upgrade<B>(req: &Request<B>) -> bool {
    let headers = req.headers();
    // A WebSocket opening handshake is a GET (RFC 6455 4.1).
    req.method() == http::Method::GET
        && req.version() == Version::HTTP_11
        && names_websocket(headers)
        && headers.get_all(header::UPGRADE).iter().nth(1).is_none()
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1), plus the
/// non-standard ones that clients still send.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Bit `n` set when a name in [`HOP_BY_HOP`] is `n` bytes long (te; trailer, upgrade;
/// connection, keep-alive; proxy-connection; transfer-encoding; proxy-authenticate;
/// proxy-authorization): most names are passed over on their length alone.
const HOP_BY_HOP_LENGTHS: u64 = 1 << 2 | 1 << 7 | 1 << 10 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19;

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP_LENGTHS & length_bit(name.as_str().len()) != 0 && HOP_BY_HOP.contains(name)
}

/// Header fields past which the names a Connection header lists are looked up, not looked for.
const LOOK_UP_CONNECTION_TOKENS_PAST: usize = 16;

/// Removes hop-by-hop headers and every header the Connection header names, except `spared`
/// (headers portcullis itself vouches for). On a 101 response the Upgrade and Connection headers
/// are the answer itself and stay.
///
/// Only names that are present are removed: one pass over the few headers a message carries is
/// cheaper than hashing every hop-by-hop name for `HeaderMap::remove`, and most requests carry
/// none of them. The Connection header's tokens are compared as text with the message's names:
/// parsing one into a `HeaderName` costs more than that, and most of them (`keep-alive`,
/// `close`) name no header of the message.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool, spared: &[&HeaderName]) {
    let kept =
        |name: &HeaderName| keep_upgrade && (name == header::CONNECTION || name == header::UPGRADE);
    let mut doomed: SmallVec<[HeaderName; 4]> = SmallVec::new();
    let mut has_connection = false;
    for name in headers.keys() {
        has_connection |= name == header::CONNECTION;
        if is_hop_by_hop(name) && !kept(name) {
            doomed.push(name.clone());
        }
    }
    if has_connection {
        // A look through a few names costs less than parsing the token as a name; past that,
        // a lookup keeps a long Connection header over many fields from costing their product.
        let look_up = headers.keys_len() > LOOK_UP_CONNECTION_TOKENS_PAST;
        for token in connection_tokens(headers) {
            let listed = if look_up {
                HeaderName::from_bytes(token.as_bytes())
                    .ok()
                    .filter(|name| headers.contains_key(name))
            } else {
                headers
                    .keys()
                    .find(|name| name.as_str().eq_ignore_ascii_case(token))
                    .cloned()
            };
            let removable = |name: &HeaderName| {
                !kept(name) && !doomed.contains(name) && !spared.contains(&name)
            };
            if let Some(name) = listed.filter(removable) {
                doomed.push(name);
            }
        }
    }
    for name in &doomed {
        headers.remove(name);
    }
}

/// Takes out of an upstream's trailer section the fields that may not stand there: those of
/// one connection (hop-by-hop, and any the section's Connection names), which make an
/// HTTP/2 client reset the stream, and those that frame or route a message (RFC 9110 6.5.1).
pub(crate) fn strip_trailer_fields(trailers: &mut HeaderMap) {
    strip_hop_by_hop(trailers, false, &[]);
    trailers.remove(header::CONTENT_LENGTH);
    trailers.remove(header::HOST);
}

/// HTTP/2 clients may split Cookie into several fields; HTTP/1.1 allows one, so they are joined
/// with `; ` before the request goes upstream (RFC 9113 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    match HeaderValue::from_bytes(&joined) {
        Ok(value) => {
            headers.insert(header::COOKIE, value);
        }
        // Each part was a valid value, so their join is one; should it not be, none is sent.
        Err(_) => {
            headers.remove(header::COOKIE);
        }
    }
}

/// Headers that backends and their frameworks believe as a proxy's word on the client (its
/// address, or the scheme, host, port or path prefix it used) or on the request (the path it
/// was first sent to), besides the three `X-Forwarded-*` headers portcullis sets itself: RFC 7239
/// `Forwarded`, nginx's `X-Real-IP`, CDN headers that Go's chi and Node's request-ip read before
/// `X-Forwarded-For`, the `X-Forwarded-*` variants of Spring, Tomcat and Rack, and the path
/// overrides of IIS URL Rewrite, Symfony and Zend (`X-Original-URL`, `X-Rewrite-URL`), nginx
/// setups, Traefik and Envoy, by which a backend would serve another path than the one judged.
const PROXY_SAID: [&str; 20] = [
    "forwarded",
    "forwarded-for",
    "x-forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "front-end-https",
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-forwarded-uri",
    "x-envoy-original-path",
];

/// The bit of each [`PROXY_SAID`] name's length, so that a name of another length (`host`,
/// `accept`, `user-agent`, `cookie`, ...) is passed over at once.
const PROXY_SAID_LENGTHS: u64 = {
    let mut bits = 0u64;
    let mut i = 0;
    while i < PROXY_SAID.len() {
        bits |= length_bit(PROXY_SAID[i].len());
        i += 1;
    }
    bits
};

/// Whether `name` is one of [`PROXY_SAID`].
fn proxy_said(name: &str) -> bool {
    PROXY_SAID_LENGTHS & length_bit(name.len()) != 0 && PROXY_SAID.contains(&name)
}

/// Removes every header whose name `doomed` picks, allocating nothing when none is there (the
/// usual case).
fn remove_named(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    if !headers.keys().any(&doomed) {
        return;
    }
    let names: SmallVec<[HeaderName; 2]> = headers.keys().filter(|k| doomed(k)).cloned().collect();
    for name in &names {
        headers.remove(name);
    }
}

/// Identity headers carry only what the gate verified. The client's copies were stripped on
/// entry; they are removed again here so that no path can forward one.
pub fn set_identity(headers: &mut HeaderMap, names: &IdentityConfig, identity: Option<&Identity>) {
    remove_present(
        headers,
        &[&names.user_id, &names.session_id, &names.platform],
    );
    let Some(identity) = identity else { return };
    if let Ok(v) = HeaderValue::from_str(&identity.user_id) {
        headers.insert(names.user_id.clone(), v);
    }
    if let Some(sid) = identity.session_id {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let text = sid.hyphenated().encode_lower(&mut buf);
        if let Ok(v) = HeaderValue::from_str(text) {
            headers.insert(names.session_id.clone(), v);
        }
    }
    if let Some(platform) = identity.platform {
        headers.insert(
            names.platform.clone(),
            HeaderValue::from_static(platform.as_str()),
        );
    }
}

/// Removes each of `names` that is present, hashing none of them when none is (the usual case).
pub fn remove_present(headers: &mut HeaderMap, names: &[&HeaderName]) {
    let present = |key: &HeaderName| names.contains(&key);
    if headers.keys().any(present) {
        for name in names {
            headers.remove(*name);
        }
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        out.push_str(": ");
        out.push_str(&e.to_string());
        current = e.source();
    }
    out
}

/// A request body that says when it has been read to its end (sent upstream in full).
struct Announced {
    body: Body,
    done: Option<Arc<tokio::sync::Notify>>,
}

impl http_body::Body for Announced {
    type Data = bytes::Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let frame = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        let ended = match &frame {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.body.is_end_stream(),
            _ => false,
        };
        if ended {
            if let Some(done) = self.done.take() {
                done.notify_one();
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The forwarding service at the bottom of the stack: one per worker, with that worker's pool.
#[derive(Clone)]
pub struct Forward {
    upstream: Arc<Upstream>,
    pool: Pool,
}

impl Forward {
    pub fn new(upstream: Arc<Upstream>) -> Self {
        let pool = Pool::new(
            &upstream.config,
            upstream.pool_counters.clone(),
            upstream.slots.clone(),
        );
        Forward { upstream, pool }
    }
}

impl tower::Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxResponse<Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.upstream.forward(&this.pool, req).await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_filter_lets_every_hop_by_hop_name_through() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        let bits = HOP_BY_HOP
            .iter()
            .fold(0u64, |bits, name| bits | 1 << name.as_str().len());
        assert_eq!(bits, HOP_BY_HOP_LENGTHS);
    }

    #[test]
    fn connection_named_headers_are_found_among_many_and_spared_ones_kept() {
        for fields in [4, LOOK_UP_CONNECTION_TOKENS_PAST + 4] {
            let mut h = HeaderMap::new();
            for i in 0..fields {
                h.insert(
                    HeaderName::from_bytes(format!("x-field-{i}").as_bytes()).unwrap(),
                    HeaderValue::from_static("v"),
                );
            }
            h.insert(
                header::CONNECTION,
                HeaderValue::from_static(
                    "X-Field-1, x-FIELD-3, x-absent, X-Request-Id, , bad name",
                ),
            );
            h.insert(&X_REQUEST_ID, HeaderValue::from_static("id"));
            strip_hop_by_hop(&mut h, false, &[&X_REQUEST_ID]);
            assert!(
                !h.contains_key("x-field-1") && !h.contains_key("x-field-3"),
                "{fields}"
            );
            assert!(
                h.contains_key("x-field-0") && h.contains_key("x-field-2"),
                "{fields}"
            );
            assert_eq!(h[&X_REQUEST_ID], "id", "{fields}");
            assert_eq!(h.len(), fields - 1, "{fields}: {h:?}");
        }
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false, &[]);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn connection_tokens_remove_every_value_of_the_headers_they_name() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Debug"),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("x-debug ,, bad name@"),
        );
        h.append("x-debug", HeaderValue::from_static("1"));
        h.append("x-debug", HeaderValue::from_static("2"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false, &[]);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn addresses_are_written_as_their_display_form() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.100.9",
            "2001:db8::1",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(ip).unwrap(), ip.to_string().as_str());
        }
    }

    #[test]
    fn remove_present_removes_every_value_of_the_names_given() {
        let user = HeaderName::from_static("x-user-id");
        let platform = HeaderName::from_static("x-session-platform");
        let mut h = HeaderMap::new();
        h.append(&user, HeaderValue::from_static("forged-1"));
        h.append(&user, HeaderValue::from_static("forged-2"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        remove_present(&mut h, &[&user, &platform]);
        assert!(!h.contains_key(&user));
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn switching_protocols_keeps_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true, &[]);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "Upgrade");
    }

    #[test]
    fn only_websocket_is_an_upgrade() {
        for protocol in ["h2c", "websocket, h2c", "TLS/1.0", "websocket2", ""] {
            let mut req = Request::new(());
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            req.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_str(protocol).unwrap());
            assert!(!wants_upgrade(&req), "{protocol}");
        }
        let mut req = Request::new(());
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        req.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static(" WebSocket "));
        assert!(wants_upgrade(&req));
        req.headers_mut()
            .append(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!wants_upgrade(&req), "two Upgrade lines");
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let mut req = Request::new(());
        req.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!wants_upgrade(&req));
        req.headers_mut().insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(wants_upgrade(&req));
    }
}
