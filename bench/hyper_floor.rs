//! The smallest reverse proxy the HTTP engine allows: the floor under portcullis' per-request
//! cost, measured by bench/run.sh in the same runs as nginx and portcullis (scenario 6).
//!
//! It does nothing a proxy is for: no checks, no header rewriting, no pool (each client
//! connection gets its own upstream connection, driven in the same task), no limits, no logs.
//! Like portcullis it runs one single-threaded runtime per CPU, deals accepted connections to
//! them round robin (workers that all accept from one socket get uneven shares, and a busy core
//! next to an idle one caps throughput) and allocates with mimalloc. So
//! what scenario 6 reaches is what hyper and tokio alone reach on the machine: portcullis can
//! only approach it, and the gap between the two is what portcullis' own work costs.
//!
//!   hyper_floor --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT [--workers N]
//!
//! Without `--listen` (as `cargo bench` and `cargo test --all-targets` run it) it does nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    workers: usize,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut listen = None;
    let mut upstream = None;
    let mut workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => listen = Some(value("--listen")?),
            "--upstream" => upstream = Some(value("--upstream")?),
            "--workers" => {
                workers = value("--workers")?
                    .parse()
                    .map_err(|e| format!("--workers: {e}"))?
            }
            // What `cargo bench` and `cargo test` pass.
            _ => {}
        }
    }
    let Some(listen) = listen else {
        return Ok(None);
    };
    let addr = |name: &str, s: Option<String>| -> Result<SocketAddr, String> {
        s.ok_or(format!("{name} is required"))?
            .parse()
            .map_err(|e| format!("{name}: {e}"))
    };
    Ok(Some(Args {
        listen: addr("--listen", Some(listen))?,
        upstream: addr("--upstream", upstream)?,
        workers: workers.max(1),
    }))
}

fn main() {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!(
                "hyper_floor: a server for bench/run.sh (scenario 6); nothing to measure alone"
            );
            return;
        }
        Err(e) => {
            eprintln!("hyper_floor: {e}");
            std::process::exit(2);
        }
    };
    let listener = match std::net::TcpListener::bind(args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hyper_floor: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let workers: Vec<_> = (0..args.workers)
        .map(|_| {
            let (deal, dealt) = mpsc::unbounded_channel();
            let upstream = args.upstream;
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime")
                    .block_on(serve(dealt, upstream))
            });
            deal
        })
        .collect();
    // SIGINT ends the process through `exit`, so that a build instrumented for profile-guided
    // optimisation (bench/pgo.sh --floor) writes its counts on the way out.
    std::thread::spawn(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        if runtime.block_on(tokio::signal::ctrl_c()).is_ok() {
            std::process::exit(0);
        }
    });
    // This thread accepts (blocking) and deals.
    for (client, worker) in listener.incoming().zip(workers.iter().cycle()) {
        let Ok(client) = client else {
            continue;
        };
        if worker.send(client).is_err() {
            eprintln!("hyper_floor: a worker stopped");
            std::process::exit(1);
        }
    }
}

/// One worker: serves each connection dealt to it in a task of its own.
async fn serve(mut dealt: mpsc::UnboundedReceiver<std::net::TcpStream>, upstream: SocketAddr) {
    while let Some(client) = dealt.recv().await {
        tokio::spawn(async move {
            if let Err(e) = proxy_connection(client, upstream).await {
                eprintln!("hyper_floor: connection: {e}");
            }
        });
    }
}

async fn proxy_connection(
    client: std::net::TcpStream,
    upstream: SocketAddr,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    client.set_nonblocking(true)?;
    let client = TcpStream::from_std(client)?;
    client.set_nodelay(true)?;
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (sender, upstream_conn) =
        hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(up)).await?;
    // HTTP/1.1 serves one request at a time, so the lock is never contended.
    let sender = Arc::new(Mutex::new(sender));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let sender = sender.clone();
        async move { sender.lock().await.send_request(req).await }
    });
    let server =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(client), service);
    tokio::select! {
        served = server => served?,
        ended = upstream_conn => ended?,
    }
    Ok(())
}
