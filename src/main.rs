//! The `portcullis` command: run the proxy, check a config, start the demo echo upstream, or
//! inject the sidecar into Kubernetes manifests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: a proxy allocates and frees small buffers per
/// request on several threads, which glibc's malloc serves slower and returns to the system
/// less readily (idle RSS after many connections closed).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use portcullis::app::{shutdown_signal, App, Shutdown};
use portcullis::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Session-enforcing reverse proxy for game backends"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = "config.toml")]
    config: PathBuf,
    /// Log format; overrides `log.format`.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and exit: 0 when valid, 2 with the bad keys named otherwise.
    CheckConfig,
    /// Print a token signed with the configured HMAC secret (the first HS* algorithm in
    /// jwt.algorithms), for trying portcullis out.
    DevToken {
        /// The user id (`sub`).
        #[arg(long)]
        sub: String,
        /// A session id (a UUID) to put in the `sid` claim.
        #[arg(long, value_parser = session_id)]
        sid: Option<String>,
        /// Lifetime of the token, at most 100 years.
        #[arg(long, default_value = "1h", value_parser = token_lifetime)]
        ttl: std::time::Duration,
    },
    /// Serve a demo upstream that answers every request with what it received, as JSON.
    EchoUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Add portcullis as a native sidecar to Kubernetes workloads (YAML from files or stdin),
    /// retarget the Services that select them, and print the result.
    Inject(portcullis::inject::InjectArgs),
}

/// A session id as the proxy reads one from a token (`Uuid::parse_str`, so in any spelling it
/// takes): a token bound to anything else would be refused on every session route. The text is
/// kept as given, so a token can carry each of those spellings.
fn session_id(text: &str) -> Result<String, String> {
    match uuid::Uuid::parse_str(text) {
        Ok(_) => Ok(text.to_string()),
        Err(_) => Err(
            "not a session id: session ids are UUIDs, such as 67e55044-10b1-426f-9247-bb680e5fe0c8"
                .into(),
        ),
    }
}

/// A token's lifetime, capped as every duration in the configuration is: an expiry further off
/// means nothing a token is for, and only risks overflowing whatever adds it to a clock.
fn token_lifetime(text: &str) -> Result<std::time::Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl > portcullis::config::MAX_DURATION {
        return Err("too long: at most 100 years (100y)".into());
    }
    Ok(ttl)
}

fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    // Both were checked with the configuration (an empty PORTCULLIS_LOG is ignored there too).
    let parsed = |spec: String| {
        portcullis::config::log_filter(&spec)
            .ok()
            .map(|filter| (spec, filter))
    };
    let (spec, mut filter) = std::env::var("PORTCULLIS_LOG")
        .ok()
        .filter(|spec| !spec.trim().is_empty())
        .and_then(parsed)
        .or_else(|| parsed(level.to_string()))
        .unwrap_or_else(|| ("info".to_string(), EnvFilter::new("info")));
    // rustls warns about what TLS clients get wrong (an IP address sent as the server name,
    // which common tools do), once per handshake: any client could fill the log. Capped at
    // error unless a directive names rustls, and left alone when logging is off.
    let names_rustls = spec
        .split(',')
        .any(|directive| directive.trim().starts_with("rustls"));
    let off = filter.max_level_hint() == Some(tracing_subscriber::filter::LevelFilter::OFF);
    if !names_rustls && !off {
        if let Ok(cap) = "rustls=error".parse() {
            filter = filter.add_directive(cap);
        }
    }
    // Colour only on a terminal (in a file, a pipe or `kubectl logs`, escape codes are noise),
    // and never with NO_COLOR set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Loads and validates the configuration, printing every problem (exit code 2) on failure.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{}: invalid configuration", path.display());
        eprintln!("{errors}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    portcullis::tls::install_crypto_provider();
    // The control runtime: accepting, the admin listener, Redis and background work. Requests
    // are served on `server.workers` threads of their own (see server::serve).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Inject(args) => portcullis::inject::main(args),
        Command::EchoUpstream { listen } => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text), "info");
            runtime.block_on(async {
                let listener = match tokio::net::TcpListener::bind(listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("portcullis: cannot listen on {listen}: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                tracing::info!(%listen, "echo upstream serving");
                tokio::select! {
                    result = portcullis::echo::serve(listener) => {
                        if let Err(e) = result {
                            eprintln!("portcullis: echo upstream failed: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                    _ = shutdown_signal() => {}
                }
                ExitCode::SUCCESS
            })
        }
        Command::DevToken { sub, sid, ttl } => {
            let config = match load_config(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if !portcullis::authn::valid_user_id(&sub) {
                eprintln!("portcullis: --sub must be 1 to 256 printable characters without spaces or braces");
                return ExitCode::from(2);
            }
            match portcullis::authn::dev_token(&config.jwt, &sub, sid.as_deref(), ttl) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("portcullis: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig => match load_config(&cli.config) {
            Ok(config) => {
                for warning in &config.warnings {
                    eprintln!("warning: {warning}");
                }
                // The certificate and key are read too, as the server will at start.
                if let Some(tls) = &config.server.tls {
                    if let Err(e) = portcullis::tls::load_certified_key(&tls.cert, &tls.key) {
                        eprintln!("{}: invalid configuration", cli.config.display());
                        eprintln!("config key `server.tls`: {e}");
                        return ExitCode::from(2);
                    }
                }
                println!("{}: ok", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run => {
            let config = match load_config(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(
                cli.log_format.unwrap_or(config.log.format),
                &config.log.level,
            );
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            runtime.block_on(run(config))
        }
    }
}

/// Raises the soft open-file limit to the hard one, as Go's runtime does: container runtimes may
/// start a process at a soft limit of 1024, and each client connection and each upstream
/// connection holds a descriptor, so `server.max_connections` would otherwise be out of reach.
/// Warns when even the hard limit cannot hold both limits' worth.
fn raise_open_file_limit(max_connections: usize, max_upstream_connections: usize) {
    // One per connection either way, and room for the listeners, Redis and files.
    let wanted = (max_connections as u64)
        .saturating_add(max_upstream_connections as u64)
        .saturating_add(1024);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < wanted => tracing::warn!(
            open_file_limit = limit,
            wanted,
            "the open-file limit cannot hold server.max_connections client and upstream.max_connections upstream connections; raise the hard limit (ulimit -Hn) or lower them"
        ),
        Ok(limit) => tracing::debug!(open_file_limit = limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Once the shutdown has begun, a signal asking for more haste ends the process at once (exit
/// code 1), without waiting out `server.shutdown_delay` or the drain: after SIGTERM, a second
/// SIGTERM or a SIGINT; after SIGINT, a second SIGINT (Ctrl-C twice). A SIGTERM after a SIGINT
/// asks for nothing the prompt shutdown is not already doing, and is ignored: a script that
/// passes Ctrl-C on as SIGTERM to a process the terminal already interrupted should not cut
/// its drain short. The handlers are in place before this returns, so a signal sent once the
/// shutdown shows (on `/readyz`) is seen.
fn exit_on_hastier_signal(first: Shutdown) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut int) = signal(SignalKind::interrupt()) else {
            return;
        };
        let term = match first {
            Shutdown::Graceful => signal(SignalKind::terminate()).ok(),
            Shutdown::Prompt => None,
        };
        tokio::spawn(async move {
            let term_received = async {
                match term {
                    Some(mut term) => term.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term_received => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting at once, without finishing the shutdown");
            std::process::exit(1);
        });
    }
}

/// Connections the kernel may hold for accepting: after a restart or a network blip, thousands of
/// game clients reconnect at once, and past the queue their SYNs are dropped and retried a second
/// later. (tokio's `bind` asks for 128, as the standard library does; the kernel caps any
/// request at `net.core.somaxconn`, 4096 by default since Linux 5.4.)
const ACCEPT_BACKLOG: u32 = 4096;

/// A listening socket on `addr`, as `TcpListener::bind` makes one but for its backlog.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `bind` does: a restarted process can take its port while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

async fn run(config: Config) -> ExitCode {
    raise_open_file_limit(
        config.server.max_connections,
        config.upstream.max_connections,
    );
    let public_addr = config.server.listen;
    let admin_addr = config.admin.listen;
    let app = match App::build(config) {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let public = match listen(public_addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, listen = %public_addr, "cannot listen (server.listen)");
            return ExitCode::FAILURE;
        }
    };
    let admin = match listen(admin_addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, listen = %admin_addr, "cannot listen (admin.listen)");
            return ExitCode::FAILURE;
        }
    };
    let signalled = async {
        let how = shutdown_signal().await;
        exit_on_hastier_signal(how);
        how
    };
    match app.run(public, admin, signalled).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "portcullis failed");
            ExitCode::FAILURE
        }
    }
}
