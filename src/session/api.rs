//! The session API under `session.api_prefix` (default `/api/v1/sessions`). Every endpoint
//! but the OpenAPI document needs a valid token; a caller only ever sees and changes the
//! sessions of the token's subject, because every key is looked up under that subject.
//!
//! | method | path | answer |
//! |---|---|---|
//! | POST | `/create` | 201 `{sessionId, expiresAt}` |
//! | GET | `/user/sessions` | 200 `[Session]` |
//! | GET | `/{sessionId}` | 200 `Session`, 404 |
//! | POST | `/{sessionId}/extend` | 200 `{sessionId, expiresAt}`, 404 |
//! | DELETE | `/{sessionId}` | 200, 404 |
//! | DELETE | `/user/sessions` | 200, every session of the caller's ended (sign out everywhere) |
//! | GET | `/openapi.json` | 200, the OpenAPI 3 document |

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};
use tower::Service;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::error::{json_response, Rejection};
use crate::facts::RequestFacts;
use crate::metrics::Metrics;
use crate::routes::normalise;
use crate::session::{
    Created, Metadata, Opened, Platform, Sessions, MAX_DEVICE_ID, MAX_USER_AGENT,
};
use crate::store::StoreError;
use crate::{Body, BoxResponse};

/// Largest request body the API reads.
pub const MAX_API_BODY: usize = 16 * 1024;

/// The OpenAPI document, written for the default prefix.
const OPENAPI: &str = include_str!("openapi.json");
const DEFAULT_PREFIX: &str = "/api/v1/sessions";

#[derive(Clone)]
pub struct SessionApi {
    sessions: Arc<Sessions>,
    metrics: Arc<Metrics>,
    prefix: Arc<str>,
    openapi: Bytes,
    /// `jwt.leeway`, in seconds: how far a token issuer's clock may run behind Redis' when a
    /// token's issue time is compared with a sign-out.
    clock_skew: u64,
}

impl SessionApi {
    pub fn new(
        sessions: Arc<Sessions>,
        prefix: &str,
        metrics: Arc<Metrics>,
        clock_skew: Duration,
    ) -> Self {
        let openapi = OPENAPI.replace(DEFAULT_PREFIX, prefix);
        SessionApi {
            sessions,
            metrics,
            prefix: prefix.into(),
            openapi: Bytes::from(openapi),
            clock_skew: clock_skew.as_secs(),
        }
    }
}

#[derive(Serialize)]
struct Success<T: Serialize> {
    success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<T>,
}

fn success<T: Serialize>(status: StatusCode, data: Option<T>) -> Response<Body> {
    match serde_json::to_vec(&Success {
        success: true,
        data,
    }) {
        Ok(body) => json_response(status, body),
        Err(_) => Rejection::StoreUnavailable.into_response(),
    }
}

/// The answer to signing out everywhere.
#[derive(Serialize)]
struct DestroyedAll {
    /// How many live sessions ended.
    destroyed: usize,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    #[serde(default, deserialize_with = "object_or_null")]
    metadata: Option<MetadataInput>,
}

/// A JSON object (or null) only: serde would also read a struct from an array of its fields in
/// order, which no client means to send.
fn object_or_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Object<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Object<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }
    deserializer.deserialize_any(Object(std::marker::PhantomData))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MetadataInput {
    platform: Option<Platform>,
    user_agent: Option<String>,
    /// Accepted for compatibility, whatever its value, and ignored: the address is the
    /// connection's.
    #[allow(dead_code)]
    ip_address: Option<serde::de::IgnoredAny>,
    device_id: Option<String>,
}

/// Routes within the API, after the prefix.
enum Endpoint {
    OpenApi,
    Create,
    List,
    One(String),
    Extend(String),
    Unknown,
}

impl Endpoint {
    /// The methods it answers, for the Allow header a 405 must carry (RFC 9110 15.5.6); the
    /// arms of [`SessionApi::answer`] in one line each.
    fn allow(&self) -> Option<&'static str> {
        match self {
            Endpoint::OpenApi => Some("GET, HEAD"),
            Endpoint::Create | Endpoint::Extend(_) => Some("POST"),
            Endpoint::List => Some("GET, HEAD, DELETE"),
            Endpoint::One(_) => Some("GET, HEAD, DELETE"),
            Endpoint::Unknown => None,
        }
    }
}

fn endpoint(rest: &str) -> Endpoint {
    let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match parts.as_slice() {
        ["openapi.json"] => Endpoint::OpenApi,
        ["create"] => Endpoint::Create,
        ["user", "sessions"] => Endpoint::List,
        [id] => Endpoint::One((*id).to_string()),
        [id, "extend"] => Endpoint::Extend((*id).to_string()),
        _ => Endpoint::Unknown,
    }
}

