//! The table of contents: the tower stack every public request passes through, outermost first,
//! and the process that runs it (public listener, admin listener, signals).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http::{Request, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::util::BoxCloneService;
use tower::ServiceBuilder;

use crate::access_log::AccessLogLayer;
use crate::admin::Admin;
use crate::authn::{AuthnLayer, RequireAuthLayer, Verifier};
use crate::config::Config;
use crate::forward::{Forward, Upstream};
use crate::limits::RequestLimitsLayer;
use crate::peer::{ClientIpLayer, TrustedProxies};
use crate::rate_limit::{RateLimitLayer, RateLimits};
use crate::routes::{RouteTable, RouterLayer, Split};
use crate::server::{ConnCount, ConnLimits};
use crate::session::api::SessionApi;
use crate::session::gate::SessionGateLayer;
use crate::session::Sessions;
use crate::store::Store;
use crate::tls::{self, CertStore};
use crate::{Body, BoxError};

/// The request pipeline as one cloneable service.
pub type AppService = BoxCloneService<Request<Body>, Response<Body>, Infallible>;

/// Everything built from the configuration that requests share.
pub struct App {
    pub config: Arc<Config>,
    pub upstream: Arc<Upstream>,
    pub certs: Option<Arc<CertStore>>,
    pub open_connections: Arc<ConnCount>,
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
        let trusted = TrustedProxies::new(config.server.trusted_proxies.clone());
        let upstream = Upstream::new(
            &config.upstream,
            config.server.max_body_bytes,
            trusted.clone(),
            config.identity.clone(),
        )?;
        let store = Store::new(&config.redis)?;
        let sessions = Sessions::new(
            store.clone(),
            config.session.ttl,
            config.session.last_active_resolution,
        );
        let verifier = Verifier::new(&config.jwt)?;
        let routes = RouteTable::new(&config.session.api_prefix, &config.routes);
        let rate_limits = RateLimits::new(&config.rate_limit, &config.routes);
        let certs = match &config.server.tls {
            Some(tls) => Some(CertStore::open(&tls.cert, &tls.key)?),
            None => None,
        };
        Ok(App {
            config: Arc::new(config),
            upstream: Arc::new(upstream),
            certs,
            open_connections: Arc::new(ConnCount::default()),
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
        let api = SessionApi::new(self.sessions.clone(), self.routes.api_prefix());
        let stack = ServiceBuilder::new()
            // The client's address, believing X-Forwarded-For only from trusted proxies.
            .layer(ClientIpLayer(self.trusted.clone()))
            // One line per request, whatever happens below.
            .layer(AccessLogLayer)
            // Oversized heads and bodies are refused before any other work.
            .layer(RequestLimitsLayer {
                max_header_bytes: server.max_header_bytes,
                max_body_bytes: server.max_body_bytes,
            })
            // Session API or proxied route, and the route's auth mode (on the normalised path).
            .layer(RouterLayer(self.routes.clone()))
            // Strip client identity headers; verify any bearer token (CPU only).
            .layer(AuthnLayer {
                verifier: self.verifier.clone(),
                identity: Arc::new(self.config.identity.clone()),
            })
            // Count the caller (user id, else client IP) before any Redis or upstream work.
            .layer(RateLimitLayer(self.rate_limits.clone()))
            // Refuse requests whose route needs a valid token and that have none.
            .layer(RequireAuthLayer)
            .service(Split { api, proxy });
        BoxCloneService::new(stack)
    }

    pub fn admin(&self) -> Admin {
        let mut admin = Admin::default();
        let store = self.store.clone();
        admin.readiness.add_check("redis", move || {
            let store = store.clone();
            async move { store.ping().await.map_err(|e| e.to_string()) }
        });
        admin
    }

    /// Serves until `shutdown` resolves, then drains. The listeners are bound by the caller, so
    /// tests can bind port 0.
    pub async fn run(
        self,
        public: TcpListener,
        admin_listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), BoxError> {
        let tls = match &self.certs {
            Some(store) => Some(TlsAcceptor::from(tls::server_config(store.clone())?)),
            None => None,
        };
        let admin = self.admin();
        let readiness = admin.readiness.clone();
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        let eviction = tokio::spawn(self.rate_limits.clone().run_eviction());
        let admin_task = tokio::spawn(admin.serve(admin_listener, admin_stop_rx));

        tracing::info!(
            listen = %public.local_addr()?,
            tls = tls.is_some(),
            upstream = %format!("{}://{}", self.config.upstream.scheme, self.config.upstream.authority),
            "portcullis serving"
        );
        let limits = ConnLimits::from(&self.config.server);
        let draining = async {
            shutdown.await;
            tracing::info!("shutting down: no new connections, draining in-flight requests");
            readiness.start_draining();
        };
        crate::server::serve(
            public,
            tls,
            self.service(),
            limits,
            self.open_connections.clone(),
            draining,
        )
        .await;

        let _ = admin_stop_tx.send(true);
        let _ = admin_task.await;
        self.store.close();
        eviction.abort();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
