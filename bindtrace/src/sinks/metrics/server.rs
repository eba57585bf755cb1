//! `GET /metrics` over HTTP/1.1 (hyper), on a thread of its own with its own single-threaded
//! runtime: the event loop does blocking /proc reads and must not delay a scrape, and a slow
//! scraper must not delay the event loop. They share only the metric families (atomics).
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Bytes,
    header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderMap, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{encoding, registry::Registry};

use super::MetricsError;

/// OpenMetrics 1.0, for scrapers that ask for it (Prometheus does).
pub(crate) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format 0.0.4, for everything else (curl, promtool, older scrapers).
pub(crate) const PROMETHEUS_TEXT: &str = encoding::prometheus_text::CONTENT_TYPE;

/// A connection whose request headers are not complete this long after it opened (or after
/// its previous response) is closed: below Prometheus' default scrape timeout of 10 s, so a
/// slow client cannot hold a connection longer than one scrape may wait.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many connections are open at once. At the cap, a new connection closes the
/// oldest one that has not completed a request yet (or, when every one has, the oldest idle
/// keep-alive connection): a flood of idle or slow clients cannot lock out a scraper, and the
/// server holds at most this many descriptors for clients.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// Request headers larger than this are answered with 431 and the connection closed (hyper's
/// smallest read buffer; a scrape request is a few hundred bytes). Bodies are never read.
pub(crate) const MAX_REQUEST_BYTES: usize = 8192;

/// Serves `registry` on `listener` from a new thread, for as long as the process lives.
pub(crate) fn spawn(listener: std::net::TcpListener, registry: Registry) -> Result<SocketAddr, MetricsError> {
    let addr = listener.local_addr().map_err(MetricsError::Thread)?;
    listener.set_nonblocking(true).map_err(MetricsError::Thread)?;
    let registry = Arc::new(registry);
    std::thread::Builder::new()
        .name("bindtrace-metrics".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return log::error!("metrics: cannot start the server's runtime: {e}"),
            };
            runtime.block_on(accept_loop(listener, registry));
        })
        .map_err(MetricsError::Thread)?;
    Ok(addr)
}

/// One open connection, as the cap sees it.
struct Conn {
    abort: tokio::task::AbortHandle,
    /// Set once a request's headers were complete (hyper called the service).
    served: Arc<AtomicBool>,
}

/// The open connections by accept order (ids only grow, so the first is the oldest).
#[derive(Default)]
struct Conns {
    next_id: u64,
    open: BTreeMap<u64, Conn>,
}

impl Conns {
    /// Closes one connection to make room: the oldest whose headers never completed, else the
    /// oldest of all (idle keep-alive connections wait for their next request's headers).
    /// Returns its abort handle, to be used once the table's lock is released (the aborted
    /// task's drop takes the lock).
    fn evict_one(&mut self) -> Option<tokio::task::AbortHandle> {
        let victim = self
            .open
            .iter()
            .find(|(_, c)| !c.served.load(Ordering::Relaxed))
            .or_else(|| self.open.iter().next())
            .map(|(id, _)| *id)?;
        self.open.remove(&victim).map(|c| c.abort)
    }
}

/// Removes its connection from the table when the connection's task ends or is aborted.
struct Registered {
    conns: Arc<Mutex<Conns>>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut g) = self.conns.lock() {
            g.open.remove(&self.id);
        }
    }
}

async fn accept_loop(listener: std::net::TcpListener, registry: Arc<Registry>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return log::error!("metrics: cannot serve: {e}"),
    };
    let conns: Arc<Mutex<Conns>> = Arc::default();
    let mut evicted = 0u64;
    let (mut accept_failures, mut warned_at) = (0u64, None::<std::time::Instant>);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin, and say it
                // once, then at most once a minute with the total.
                accept_failures += 1;
                if warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    log::warn!("metrics: accept failed: {e} ({accept_failures} times since start; retrying)");
                    warned_at = Some(std::time::Instant::now());
                } else {
                    log::debug!("metrics: accept failed: {e} ({accept_failures} times since start)");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let lock = || conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let victim = {
            let mut table = lock();
            if table.open.len() >= MAX_CONNECTIONS { table.evict_one() } else { None }
        };
        if let Some(victim) = victim {
            victim.abort();
            // Let the runtime drop the aborted task (and close its socket) before the next
            // accept: otherwise a burst of connections outpaces the closing.
            tokio::task::yield_now().await;
            evicted += 1;
            if evicted.is_power_of_two() {
                log::warn!(
                    "metrics: {MAX_CONNECTIONS} connections open, closing the oldest idle one \
                     ({evicted} closed so far)"
                );
            }
        }
        let id = {
            let mut table = lock();
            table.next_id += 1;
            table.next_id - 1
        };
        let served = Arc::new(AtomicBool::new(false));
        let registry = registry.clone();
        let registered = Registered { conns: conns.clone(), id };
        let flag = served.clone();
        let task = tokio::spawn(async move {
            let _registered = registered;
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                flag.store(true, Ordering::Relaxed);
                let response = respond(&registry, req.method(), req.uri().path(), req.headers());
                async move { Ok::<_, Infallible>(response) }
            });
            let result = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_REQUEST_BYTES)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = result {
                log::debug!("metrics: connection ended: {e}");
            }
        });
        // The task has not run yet (one thread): it is in the table before it can leave it.
        lock().open.insert(id, Conn { abort: task.abort_handle(), served });
    }
}