fn session_id(raw: &str) -> Result<Uuid, Rejection> {
    Uuid::parse_str(raw).map_err(|_| Rejection::InvalidSessionId(raw.chars().take(64).collect()))
}

/// A change (create, extend, destroy, sign out everywhere) that failed. One the store was sent
/// and did not answer in time may still be made once Redis catches up: the caller hears so,
/// and the audit trail keeps the change's name, user and session.
fn change_failed(
    e: StoreError,
    change: &'static str,
    user_id: &str,
    session_id: Option<Uuid>,
    client_ip: Option<std::net::IpAddr>,
) -> Rejection {
    if !matches!(e, StoreError::Timeout(_)) {
        return store_failed(e);
    }
    tracing::warn!(error = %e, change, "session API: change unconfirmed");
    tracing::info!(
        target: "audit",
        event = "session_change_unconfirmed",
        change,
        user_id,
        session_id = session_id.map(tracing::field::display),
        client_ip = client_ip.map(tracing::field::display),
        "session change unconfirmed"
    );
    Rejection::ChangeUnconfirmed
}

/// What the caller hears when the store answered a call with an error.
fn store_failed(e: StoreError) -> Rejection {
    match e {
        StoreError::SignedOut => return Rejection::SignedOut,
        StoreError::SessionEnded => return Rejection::SessionInvalid,
        _ => {}
    }
    tracing::warn!(error = %e, "session API: store failed");
    Rejection::StoreUnavailable
}

impl SessionApi {
    async fn handle(self, req: Request<Body>) -> Response<Body> {
        let path = normalise(req.uri().path());
        let rest = path.strip_prefix(&*self.prefix).unwrap_or("");
        let endpoint = endpoint(rest);
        let allow = endpoint.allow();
        match self.answer(endpoint, req).await {
            Ok(response) => response,
            Err(Rejection::MethodNotAllowed) => {
                let mut response = Rejection::MethodNotAllowed.into_response();
                if let Some(allow) = allow {
                    response
                        .headers_mut()
                        .insert(header::ALLOW, HeaderValue::from_static(allow));
                }
                response
            }
            Err(rejection) => rejection.into_response(),
        }
    }

