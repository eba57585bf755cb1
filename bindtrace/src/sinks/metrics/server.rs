//! `GET /metrics` over HTTP/1.1 (hyper), on a thread of its own with its own single-threaded
//! runtime: the event loop does blocking /proc reads and must not delay a scrape, and a slow
//! scraper must not delay the event loop. They share only the metric families (atomics).
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

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

/// A client that sends nothing is dropped after this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

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

async fn accept_loop(listener: std::net::TcpListener, registry: Arc<Registry>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return log::error!("metrics: cannot serve: {e}"),
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                log::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = respond(&registry, req.method(), req.uri().path(), req.headers());
                async move { Ok::<_, Infallible>(response) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                log::debug!("metrics: connection ended: {e}");
            }
        });
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
