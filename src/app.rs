//! The table of contents: the tower stack every public request passes through, outermost first,
//! and the process that runs it (public listener, admin listener, background tasks, signals).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::util::BoxCloneService;
use tower::ServiceBuilder;

use crate::access_log::AccessLogLayer;
use crate::admin::Admin;
use crate::authn::{AuthnLayer, RequireAuthLayer, Verifier};
use crate::config::Config;
use crate::cors::CorsLayer;
use crate::error::full;
use crate::forward::{Forward, Upstream};
use crate::limits::RequestLimitsLayer;
use crate::metrics::Metrics;
use crate::peer::{ClientIpLayer, TrustedProxies};
use crate::rate_limit::{RateLimitLayer, RateLimits};
use crate::request_id::RequestIdLayer;
use crate::routes::{RouteTable, RouterLayer, Split};
use crate::server::{ConnCounts, ConnLimits};
use crate::session::api::SessionApi;
use crate::session::cache::SessionCache;
use crate::session::gate::SessionGateLayer;
use crate::session::tunnels::TunnelWatch;
use crate::session::{Invalidations, Sessions};
use crate::store::{Store, StoreError, Tracking};
use crate::tls::{self, CertStore};
use crate::{Body, BoxError};

/// The request pipeline as one cloneable service.
pub type AppService = BoxCloneService<Request<Body>, Response<Body>, Infallible>;

/// How to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// SIGTERM: `/readyz` turns 503 for `server.shutdown_delay`, then the listener closes and
    /// in-flight requests get `server.shutdown_grace`.
    Graceful,
    /// SIGINT, or a test: close the listener at once, then drain as above.
    Prompt,
}

impl From<()> for Shutdown {
    fn from(_: ()) -> Self {
        Shutdown::Prompt
    }
}

/// Everything built from the configuration that requests share.
pub struct App {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub upstream: Arc<Upstream>,
    pub certs: Option<Arc<CertStore>>,
    pub connections: Arc<ConnCounts>,
    pub store: Store,
    pub sessions: Arc<Sessions>,
    pub verifier: Arc<Verifier>,
    pub routes: Arc<RouteTable>,
    pub trusted: Arc<TrustedProxies>,
    pub rate_limits: Arc<RateLimits>,
}

impl App {
    /// Builds the shared state; fails on anything that must be right before serving (TLS files).
    pub fn build(config: Config) -> Result<App, BoxError> {
        let metrics = Arc::new(Metrics::new());
        let trusted = TrustedProxies::new(config.server.trusted_proxies.clone());
        let upstream = Upstream::new(
            &config.upstream,
            config.server.max_body_bytes,
            trusted.clone(),
            config.identity.clone(),
            metrics.upstream_pool.clone(),
        );
        let cache = config
            .session
            .local_cache
            .map(|max| Arc::new(SessionCache::new(max)));
        let tunnels = Arc::new(TunnelWatch::default());
        let tracking = cache.clone().map(|cache| {
            Arc::new(Invalidations {
                cache,
                tunnels: tunnels.clone(),
            }) as Arc<dyn Tracking>
        });
        let store = Store::new(&config.redis, metrics.clone(), tracking)?;
        let sessions = Sessions::new(
            store.clone(),
            &config.session,
            cache,
            tunnels,
            metrics.clone(),
        );
        let verifier = Verifier::new(
            &config.jwt,
            metrics.tokens_verified_with_previous_key.clone(),
        )?;
        let routes = RouteTable::new(&config.session.api_prefix, &config.routes);
        let rate_limits = RateLimits::new(
            &config.rate_limit,
            &config.routes,
            &metrics.rate_limit_table_full,
        );
        let certs = match &config.server.tls {
            Some(tls) => {
                // Both outcomes are exported from the start, at 0: a series that first appears
                // at 1 shows no increase to Prometheus, and the alert on failed reloads would
                // never fire for the first one.
                for outcome in ["ok", "error"] {
                    let _created = metrics
                        .certificate_reloads
                        .get_or_create(&crate::metrics::ReloadLabels { outcome });
                }
                Some(CertStore::open(&tls.cert, &tls.key)?)
            }
            None => None,
        };
        Ok(App {
            config: Arc::new(config),
            metrics,
            upstream: Arc::new(upstream),
            certs,
            connections: Arc::new(ConnCounts::default()),
            store,
            sessions: Arc::new(sessions),
            verifier: Arc::new(verifier),
            routes: Arc::new(routes),
            trusted: Arc::new(trusted),
            rate_limits: Arc::new(rate_limits),
        })
    }

