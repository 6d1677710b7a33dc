//! The admin listener, plain HTTP and separate from the public port: `GET /healthz` (the process
//! is alive) and `GET /readyz` (it should get traffic: 200, or 503 naming each check that failed).

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::error::{error_response, json_response};
use crate::Body;

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// What `/readyz` consults: a shutdown flag plus named asynchronous checks (Redis, ...).
#[derive(Default, Clone)]
pub struct Readiness {
    draining: Arc<AtomicBool>,
    checks: Vec<(&'static str, CheckFn)>,
}

#[derive(Serialize)]
struct ReadyBody {
    ready: bool,
    checks: BTreeMap<&'static str, String>,
}

impl Readiness {
    /// Adds a named check; it passes with `Ok(())` and fails with a reason.
    pub fn add_check<F, Fut>(&mut self, name: &'static str, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks
            .push((name, Arc::new(move || Box::pin(check()) as CheckFuture)));
    }

    /// From now on `/readyz` answers 503, so load balancers stop sending before the listener closes.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    async fn report(&self) -> (StatusCode, Vec<u8>) {
        let mut checks = BTreeMap::new();
        let mut ready = true;
        if self.draining.load(Ordering::SeqCst) {
            ready = false;
            checks.insert("shutdown", "shutting down".to_string());
        } else {
            checks.insert("shutdown", "ok".to_string());
        }
        for (name, check) in &self.checks {
            let outcome = match check().await {
                Ok(()) => "ok".to_string(),
                Err(reason) => {
                    ready = false;
                    reason
                }
            };
            checks.insert(name, outcome);
        }
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = serde_json::to_vec(&ReadyBody { ready, checks }).unwrap_or_default();
        (status, body)
    }
}

/// Most connections the admin listener keeps open at once; a new one closes the oldest.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Extra admin endpoints contributed by other modules (e.g. `/metrics`).
pub type AdminRoute = Arc<dyn Fn() -> Response<Body> + Send + Sync>;

#[derive(Clone, Default)]
pub struct Admin {
    pub readiness: Readiness,
    pub routes: Vec<(&'static str, AdminRoute)>,
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut response = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "the admin endpoints answer GET and HEAD only",
            );
            // RFC 9110 15.5.6: a 405 lists what the resource does answer.
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match req.uri().path() {
            "/healthz" => json_response(StatusCode::OK, br#"{"alive":true}"#.to_vec()),
            "/readyz" => {
                let (status, body) = self.readiness.report().await;
                json_response(status, body)
            }
            path => match self.routes.iter().find(|(p, _)| *p == path) {
                Some((_, route)) => route(),
                None => error_response(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint"),
            },
        }
    }

    /// Serves until `stop` turns true.
    pub async fn serve(self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let admin = Arc::new(self);
        // Probes and scrapes need a handful. Past this many the oldest connection is closed, so
        // that the admin port cannot use up the file descriptors the public one needs, and a
        // new connection (the kubelet's next probe) is always served: refusing new ones would
        // let anyone who holds 64 open fail the pod's probes.
        let mut open: VecDeque<AbortHandle> = VecDeque::new();
        loop {
            let (stream, _) = tokio::select! {
                _ = async { stop.wait_for(|s| *s).await.is_ok() } => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            open.retain(|task| !task.is_finished());
            if open.len() >= MAX_ADMIN_CONNECTIONS {
                if let Some(oldest) = open.pop_front() {
                    tracing::debug!(
                        "{MAX_ADMIN_CONNECTIONS} admin connections open; closing the oldest"
                    );
                    oldest.abort();
                }
            }
            let admin = admin.clone();
            let task = tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10));
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            open.push_back(task.abort_handle());
        }
    }
}
