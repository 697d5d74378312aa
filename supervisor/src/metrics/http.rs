//! The `/metrics` endpoint: a minimal HTTP/1.1 server on the daemon's own runtime.
//!
//! Hand-rolled on purpose: one route, GET only, one response per connection. An
//! HTTP library (hyper and its stack) would be the largest dependency of the
//! daemon for that. What a client can cost is bounded: at most
//! [`MAX_CONNECTIONS`] at once (more are closed at once), [`MAX_REQUEST`] bytes of
//! request head, [`REQUEST_TIMEOUT`] to send it and as long to take the answer;
//! then the connection is closed.
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{control::RateLimitedLog, upgrade::Shared};

pub const MAX_CONNECTIONS: usize = 16;
pub const MAX_REQUEST: usize = 8 * 1024;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds `address` (a std listener, so start-up can bind before the runtime
/// serves anything and refuse a bad address with nothing changed).
pub fn bind(address: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `/metrics` until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, shared: Shared) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics: cannot serve: {e}");
            return;
        }
    };
    if let Ok(address) = listener.local_addr() {
        tracing::info!("metrics: serving http://{address}/metrics");
    }
    let open = Arc::new(AtomicUsize::new(0));
    let mut errors = RateLimitedLog::new(Duration::from_secs(10));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if let Some(suppressed) = errors.allow() {
                    tracing::warn!(
                        "metrics: accept failed: {e}; pausing ({suppressed} more not logged)"
                    );
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let open = open.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT * 2, answer(stream, &shared)).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// `GET /metrics` (a query string is ignored); `head`: HEAD, no body.
    Metrics {
        head: bool,
    },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Parses the request line of a complete head.
pub fn parse(head: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::BadRequest;
    };
    let line = text.split("\r\n").next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::BadRequest;
    }
    let path = target.split('?').next().unwrap_or("");
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Request::MethodNotAllowed,
    };
    if path == "/metrics" {
        Request::Metrics { head }
    } else {
        Request::NotFound
    }
}

/// Reads one request head (bounded in size and time), answers it, closes.
async fn answer(mut stream: TcpStream, shared: &Shared) {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            head.extend_from_slice(&buf[..n]);
            if head.len() > MAX_REQUEST {
                return false;
            }
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
        }
    })
    .await;
    let request = match complete {
        Ok(true) => parse(&head),
        Ok(false) if head.len() > MAX_REQUEST => {
            let _ = respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request too large\n",
                false,
            )
            .await;
            return;
        }
        // Closed or timed out before a full head: nothing to answer.
        _ => return,
    };
    let (code, body, head_only) = match request {
        Request::Metrics { head } => {
            // The lock is held only to read the state (no await inside).
            let body = crate::metrics::scrape(&shared.lock().unwrap());
            ("200 OK", body, head)
        }
        Request::NotFound => (
            "404 Not Found",
            "not found: only /metrics is served\n".to_string(),
            false,
        ),
        Request::MethodNotAllowed => ("405 Method Not Allowed", "only GET\n".to_string(), false),
        Request::BadRequest => ("400 Bad Request", "bad request\n".to_string(), false),
    };
    let content_type = if code.starts_with("200") {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain"
    };
    let _ = respond(&mut stream, code, content_type, body.as_bytes(), head_only).await;
}

async fn respond(
    stream: &mut TcpStream,
    code: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let header = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    if !head_only {
        stream.write_all(body).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_lines() {
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics { head: false }
        );
        assert_eq!(
            parse(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Request::Metrics { head: false }
        );
        assert_eq!(
            parse(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Request::Metrics { head: true }
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(parse(b"GET /metrics/x HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::MethodNotAllowed
        );
        assert_eq!(parse(b"GET /metrics\r\n\r\n"), Request::BadRequest);
        assert_eq!(parse(b"GET /metrics SPDY/3\r\n\r\n"), Request::BadRequest);
        assert_eq!(parse(b"\xff\xfe\r\n\r\n"), Request::BadRequest);
    }
}