    async fn answer(
        self,
        endpoint: Endpoint,
        req: Request<Body>,
    ) -> Result<Response<Body>, Rejection> {
        let method = req.method().clone();

        if let Endpoint::OpenApi = endpoint {
            return match method {
                Method::GET | Method::HEAD => {
                    Ok(json_response(StatusCode::OK, self.openapi.to_vec()))
                }
                _ => Err(Rejection::MethodNotAllowed),
            };
        }
        let facts = RequestFacts::of(&req);
        let who = facts.who.clone().ok_or(Rejection::TokenMissing)?;
        let client_ip = facts.client_ip;
        let user = &*who.user_id;
        let sessions = &self.sessions;
        // Every store call below checks the caller's token in its own script, so that the
        // checks cost no round trip and are one step with what the call does:
        // - a token bound to a session (its `sid` claim) dies with it: once the session is
        //   destroyed or expired, the token can neither manage the user's other sessions nor
        //   open a new one (`SESSION_INVALID`, whatever else holds);
        // - a token issued before the user signed out everywhere can do nothing here: not list
        //   the sessions opened since, nor end them, nor sign the user out again, nor open one.
        let bound_to = match (who.bound_to_session, &who.session_hint) {
            (true, Some(bound)) => {
                Some(Uuid::parse_str(bound).map_err(|_| Rejection::SessionInvalid)?)
            }
            _ => None,
        };
        let check = super::TokenCheck {
            bound_to,
            issued_by: who.issued_at.map(|t| t.saturating_add(self.clock_skew)),
        };
        match (endpoint, method) {
            (Endpoint::Create, Method::POST) => {
                let metadata = create_metadata(req).await?;
                let id = Uuid::new_v4();
                let Opened { created, evicted } = sessions
                    .create(user, id, &metadata, check)
                    .await
                    .map_err(|e| change_failed(e, "create", user, Some(id), client_ip))?;
                self.metrics.sessions_created.inc();
                for old in evicted {
                    self.metrics.sessions_evicted.inc();
                    audit(
                        "session_evicted",
                        user,
                        old.session_id,
                        old.metadata.platform,
                        client_ip,
                    );
                }
                audit(
                    "session_created",
                    user,
                    created.session_id,
                    metadata.platform,
                    client_ip,
                );
                Ok(success(StatusCode::CREATED, Some(created)))
            }
            // HEAD as GET (RFC 9110 9.1); the server leaves the content out of the answer.
            (Endpoint::List, Method::GET | Method::HEAD) => {
                let list = sessions.list(user, check).await.map_err(store_failed)?;
                Ok(success(StatusCode::OK, Some(list)))
            }
            // Signing out everywhere: every session of the caller's, this one included.
            (Endpoint::List, Method::DELETE) => {
                // Remembered at least as long as the token that signs out is good: a stolen token
                // issued with it lives about as long.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let token_left = who
                    .expires_at
                    .saturating_sub(now)
                    .saturating_add(self.clock_skew);
                let destroyed = sessions
                    .destroy_all(user, Duration::from_secs(token_left), check)
                    .await
                    .map_err(|e| change_failed(e, "sign_out_everywhere", user, None, client_ip))?;
                for session in &destroyed {
                    self.metrics.sessions_destroyed.inc();
                    audit(
                        "session_destroyed",
                        user,
                        session.session_id,
                        session.metadata.platform,
                        client_ip,
                    );
                }
                Ok(success(
                    StatusCode::OK,
                    Some(DestroyedAll {
                        destroyed: destroyed.len(),
                    }),
                ))
            }
            (Endpoint::One(id), Method::GET | Method::HEAD) => {
                let id = session_id(&id)?;
                match sessions.get(user, id, check).await.map_err(store_failed)? {
                    Some(session) => Ok(success(StatusCode::OK, Some(session))),
                    None => Err(Rejection::SessionNotFound),
                }
            }
            (Endpoint::Extend(id), Method::POST) => {
                let id = session_id(&id)?;
                match sessions
                    .extend(user, id, check)
                    .await
                    .map_err(|e| change_failed(e, "extend", user, Some(id), client_ip))?
                {
                    Some(session) => {
                        self.metrics.sessions_extended.inc();
                        audit(
                            "session_extended",
                            user,
                            id,
                            session.metadata.platform,
                            client_ip,
                        );
                        Ok(success(
                            StatusCode::OK,
                            Some(Created {
                                session_id: id,
                                expires_at: session.expires_at,
                            }),
                        ))
                    }
                    None => Err(Rejection::SessionNotFound),
                }
            }
            (Endpoint::One(id), Method::DELETE) => {
                let id = session_id(&id)?;
                match sessions
                    .destroy(user, id, check)
                    .await
                    .map_err(|e| change_failed(e, "destroy", user, Some(id), client_ip))?
                {
                    Some(metadata) => {
                        self.metrics.sessions_destroyed.inc();
                        audit("session_destroyed", user, id, metadata.platform, client_ip);
                        Ok(success::<()>(StatusCode::OK, None))
                    }
                    None => Err(Rejection::SessionNotFound),
                }
            }
            (Endpoint::Unknown, _) => Err(Rejection::NotFound),
            _ => Err(Rejection::MethodNotAllowed),
        }
    }
}

/// One audit event (tracing target `audit`) for a change to a session. Never a token.
fn audit(
    event: &'static str,
    user_id: &str,
    session_id: Uuid,
    platform: Platform,
    client_ip: Option<std::net::IpAddr>,
) {
    tracing::info!(
        target: "audit",
        event,
        user_id,
        session_id = %session_id,
        platform = platform.as_str(),
        client_ip = client_ip.map(tracing::field::display),
        "session {}",
        event.trim_start_matches("session_")
    );
}

/// A request body, read whole (at most [`MAX_API_BODY`]).
async fn read_body(body: Body) -> Result<Bytes, Rejection> {
    let collected = Limited::new(body, MAX_API_BODY).collect().await;
    collected.map(|c| c.to_bytes()).map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            Rejection::PayloadTooLarge(MAX_API_BODY as u64)
        } else {
            Rejection::of_request_body(&*e)
        }
    })
}

/// Reads and checks the create body: platform from the body, else detected from the
/// User-Agent; userAgent from the body, else the header; ipAddress always the client's.
async fn create_metadata(req: Request<Body>) -> Result<Metadata, Rejection> {
    // A header may carry a tab or UTF-8 C1 controls (a terminal's escape introducer): they
    // are dropped, as the body's userAgent may not hold them either.
    let header_ua = req.headers().get(header::USER_AGENT).map(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .chars()
            .filter(|c| !c.is_control())
            .collect::<String>()
    });
    let ip = RequestFacts::of(&req).client_ip;
    let body = read_body(req.into_body()).await?;
    let input = parse_create(&body)?;
    let input = input.metadata.unwrap_or_default();

    let user_agent = match input.user_agent {
        // Control characters are refused as in deviceId: both are listed back and logged.
        Some(ua) if ua.len() > MAX_USER_AGENT || ua.chars().any(char::is_control) => {
            return Err(Rejection::BadRequest(format!(
                "metadata.userAgent must be at most {MAX_USER_AGENT} bytes without control characters"
            )))
        }
        Some(ua) => Some(ua),
        None => header_ua.map(|ua| truncate(ua, MAX_USER_AGENT)),
    }
    .filter(|ua| !ua.is_empty());
    if let Some(device) = &input.device_id {
        if device.is_empty()
            || device.len() > MAX_DEVICE_ID
            || device.chars().any(|c| c == '|' || c.is_control())
        {
            return Err(Rejection::BadRequest(format!(
                "metadata.deviceId must be 1 to {MAX_DEVICE_ID} bytes without '|' or control characters"
            )));
        }
    }
    let platform = input
        .platform
        .unwrap_or_else(|| Platform::detect(user_agent.as_deref().unwrap_or("")));
    Ok(Metadata {
        platform,
        user_agent,
        ip_address: ip,
        device_id: input.device_id,
    })
}

