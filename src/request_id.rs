//! Request ids: an incoming `X-Request-Id` is kept when well-formed (1 to 128 characters of
//! letters, digits and `-_.:+/=`), else a new UUID v4 is made. The id goes to the upstream,
//! back to the client, and onto every log line of the request (a tracing span around it).

use std::convert::Infallible;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::instrument::{Instrument, Instrumented};

use crate::on_response::OnResponse;
use crate::Body;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// True for ids worth keeping: short, and safe in logs and headers.
pub fn well_formed(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(b))
}

fn generate() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[derive(Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

#[derive(Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for RequestIdService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Instrumented<OnResponse<S::Future, HeaderValue>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let id = match req.headers().get(&X_REQUEST_ID) {
            Some(v)
                if well_formed(v) && req.headers().get_all(&X_REQUEST_ID).iter().count() == 1 =>
            {
                v.clone()
            }
            _ => generate(),
        };
        // The upstream reads the id from the header and log lines from the span; nothing needs
        // an extension copy, which would cost an allocation and grow the extension map. A map
        // already as full as a header map can be (an HTTP/2 request of some 24,000 fields,
        // which a raised `max_header_bytes` lets through) cannot take it: the head limit
        // refuses that request a few layers in, and the response still carries the id.
        let _ = req
            .headers_mut()
            .try_insert(X_REQUEST_ID.clone(), id.clone());
        let span = tracing::info_span!(
            "request",
            request_id = %String::from_utf8_lossy(id.as_bytes())
        );
        let future = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        OnResponse::new(future, id, |id, response| {
            response.headers_mut().insert(X_REQUEST_ID.clone(), id);
        })
        .instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_safe_ids_are_kept() {
        assert!(well_formed(&HeaderValue::from_static("abc-123_x.y:z")));
        assert!(well_formed(&HeaderValue::from_static(
            "0a1b2c3d-0000-4000-8000-000000000000"
        )));
        assert!(!well_formed(&HeaderValue::from_static("")));
        assert!(!well_formed(&HeaderValue::from_static("has space")));
        assert!(!well_formed(&HeaderValue::from_static("quote\"")));
        assert!(!well_formed(
            &HeaderValue::from_str(&"a".repeat(129)).unwrap()
        ));
    }

    #[test]
    fn generated_ids_are_well_formed() {
        assert!(well_formed(&generate()));
    }
}
