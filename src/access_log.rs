//! What happened to each request, told three ways: one access log line (method, path — never
//! the query, which may carry tokens — status, total and upstream time, client address, user,
//! rejection code), the request metrics, and for every request portcullis refused itself an
//! audit event (tracing target `audit`). Headers are never logged, so Authorization, Cookie
//! and tokens cannot leak.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response, Uri, Version};
use tower::{Layer, Service};

use crate::config::AuthMode;
use crate::error::Rejection;
use crate::facts::RequestFacts;
use crate::metrics::Metrics;
use crate::on_response::OnResponse;
use crate::routes::RouteClass;
use crate::Body;

#[derive(Clone)]
pub struct AccessLogLayer(pub Arc<Metrics>);

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AccessLog {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

fn class_name(class: Option<RouteClass>) -> &'static str {
    match class {
        Some(RouteClass::Api { .. }) => "api",
        Some(RouteClass::Proxy { auth, .. }) => match auth {
            AuthMode::Session => "session",
            AuthMode::Jwt => "jwt",
            AuthMode::None => "none",
        },
        Some(RouteClass::Invalid(_)) => "invalid",
        None => "unknown",
    }
}

impl<S> Service<Request<Body>> for AccessLog<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = OnResponse<S::Future, InFlight>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let facts = RequestFacts::of(&req);
        let in_flight = InFlight {
            started: Instant::now(),
            method: req.method().clone(),
            // A reference-counted copy: no allocation when nothing is logged.
            uri: req.uri().clone(),
            version: req.version(),
            client_ip: facts.client_ip,
            route_class: class_name(facts.route),
            metrics: self.metrics.clone(),
            finished: false,
        };
        OnResponse::new(self.inner.call(req), in_flight, InFlight::finish)
    }
}

/// What the log line needs from the request, kept until its response.
pub struct InFlight {
    started: Instant,
    method: Method,
    uri: Uri,
    version: Version,
    client_ip: Option<IpAddr>,
    route_class: &'static str,
    metrics: Arc<Metrics>,
    /// The response came and was logged; dropped before that, the request was abandoned.
    finished: bool,
}

/// The status an abandoned request is counted and logged with: nginx's "client closed
/// request", which log pipelines know.
const ABANDONED: u16 = 499;

impl Drop for InFlight {
    /// A request whose response never came: its client went away (an HTTP/1.x connection
    /// closed, an HTTP/2 stream reset), or the connection was closed under it at shutdown.
    fn drop(&mut self) {
        if !self.finished {
            self.record(ABANDONED, None, None, Some("ABANDONED"));
        }
    }
}

impl InFlight {
    /// Counts the request and writes its access line: the one place for both, whether the
    /// response came or the request was abandoned.
    fn record(
        &self,
        status: u16,
        upstream: Option<std::time::Duration>,
        user_id: Option<&str>,
        code: Option<&'static str>,
    ) {
        let elapsed = self.started.elapsed();
        self.metrics
            .observe_request(self.route_class, status, elapsed);
        tracing::info!(
            target: "portcullis::access",
            method = %self.method,
            path = %self.uri.path(),
            version = ?self.version,
            status,
            route_class = self.route_class,
            total_ms = elapsed.as_secs_f64() * 1000.0,
            upstream_ms = upstream.map(|u| u.as_secs_f64() * 1000.0),
            client_ip = self.client_ip.map(tracing::field::display),
            user_id,
            code,
            "request"
        );
    }

    fn finish(mut self, response: &mut Response<Body>) {
        self.finished = true;
        let status = response.status().as_u16();
        let facts = RequestFacts::on(response);
        let upstream = facts.upstream_time;
        let rejection = response.extensions().get::<Rejection>();
        let who = facts.who.as_ref();
        let identity = facts.identity.as_ref();
        let user_id = who.map(|w| &*w.user_id);

        self.record(status, upstream, user_id, rejection.map(Rejection::code));
        if let Some(upstream) = upstream {
            self.metrics
                .upstream_duration
                .observe(upstream.as_secs_f64());
        }
        if let Some(rejection) = rejection {
            self.metrics.rejected(rejection);
            // A hint (the client's X-Session-Id, or a token's `sid`) is logged only as the
            // session id it names: the audit trail carries no caller-chosen text.
            let session_id = identity.and_then(|i| i.session_id).or_else(|| {
                who.and_then(|w| w.session_hint.as_deref())
                    .and_then(|hint| uuid::Uuid::try_parse(hint).ok())
            });
            let platform = identity.and_then(|i| i.platform).map(|p| p.as_str());
            tracing::info!(
                target: "audit",
                event = "request_rejected",
                reason = crate::metrics::rejection_reason(rejection),
                code = rejection.code(),
                status,
                method = %self.method,
                path = %self.uri.path(),
                user_id,
                session_id = session_id.map(tracing::field::display),
                client_ip = self.client_ip.map(tracing::field::display),
                platform,
                "request rejected"
            );
        }
    }
}