/// The create body: empty, or exactly one JSON object.
fn parse_create(body: &[u8]) -> Result<CreateRequest, Rejection> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => return Ok(CreateRequest::default()),
        Some(b'{') => {}
        Some(_) => {
            return Err(Rejection::BadRequest(
                "the body must be a JSON object like {\"metadata\":{...}}".into(),
            ))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let input = serde_path_to_error::deserialize::<_, CreateRequest>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Rejection::BadRequest(format!("invalid JSON body: {inner}"))
        } else {
            Rejection::BadRequest(format!("invalid JSON body at {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| Rejection::BadRequest(format!("invalid JSON body: {e}")))?;
    Ok(input)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

impl Service<Request<Body>> for SessionApi {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxResponse<Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let api = self.clone();
        Box::pin(async move {
            // A body the call reads (a create's) is read first, here: a client that stalls
            // mid-body is dropped with its connection (at `idle_timeout`), as any stalled
            // upload is. Other calls read none, whatever a client sends.
            let reads_body = req.method() == Method::POST;
            let req = if !reads_body || http_body::Body::is_end_stream(req.body()) {
                req
            } else {
                let (parts, body) = req.into_parts();
                match read_body(body).await {
                    Ok(bytes) => Request::from_parts(parts, Body::new(Full::new(bytes))),
                    Err(rejection) => return Ok(rejection.into_response()),
                }
            };
            // Then the call runs in a task of its own, so that a client that goes away mid-call
            // (an HTTP/2 stream reset, a closed connection) drops only the wait for its answer.
            // A write already sent to Redis may still happen, and what follows it must too: the
            // audit event, and forgetting the user's cached sessions (this process hears no
            // invalidation of its own writes).
            let call = tokio::spawn(api.handle(req).in_current_span());
            Ok(match call.await {
                Ok(response) => response,
                Err(e) => match e.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    // Only when the runtime shuts down.
                    Err(_) => Rejection::StoreUnavailable.into_response(),
                },
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_document_is_valid_json() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    }

    #[test]
    fn create_body_must_be_one_object() {
        assert!(parse_create(b"").is_ok());
        assert!(parse_create(b" {} ").is_ok());
        assert!(parse_create(br#"{"metadata":{"platform":"web"}}"#).is_ok());
        assert!(parse_create(br#"{"metadata":null}"#).is_ok_and(|c| c.metadata.is_none()));
        // ipAddress is ignored, whatever it holds.
        for ignored in [&br#""10.0.0.1""#[..], b"1", b"{}", b"[1]", b"null"] {
            let body = [&br#"{"metadata":{"ipAddress":"#[..], ignored, b"}}"].concat();
            assert!(
                parse_create(&body).is_ok(),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
        for bad in [
            &b"[]"[..],
            b"{} {}",
            b"{}x",
            b"null",
            b"\"x\"",
            br#"{"metadata":{"platform":"xbox"}}"#,
            // A struct from an array of its fields, as serde would otherwise read it.
            br#"{"metadata":["ios","UA/1","9.9.9.9","devX"]}"#,
            br#"{"metadata":[]}"#,
            br#"{"metadata":"ios"}"#,
        ] {
            assert!(
                matches!(parse_create(bad), Err(Rejection::BadRequest(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A nested error still names where it is.
        let Err(Rejection::BadRequest(message)) =
            parse_create(br#"{"metadata":{"platform":"xbox"}}"#)
        else {
            panic!("refused")
        };
        assert!(message.contains("at metadata.platform"), "{message}");
        let Err(Rejection::BadRequest(message)) = parse_create(br#"{"metadata":[]}"#) else {
            panic!("refused")
        };
        assert!(message.contains("expected a JSON object"), "{message}");
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 5), "abc");
    }
}