    /// The stack, outermost first.
    pub fn service(&self) -> AppService {
        let server = &self.config.server;
        let proxy = ServiceBuilder::new()
            // On `session` routes: a live session owned by the token's subject, slid in one trip.
            .layer(SessionGateLayer(self.sessions.clone()))
            // Send it upstream with the verified identity, stream the answer back.
            .service(Forward::new(self.upstream.clone()));
        let api = SessionApi::new(
            self.sessions.clone(),
            self.routes.api_prefix(),
            self.metrics.clone(),
            self.config.jwt.leeway,
        );
        let stack = ServiceBuilder::new()
            // Keep or make X-Request-Id; every log line of the request carries it.
            .layer(RequestIdLayer)
            // The client's address, believing X-Forwarded-For only from trusted proxies.
            .layer(ClientIpLayer(self.trusted.clone()))
            // Session API or proxied route, and the route's auth mode (on the normalised path).
            .layer(RouterLayer(self.routes.clone()))
            // One log line, the request metrics, and an audit event for every refusal.
            .layer(AccessLogLayer(self.metrics.clone()))
            // With `[cors]`: browsers' preflights answered, allowed origins' responses marked.
            .option_layer(self.config.cors.clone().map(|c| CorsLayer(Arc::new(c))))
            // Oversized heads and bodies are refused before any other work.
            .layer(RequestLimitsLayer {
                max_header_bytes: server.max_header_bytes,
                max_body_bytes: server.max_body_bytes,
            })
            // Strip client identity headers; verify any bearer token (CPU only).
            .layer(AuthnLayer {
                verifier: self.verifier.clone(),
                identity: Arc::new(self.config.identity.clone()),
                websocket_query_token: self
                    .config
                    .jwt
                    .websocket_query_token
                    .as_deref()
                    .map(Arc::from),
            })
            // Count the caller (user id, else client IP) before any Redis or upstream work.
            .layer(RateLimitLayer(self.rate_limits.clone()))
            // Refuse requests whose route needs a valid token and that have none.
            .layer(RequireAuthLayer)
            .service(Split { api, proxy });
        BoxCloneService::new(stack)
    }

    /// The admin listener's endpoints: /healthz, /readyz (with Redis) and /metrics.
    pub fn admin(&self) -> Admin {
        let mut admin = Admin::default();
        let store = self.store.clone();
        admin.readiness.add_check("redis", move || {
            let store = store.clone();
            async move {
                store
                    .ping()
                    .await
                    .map_err(|e| match store.connect_failure() {
                        // Why it cannot connect (a refused login, a refused connection), as logged.
                        Some(why) if matches!(e, StoreError::Unavailable) => format!("{e}: {why}"),
                        _ => e.to_string(),
                    })
            }
        });
        let metrics = self.metrics.clone();
        let connections = self.connections.clone();
        let tunnels = self.upstream.tunnels();
        let rate_limits = self.rate_limits.clone();
        let sessions = self.sessions.clone();
        admin.routes.push((
            "/metrics",
            Arc::new(move || {
                metrics.open_connections.set(gauge(connections.open()));
                metrics
                    .resting_connections
                    .set(gauge(connections.resting()));
                metrics.open_tunnels.set(gauge(tunnels.get()));
                metrics
                    .rate_limit_keys
                    .set(gauge(rate_limits.tracked_keys()));
                if let Some(cache) = sessions.cache() {
                    metrics.session_cache_entries.set(gauge(cache.len()));
                }
                let mut response = Response::new(full(metrics.encode()));
                *response.status_mut() = StatusCode::OK;
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }),
        ));
        admin
    }

