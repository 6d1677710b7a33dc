//! Cross-origin requests from browser game clients (CORS), when `[cors] allowed_origins` names
//! some.
//!
//! A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered here,
//! before authentication: browsers send it without credentials, so a protected route would
//! refuse it and the page could never make the real request. Responses to an allowed origin
//! carry `Access-Control-Allow-Origin` (and what else the policy says), replacing whatever CORS
//! answer the upstream gave: one policy, portcullis', holds for every route. Requests without
//! `Origin` (game clients that are not browsers) pass untouched.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use smallvec::SmallVec;
use tower::{Layer, Service};

use crate::config::CorsConfig;
use crate::error::Rejection;
use crate::on_response::OnResponse;
use crate::Body;

static PREFLIGHT_VARY: HeaderValue = HeaderValue::from_static(
    "origin, access-control-request-method, access-control-request-headers",
);

#[derive(Clone)]
pub struct CorsLayer(pub Arc<CorsConfig>);

impl<S> Layer<S> for CorsLayer {
    type Service = Cors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cors {
            inner,
            policy: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Cors<S> {
    inner: S,
    policy: Arc<CorsConfig>,
}

impl CorsConfig {
    fn allows(&self, origin: &HeaderValue) -> bool {
        match &self.origins {
            None => true,
            Some(origins) => origins
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes())),
        }
    }

    /// The answer to a preflight from an allowed origin.
    fn preflight(&self, origin: HeaderValue) -> Response<Body> {
        let mut response = Response::new(Body::new(http_body_util::Empty::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, self.headers.clone());
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        headers.insert(header::VARY, PREFLIGHT_VARY.clone());
        response
    }

    /// Marks a response to an allowed origin as readable by its page.
    fn allow(&self, origin: HeaderValue, headers: &mut HeaderMap) {
        remove_cors_headers(headers);
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if let Some(expose) = &self.expose {
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        // The answer differs by Origin: caches must not hand it to another page.
        headers.append(header::VARY, HeaderValue::from_static("origin"));
    }
}

/// Removes the upstream's own CORS answer: it would contradict portcullis' policy.
fn remove_cors_headers(headers: &mut HeaderMap) {
    let theirs: SmallVec<[HeaderName; 2]> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in &theirs {
        headers.remove(name);
    }
}

/// The origin a response is for, and the policy that allows it; `None` for a response that
/// only says it depends on `Origin`.
type Allowed = Option<(HeaderValue, Arc<CorsConfig>)>;

impl<S> Cors<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    /// Passes the request on; its response carries no CORS permission (not even one the
    /// upstream gave: portcullis' policy is the only one) and says that another `Origin` could
    /// get another answer, so that a shared cache does not hand it to a page it would not allow.
    fn vary_only(&mut self, req: Request<Body>) -> OnResponse<S::Future, Allowed> {
        OnResponse::new(self.inner.call(req), None, |_, response| {
            let headers = response.headers_mut();
            remove_cors_headers(headers);
            headers.append(header::VARY, HeaderValue::from_static("origin"));
        })
    }
}

impl<S> Service<Request<Body>> for Cors<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<
        std::future::Ready<Result<Response<Body>, S::Error>>,
        OnResponse<S::Future, Allowed>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(origin) = req.headers().get(header::ORIGIN).cloned() else {
            return Either::Right(self.vary_only(req));
        };
        let allowed = self.policy.allows(&origin);
        let preflight = req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            let response = if allowed {
                self.policy.preflight(origin)
            } else {
                // Varies like the allowed answer: a cache must not serve this refusal to an
                // allowed origin, nor the other way round.
                let mut refused = Rejection::OriginNotAllowed.into_response();
                refused
                    .headers_mut()
                    .insert(header::VARY, PREFLIGHT_VARY.clone());
                refused
            };
            return Either::Left(std::future::ready(Ok(response)));
        }
        if !allowed {
            // Answered as ever; the browser keeps the answer from the page.
            return Either::Right(self.vary_only(req));
        }
        Either::Right(OnResponse::new(
            self.inner.call(req),
            Some((origin, self.policy.clone())),
            |allowed, response| {
                if let Some((origin, policy)) = allowed {
                    policy.allow(origin, response.headers_mut());
                }
            },
        ))
    }
}
