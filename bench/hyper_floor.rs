//! The smallest reverse proxy the HTTP engine allows: the floor under portcullis' per-request
//! cost, measured by bench/run.sh in the same runs as nginx and portcullis (scenario 6).
//!
//! It does nothing a proxy is for: no checks, no header rewriting, no pool (each client
//! connection gets its own upstream connection, driven in the same task), no limits, no logs.
//! Like portcullis it runs one single-threaded runtime per CPU, deals accepted connections to
//! them round robin (workers that all accept from one socket get uneven shares, and a busy core
//! next to an idle one caps throughput), writes each HTTP/1.1 message from one buffer
//! (`writev(false)`) and allocates with mimalloc. So
//! what scenario 6 reaches is what hyper and tokio alone reach on the machine: portcullis can
//! only approach it, and the gap between the two is what portcullis' own work costs.
//!
//! With `--engine raw` (scenario 7) it does not use hyper at all: each connection relays
//! HTTP/1.1 messages by hand, parsing only what framing needs (httparse, `Content-Length`) and
//! copying the bytes through unchanged, one message at a time. That is about the least any
//! HTTP-aware proxy on tokio can do per request, so its throughput is about the most a
//! hand-written HTTP engine under portcullis could reach on the machine. It handles the bench's
//! traffic only: bodyless requests, and responses framed by `Content-Length`.
//!
//!   hyper_floor --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT [--workers N] [--engine raw]
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
    raw: bool,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut listen = None;
    let mut upstream = None;
    let mut workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut raw = false;
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
            "--engine" => match value("--engine")?.as_str() {
                "hyper" => raw = false,
                "raw" => raw = true,
                other => return Err(format!("--engine: {other:?} is not hyper or raw")),
            },
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
        raw,
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
            let (upstream, raw) = (args.upstream, args.raw);
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime")
                    .block_on(serve(dealt, upstream, raw))
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
async fn serve(
    mut dealt: mpsc::UnboundedReceiver<std::net::TcpStream>,
    upstream: SocketAddr,
    raw: bool,
) {
    while let Some(client) = dealt.recv().await {
        tokio::spawn(async move {
            let served = if raw {
                relay_connection(client, upstream).await
            } else {
                proxy_connection(client, upstream).await
            };
            if let Err(e) = served {
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
    let (sender, upstream_conn) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake::<_, Incoming>(TokioIo::new(up))
        .await?;
    // HTTP/1.1 serves one request at a time, so the lock is never contended.
    let sender = Arc::new(Mutex::new(sender));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let sender = sender.clone();
        async move { sender.lock().await.send_request(req).await }
    });
    let server = hyper::server::conn::http1::Builder::new()
        .writev(false)
        .serve_connection(TokioIo::new(client), service);
    tokio::select! {
        served = server => served?,
        ended = upstream_conn => ended?,
    }
    Ok(())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Scenario 7: HTTP/1.1 relayed by hand. Reads one request head from the client, writes it to
/// the upstream as it came, reads the upstream's head and `Content-Length` body, writes them to
/// the client as they came; repeats until the client closes.
async fn relay_connection(
    client: std::net::TcpStream,
    upstream: SocketAddr,
) -> Result<(), BoxError> {
    use tokio::io::AsyncWriteExt;

    client.set_nonblocking(true)?;
    let mut client = TcpStream::from_std(client)?;
    client.set_nodelay(true)?;
    let mut up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let mut from_client = Vec::with_capacity(8192);
    let mut from_upstream = Vec::with_capacity(8192);
    loop {
        let Some(request_len) = read_message(&mut client, &mut from_client, request_length).await?
        else {
            return Ok(());
        };
        up.write_all(&from_client[..request_len]).await?;
        from_client.drain(..request_len);
        let Some(response_len) = read_message(&mut up, &mut from_upstream, response_length).await?
        else {
            return Err("the upstream closed mid-exchange".into());
        };
        client.write_all(&from_upstream[..response_len]).await?;
        from_upstream.drain(..response_len);
    }
}

/// Reads into `buf` until it holds one whole message as `length` measures it; `None` when the
/// peer closed before a message began.
async fn read_message(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    length: fn(&[u8]) -> Result<Option<usize>, BoxError>,
) -> Result<Option<usize>, BoxError> {
    use tokio::io::AsyncReadExt;

    loop {
        if let Some(n) = length(buf)? {
            if buf.len() >= n {
                return Ok(Some(n));
            }
        }
        if buf.len() == buf.capacity() {
            buf.reserve(8192);
        }
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("the peer closed mid-message".into())
            };
        }
    }
}

/// A request's length once its head is complete; the bench's requests carry no body.
fn request_length(buf: &[u8]) -> Result<Option<usize>, BoxError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    Ok(match request.parse(buf)? {
        httparse::Status::Complete(head) => Some(head + content_length(request.headers)?),
        httparse::Status::Partial => None,
    })
}

/// A response's length (head and body) once its head is complete.
fn response_length(buf: &[u8]) -> Result<Option<usize>, BoxError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    Ok(match response.parse(buf)? {
        httparse::Status::Complete(head) => Some(head + content_length(response.headers)?),
        httparse::Status::Partial => None,
    })
}

fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, BoxError> {
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("transfer codings are not relayed by the raw engine".into());
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            return Ok(std::str::from_utf8(h.value)?.trim().parse()?);
        }
    }
    Ok(0)
}