    /// Background work that lives as long as the server: rate-limit eviction, the active
    /// session count, certificate reloads (file changes and SIGHUP).
    fn spawn_background(&self, tasks: &mut JoinSet<()>) {
        tasks.spawn(self.rate_limits.clone().run_eviction());

        let store = self.store.clone();
        let sessions = self.sessions.clone();
        let metrics = self.metrics.clone();
        let every = self.config.metrics.active_sessions_interval;
        tasks.spawn(async move {
            // The first count comes one interval after start, not at once: starting never
            // costs a SCAN.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Some(cache) = sessions.cache() {
                    cache.sweep();
                }
                match store.count_sessions().await {
                    Ok(n) => {
                        metrics
                            .sessions_active
                            .set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot count active sessions"),
                }
            }
        });

        if let (Some(certs), Some(tls)) = (&self.certs, &self.config.server.tls) {
            tasks.spawn(
                certs
                    .clone()
                    .watch(tls.reload_interval, self.metrics.clone()),
            );
        }

        // SIGHUP reloads the certificate. The handler is installed with or without TLS, so
        // that a SIGHUP never falls through to its default action (ending the process).
        // Registered here, before serving starts, so a SIGHUP sent once the process answers
        // is seen.
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hangup) => {
                let certs = self.certs.clone();
                let metrics = self.metrics.clone();
                tasks.spawn(async move {
                    while hangup.recv().await.is_some() {
                        match &certs {
                            Some(certs) => {
                                certs.reload_logged("SIGHUP", &metrics);
                            }
                            None => tracing::info!("SIGHUP: no TLS certificate to reload"),
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; certificates reload on file change only");
            }
        }
    }

    /// Serves until `shutdown` resolves, then drains. The listeners are bound by the caller, so
    /// tests can bind port 0.
    pub async fn run<F>(
        self,
        public: TcpListener,
        admin_listener: TcpListener,
        shutdown: F,
    ) -> Result<(), BoxError>
    where
        F: Future,
        F::Output: Into<Shutdown>,
    {
        let tls = match &self.certs {
            Some(store) => Some(TlsAcceptor::from(tls::server_config(store.clone())?)),
            None => None,
        };
        // Background work (and its signal handlers) first, so it is in place once the admin
        // listener answers.
        let mut background = JoinSet::new();
        self.spawn_background(&mut background);
        let admin = self.admin();
        let readiness = admin.readiness.clone();
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        // The bound addresses, so that a port chosen by the system (`:0`) can be found.
        let admin_addr = admin_listener.local_addr()?;
        let admin_task = tokio::spawn(admin.serve(admin_listener, admin_stop_rx));

        tracing::info!(
            listen = %public.local_addr()?,
            admin = %admin_addr,
            tls = tls.is_some(),
            workers = self.config.server.workers,
            upstream = %format!("{}://{}", self.config.upstream.scheme, self.config.upstream.authority),
            "portcullis serving"
        );
        let limits = ConnLimits::from(&self.config.server);
        let delay = self.config.server.shutdown_delay;
        let draining = async {
            let how: Shutdown = shutdown.await.into();
            readiness.start_draining();
            if how == Shutdown::Graceful && !delay.is_zero() {
                tracing::info!(
                    ?delay,
                    "shutting down: /readyz is 503, closing the listener after the delay"
                );
                tokio::time::sleep(delay).await;
            }
            tracing::info!("shutting down: no new connections, draining in-flight requests");
        };
        let services = (0..self.config.server.workers)
            .map(|_| self.service())
            .collect();
        let served = crate::server::serve(
            public,
            tls,
            services,
            limits,
            self.connections.clone(),
            draining,
        )
        .await;

        let _ = admin_stop_tx.send(true);
        let _ = admin_task.await;
        background.shutdown().await;
        self.store.close();
        served.map_err(|e| format!("cannot start the worker threads: {e}"))?;
        tracing::info!("stopped");
        Ok(())
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Resolves on SIGTERM (graceful, with the readiness delay) or SIGINT (prompt).
pub async fn shutdown_signal() -> Shutdown {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => Shutdown::Graceful,
                    _ = int.recv() => Shutdown::Prompt,
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
                Shutdown::Prompt
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        Shutdown::Prompt
    }
}
