//! Every way a request can be refused, and the one place that turns each into a response.
//!
//! A failure is classified by whose fault it is (client 4xx, upstream 502/504, ours 503) and
//! carries a stable machine-readable `code`. Clients always get the same JSON envelope:
//! `{"success":false,"error":{"code":"...","message":"..."}}`.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::Body;

/// A request that portcullis answers itself instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the upstream could not be reached, or gave no answer that can be passed on")]
    UpstreamUnavailable,
    #[error("the upstream did not answer within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    #[error("portcullis holds as many upstream connections as upstream.max_connections allows, and none came free in time")]
    UpstreamBusy,
    #[error("the request body exceeds the limit of {0} bytes")]
    PayloadTooLarge(u64),
    #[error("the request headers exceed the limit of {0} bytes or 100 header lines")]
    HeadersTooLarge(usize),
    #[error("{0}")]
    BadRequest(String),
    #[error("{}", .0.message())]
    InvalidPath(crate::routes::PathError),
    #[error("{0}")]
    Malformed(&'static str),
    #[error("the request uses a transfer coding other than chunked")]
    TransferCodingUnsupported,
    #[error("CONNECT is not supported: portcullis opens no tunnels to where a client names")]
    ConnectUnsupported,
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed for this endpoint")]
    MethodNotAllowed,
    #[error("this endpoint needs a bearer token in the Authorization header")]
    TokenMissing,
    #[error("the bearer token is malformed, badly signed, or not valid at this time")]
    TokenInvalid,
    #[error("the bearer token has expired")]
    TokenExpired,
    /// Deliberately one message for missing, expired, destroyed and foreign sessions, so that
    /// session ids cannot be probed.
    #[error("no live session for this token")]
    SessionInvalid,
    #[error("the user signed out everywhere after this token was issued; sign in again")]
    SignedOut,
    #[error("the session store is unavailable; try again shortly")]
    StoreUnavailable,
    /// A change was sent to the store, which did not answer in time: it may still be made.
    #[error("the session store did not confirm the change in time; it may still take effect")]
    ChangeUnconfirmed,
    #[error("no such session")]
    SessionNotFound,
    #[error("{0:?} is not a session id (a UUID)")]
    InvalidSessionId(String),
    #[error("too many requests; retry after the number of seconds in Retry-After")]
    RateLimited,
    #[error("this origin may not make cross-origin requests here (cors.allowed_origins)")]
    OriginNotAllowed,
    #[error("no byte of the request body came for server.idle_timeout")]
    BodyStalled,
}

/// The error a request body gives when it moved no byte for `server.idle_timeout` while it was
/// being read: the client's doing, answered with 408 [`Rejection::BodyStalled`].
#[derive(Debug, thiserror::Error)]
#[error("no byte of the request body came for {0:?} (server.idle_timeout)")]
pub struct BodyStalled(pub std::time::Duration);

impl Rejection {
    /// The answer when reading a client's request body failed, whoever was reading it (the
    /// forwarder, the session API): its own framing broken, a stall, or a break-off (its
    /// connection reset, or, over HTTP/2, its stream). Each is the client's doing.
    pub fn of_request_body(error: &(dyn std::error::Error + 'static)) -> Rejection {
        if source_chain_has::<crate::h1::FramingError>(error) {
            Rejection::Malformed("the request body is malformed")
        } else if source_chain_has::<BodyStalled>(error) {
            Rejection::BodyStalled
        } else {
            Rejection::Malformed("the request body broke off before its end")
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Rejection::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Rejection::UpstreamBusy => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Rejection::BadRequest(_) | Rejection::InvalidPath(_) | Rejection::Malformed(_) => {
                StatusCode::BAD_REQUEST
            }
            Rejection::TransferCodingUnsupported | Rejection::ConnectUnsupported => {
                StatusCode::NOT_IMPLEMENTED
            }
            Rejection::NotFound => StatusCode::NOT_FOUND,
            Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::TokenMissing
            | Rejection::TokenInvalid
            | Rejection::TokenExpired
            | Rejection::SessionInvalid
            | Rejection::SignedOut => StatusCode::UNAUTHORIZED,
            Rejection::StoreUnavailable | Rejection::ChangeUnconfirmed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Rejection::SessionNotFound => StatusCode::NOT_FOUND,
            Rejection::InvalidSessionId(_) => StatusCode::BAD_REQUEST,
            Rejection::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Rejection::OriginNotAllowed => StatusCode::FORBIDDEN,
            Rejection::BodyStalled => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The stable code clients can switch on. Never change one once released.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            Rejection::UpstreamTimeout(_) => "UPSTREAM_TIMEOUT",
            Rejection::UpstreamBusy => "UPSTREAM_BUSY",
            Rejection::PayloadTooLarge(_) => "PAYLOAD_TOO_LARGE",
            Rejection::HeadersTooLarge(_) => "HEADERS_TOO_LARGE",
            Rejection::BadRequest(_) => "BAD_REQUEST",
            Rejection::InvalidPath(_) => "INVALID_PATH",
            Rejection::Malformed(_) => "MALFORMED_REQUEST",
            Rejection::TransferCodingUnsupported => "TRANSFER_CODING_UNSUPPORTED",
            Rejection::ConnectUnsupported => "METHOD_NOT_SUPPORTED",
            Rejection::NotFound => "NOT_FOUND",
            Rejection::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Rejection::TokenMissing => "TOKEN_MISSING",
            Rejection::TokenInvalid => "TOKEN_INVALID",
            Rejection::TokenExpired => "TOKEN_EXPIRED",
            Rejection::SessionInvalid => "SESSION_INVALID",
            Rejection::SignedOut => "SIGNED_OUT",
            Rejection::StoreUnavailable | Rejection::ChangeUnconfirmed => {
                "SESSION_STORE_UNAVAILABLE"
            }
            Rejection::SessionNotFound => "SESSION_NOT_FOUND",
            Rejection::InvalidSessionId(_) => "INVALID_SESSION_ID",
            Rejection::RateLimited => "RATE_LIMITED",
            Rejection::OriginNotAllowed => "ORIGIN_NOT_ALLOWED",
            Rejection::BodyStalled => "REQUEST_TIMEOUT",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut response = error_response(self.status(), self.code(), &self.to_string());
        // RFC 6750 section 3: a bare challenge when no token came, invalid_token for a bad one.
        let challenge = match self {
            Rejection::TokenMissing => Some("Bearer"),
            // A revoked or unknown session makes the token unusable: invalid_token as well.
            Rejection::TokenInvalid
            | Rejection::TokenExpired
            | Rejection::SessionInvalid
            | Rejection::SignedOut => Some(r#"Bearer error="invalid_token""#),
            _ => None,
        };
        if let Some(challenge) = challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response.extensions_mut().insert(self);
        response
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    success: bool,
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

/// Builds the JSON error envelope. Used by [`Rejection::into_response`] and by the admin listener.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::to_vec(&Envelope {
        success: false,
        error: ErrorBody { code, message },
    })
    .unwrap_or_default();
    json_response(status, body)
}

/// A JSON response with the given status and serialised body.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A fixed body, boxed to the crate's body type.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::new(Full::new(bytes.into()))
}

/// Whether `error`, or any error it came from, is an `E`.
pub(crate) fn source_chain_has<E: std::error::Error + 'static>(
    error: &(dyn std::error::Error + 'static),
) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if e.is::<E>() {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn envelope_has_the_documented_shape() {
        let response = Rejection::UpstreamUnavailable.into_response();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["success"], false);
        assert_eq!(json["error"]["code"], "UPSTREAM_UNAVAILABLE");
        assert!(json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream"));
    }
}
