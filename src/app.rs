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
use crate::config::Config;
use crate::forward::{Forward, Upstream};
use crate::limits::RequestLimitsLayer;
use crate::peer::TrustedProxies;
use crate::server::{ConnCount, ConnLimits};
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
}

impl App {
    /// Builds the shared state; fails on anything that must be right before serving (TLS files).
    pub fn build(config: Config) -> Result<App, BoxError> {
        let trusted = TrustedProxies::new(config.server.trusted_proxies.clone());
        let upstream = Upstream::new(&config.upstream, config.server.max_body_bytes, trusted)?;
        let certs = match &config.server.tls {
            Some(tls) => Some(CertStore::open(&tls.cert, &tls.key)?),
            None => None,
        };
        Ok(App {
            config: Arc::new(config),
            upstream: Arc::new(upstream),
            certs,
            open_connections: Arc::new(ConnCount::default()),
        })
    }

    /// The stack, outermost first.
    pub fn service(&self) -> AppService {
        let server = &self.config.server;
        let stack = ServiceBuilder::new()
            // One line per request, whatever happens below.
            .layer(AccessLogLayer)
            // Oversized heads and bodies are refused before any other work.
            .layer(RequestLimitsLayer {
                max_header_bytes: server.max_header_bytes,
                max_body_bytes: server.max_body_bytes,
            })
            // Send it upstream and stream the answer back.
            .service(Forward::new(self.upstream.clone()));
        BoxCloneService::new(stack)
    }

    pub fn admin(&self) -> Admin {
        Admin::default()
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