/// The whole HTTP surface: `/metrics` (GET, HEAD), a pointer to it on `/`, 404 and 405 otherwise.
pub(crate) fn respond(
    registry: &Registry,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        r
    };
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/metrics" if get => {
            let openmetrics = wants_openmetrics(headers);
            let mut body = String::with_capacity(16 * 1024);
            let encoded = if openmetrics {
                encoding::text::encode(&mut body, registry)
            } else {
                encoding::prometheus_text::encode(&mut body, registry)
            };
            match encoded {
                Ok(()) => {
                    reply(StatusCode::OK, if openmetrics { OPENMETRICS } else { PROMETHEUS_TEXT }, body)
                }
                Err(_) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    "encoding the metrics failed\n".into(),
                ),
            }
        }
        "/" if get => reply(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "bindtrace: Prometheus metrics are at /metrics\n".into(),
        ),
        "/" | "/metrics" => {
            let mut r = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "only GET and HEAD\n".into(),
            );
            r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found; try /metrics\n".into()),
    }
}

/// Content negotiation: OpenMetrics when the client accepts `application/openmetrics-text`
/// (version 1.0.0 or unversioned) at least as much as plain text; Prometheus text otherwise.
pub(crate) fn wants_openmetrics(headers: &HeaderMap) -> bool {
    let mut om_q: f32 = 0.0;
    let mut text_q: f32 = 0.0;
    for value in headers.get_all(ACCEPT).iter().filter_map(|v| v.to_str().ok()) {
        for range in value.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0;
            let mut version = None;
            for param in parts {
                if let Some((k, v)) = param.split_once('=') {
                    match k.trim().to_ascii_lowercase().as_str() {
                        "q" => q = v.trim().parse().unwrap_or(0.0),
                        "version" => version = Some(v.trim().to_owned()),
                        _ => {}
                    }
                }
            }
            match media.as_str() {
                "application/openmetrics-text" if version.as_deref().is_none_or(|v| v == "1.0.0") => {
                    om_q = om_q.max(q)
                }
                "text/plain" | "text/*" | "*/*" => text_q = text_q.max(q),
                _ => {}
            }
        }
    }
    om_q > 0.0 && om_q >= text_q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn negotiation() {
        // Prometheus 2.x's scrape Accept header.
        assert!(wants_openmetrics(&accept(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
             text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(&accept("*/*")), "curl");
        assert!(!wants_openmetrics(&HeaderMap::new()));
        assert!(!wants_openmetrics(&accept("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(&accept("application/openmetrics-text;version=0.0.1")));
        assert!(!wants_openmetrics(&accept("application/openmetrics-text;q=0.2, text/plain")));
        assert!(wants_openmetrics(&accept("application/openmetrics-text")));
    }

    #[test]
    fn the_cap_closes_the_oldest_connection_without_a_request_first() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut c = Conns::default();
            for (id, served) in [(0, true), (1, false), (2, false)] {
                let task = tokio::spawn(std::future::pending::<()>());
                c.open.insert(id, Conn { abort: task.abort_handle(), served: Arc::new(served.into()) });
            }
            let ids = |c: &Conns| c.open.keys().copied().collect::<Vec<_>>();
            c.evict_one().unwrap().abort();
            assert_eq!(ids(&c), [0, 2]);
            c.evict_one().unwrap().abort();
            assert_eq!(ids(&c), [0], "then the next one without a request");
            c.evict_one().unwrap().abort();
            assert!(ids(&c).is_empty(), "then the oldest idle keep-alive connection");
            assert!(c.evict_one().is_none());
        });
    }

    #[test]
    fn routes() {
        let (_, registry) = super::super::Metrics::new(Default::default(), "kfree-skb", "chosen with --hook");
        let r = respond(&registry, &Method::GET, "/metrics", &HeaderMap::new());
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[CONTENT_TYPE], PROMETHEUS_TEXT);
        let r = respond(&registry, &Method::GET, "/metrics", &accept("application/openmetrics-text"));
        assert_eq!(r.headers()[CONTENT_TYPE], OPENMETRICS);
        assert_eq!(respond(&registry, &Method::POST, "/metrics", &HeaderMap::new()).status(), 405);
        assert_eq!(respond(&registry, &Method::GET, "/nope", &HeaderMap::new()).status(), 404);
        assert_eq!(respond(&registry, &Method::GET, "/", &HeaderMap::new()).status(), 200);
    }
}
