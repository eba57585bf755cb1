//! The Docker Engine API client over its unix socket, on hyper's HTTP/1.1 client connection.
//!
//! bindtrace needs GET requests with JSON replies and one long stream (`/events`). hyper does
//! the HTTP (framing, chunked decoding, header parsing); this file adds what a bare client
//! connection leaves to its user: one connection per request over tokio's `UnixStream`
//! (`Connection: close`), the `Host` header (dockerd refuses requests without one), timeouts,
//! a cap on the body size, the newline-separated JSON of `/events`, and error texts that name
//! the request. bollard would bring its own dependency tree for the few endpoints we read
//! (see docs/docker.md, "Docker API client").
use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::{
    Request, StatusCode,
    body::{Bytes, Incoming},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::{net::UnixStream, task::JoinHandle};

use crate::bounds;

/// Replies larger than this are refused (a `GET /containers/json` on a host with thousands of
/// containers is a few MB).
const MAX_BODY: usize = 64 << 20;
/// A request that does not complete within this is abandoned.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub(crate) enum DockerError {
    #[error("cannot connect to the Docker API at {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("Docker API, {what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("Docker API, {what}: HTTP {status}: {message}")]
    Status { what: String, status: u16, message: String },
    #[error("Docker API, {what}: unexpected reply: {detail}")]
    Protocol { what: String, detail: String },
    #[error("Docker API, {what}: no complete answer within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout { what: String },
    #[error("Docker API, {what}: the connection was closed")]
    Closed { what: String },
}

impl DockerError {
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, DockerError::Status { status: 404, .. })
    }

    /// A hyper error while talking to the daemon.
    fn from_hyper(what: &str, e: hyper::Error) -> DockerError {
        let what = what.to_owned();
        if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
            return DockerError::Closed { what };
        }
        match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<io::Error>()) {
            Some(io) => DockerError::Io { what, source: io::Error::new(io.kind(), io.to_string()) },
            None => DockerError::Protocol { what, detail: e.to_string() },
        }
    }
}

/// The Docker Engine API at a unix socket.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    socket: PathBuf,
}

/// The task driving one connection; aborted when the request is done or abandoned, so a
/// daemon that never answers cannot keep a socket open behind a timed-out request.
struct Connection(JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A response whose head has been read, and the connection it arrives on.
struct Response {
    status: StatusCode,
    body: Incoming,
    what: String,
    _conn: Connection,
}

impl Client {
    pub(crate) fn new(socket: impl Into<PathBuf>) -> Client {
        Client { socket: socket.into() }
    }

    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET path` and decode the JSON reply.
    pub(crate) async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, DockerError> {
        let what = format!("GET {path}");
        let body = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let resp = self.request(path).await?;
            let status = resp.status;
            let body = resp.read_body().await?;
            if status != StatusCode::OK {
                return Err(status_error(&what, status.as_u16(), &body));
            }
            Ok(body)
        })
        .await
        .map_err(|_| DockerError::Timeout { what: what.clone() })??;
        serde_json::from_slice(&body).map_err(|e| DockerError::Protocol { what, detail: e.to_string() })
    }

    /// `GET path` for a stream of newline-separated JSON values (`/events`).
    pub(crate) async fn stream(&self, path: &str) -> Result<JsonStream, DockerError> {
        let what = format!("GET {path}");
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.request(path))
            .await
            .map_err(|_| DockerError::Timeout { what: what.clone() })??;
        if resp.status != StatusCode::OK {
            let status = resp.status.as_u16();
            let body =
                tokio::time::timeout(REQUEST_TIMEOUT, resp.read_body()).await.unwrap_or(Ok(Bytes::new()))?;
            return Err(status_error(&what, status, &body));
        }
        Ok(JsonStream { resp, lines: EventLines::default() })
    }

    /// Connects, sends `GET path` and reads the response head.
    async fn request(&self, path: &str) -> Result<Response, DockerError> {
        let what = format!("GET {path}");
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| DockerError::Connect { path: self.socket.clone(), source })?;
        // Title-case header names, as curl and the docker CLI send them.
        let (mut sender, conn) = http1::Builder::new()
            .title_case_headers(true)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| DockerError::from_hyper(&what, e))?;
        let conn_what = what.clone();
        let conn = Connection(tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("Docker API, {conn_what}: connection ended: {e}");
            }
        }));
        let req = Request::get(path)
            .header("Host", "docker")
            .header("User-Agent", concat!("bindtrace/", env!("CARGO_PKG_VERSION")))
            .header("Accept", "application/json")
            .header("Connection", "close")
            .body(Empty::new())
            .map_err(|e| DockerError::Protocol { what: what.clone(), detail: e.to_string() })?;
        let resp = sender.send_request(req).await.map_err(|e| DockerError::from_hyper(&what, e))?;
        let status = resp.status();
        Ok(Response { status, body: resp.into_body(), what, _conn: conn })
    }
}

fn status_error(what: &str, status: u16, body: &[u8]) -> DockerError {
    #[derive(serde::Deserialize)]
    struct Msg {
        message: String,
    }
    let message = serde_json::from_slice::<Msg>(body)
        .map(|m| m.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned());
    DockerError::Status { what: what.to_owned(), status, message }
}

impl Response {
    /// The whole body (hyper decodes Content-Length, chunked or until-close framing), at most
    /// [`MAX_BODY`] bytes.
    async fn read_body(self) -> Result<Bytes, DockerError> {
        use hyper::body::Body as _;
        if let Some(n) = self.body.size_hint().exact()
            && n > MAX_BODY as u64
        {
            return Err(DockerError::Protocol { what: self.what, detail: format!("{n}-byte body") });
        }
        match Limited::new(self.body, MAX_BODY).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<LengthLimitError>() => {
                Err(DockerError::Protocol { what: self.what, detail: "body too large".into() })
            }
            Err(e) => match e.downcast::<hyper::Error>() {
                Ok(e) => Err(DockerError::from_hyper(&self.what, *e)),
                Err(e) => Err(DockerError::Protocol { what: self.what, detail: e.to_string() }),
            },
        }
    }
}

/// Newline-separated JSON values from a streaming reply. Values may span chunks, and a chunk
/// may hold several.
pub(crate) struct JsonStream {
    resp: Response,
    lines: EventLines,
}

impl JsonStream {
    /// The next value, or None for one skipped because it was longer than
    /// [`bounds::EVENT_BYTES`] (an image's labels can make an event huge: the stream goes on,
    /// and the caller re-reads what the skipped value may have changed). An error when the
    /// stream ends (the daemon or a relay went away).
    pub(crate) async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, DockerError> {
        loop {
            match self.lines.next_line() {
                Some(Line::Skipped) => return Ok(None),
                Some(Line::Value(line)) => {
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    return serde_json::from_slice(line).map(Some).map_err(|e| DockerError::Protocol {
                        what: self.resp.what.clone(),
                        detail: e.to_string(),
                    });
                }
                None => {}
            }
            match self.resp.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.lines.push(&data);
                    }
                }
                Some(Err(e)) => return Err(DockerError::from_hyper(&self.resp.what, e)),
                None => return Err(DockerError::Closed { what: self.resp.what.clone() }),
            }
        }
    }
}

/// The lines of a stream, as its chunks arrive, each at most [`bounds::EVENT_BYTES`]: the
/// bytes of a longer one are dropped as they come, and it is reported as skipped.
#[derive(Debug, Default)]
pub(crate) struct EventLines {
    buf: Vec<u8>,
    /// Inside a line longer than the bound: its bytes are dropped until its end.
    skipping: bool,
}

/// One line out of [`EventLines`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// A line within the bound, its newline included.
    Value(Vec<u8>),
    /// A line over the bound, dropped.
    Skipped,
}

impl EventLines {
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole line, or None until more bytes are pushed.
    pub(crate) fn next_line(&mut self) -> Option<Line> {
        if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            // A long line may arrive whole in one chunk: the bound holds for it too.
            if std::mem::take(&mut self.skipping) || line.len() > bounds::EVENT_BYTES + 1 {
                return Some(Line::Skipped);
            }
            return Some(Line::Value(line));
        }
        if self.skipping || self.buf.len() > bounds::EVENT_BYTES {
            self.skipping = true;
            self.buf.clear();
        }
        None
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub(crate) fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::UnixListener,
    };

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// A one-shot server answering every connection with `reply`, recording requests.
    async fn serve(dir: &Path, replies: Vec<Vec<u8>>) -> (Client, tokio::task::JoinHandle<Vec<String>>) {
        let path = dir.join("docker.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = tokio::spawn(async move {
            let mut seen = Vec::new();
            for reply in replies {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    req.extend_from_slice(&buf[..n]);
                }
                seen.push(String::from_utf8(req).unwrap());
                for piece in reply.chunks(7) {
                    s.write_all(piece).await.unwrap();
                    s.flush().await.unwrap();
                }
            }
            seen
        });
        (Client::new(path), handle)
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "bindtrace-http-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn content_length_and_chunked_bodies() {
        let dir = tempdir();
        rt().block_on(async {
            let replies = vec![
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\":[1,2]}".to_vec(),
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n6;ext=1\r\n[3,4]}\r\n0\r\n\r\n".to_vec(),
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 30\r\n\r\n{\"message\":\"No such container\"}".to_vec(),
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n{}".to_vec(),
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}".to_vec(),
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            ];
            let (client, server) = serve(&dir, replies).await;
            #[derive(serde::Deserialize, Debug, PartialEq)]
            struct A {
                a: Vec<u32>,
            }
            assert_eq!(client.get_json::<A>("/x").await.unwrap(), A { a: vec![1, 2] });
            assert_eq!(client.get_json::<A>("/y?q=1").await.unwrap(), A { a: vec![3, 4] });
            let e = client.get_json::<A>("/containers/nope/json").await.unwrap_err();
            assert!(e.is_not_found(), "{e}");
            assert!(e.to_string().contains("No such container"), "{e}");
            let e = client.get_json::<A>("/big").await.unwrap_err();
            assert!(e.to_string().contains("99999999999-byte body"), "{e}");
            // Closed before the announced length, and a garbage chunk size: errors, not hangs.
            let e = client.get_json::<A>("/short").await.unwrap_err();
            assert!(matches!(e, DockerError::Io { .. } | DockerError::Closed { .. }), "{e}");
            let e = client.get_json::<A>("/garbage").await.unwrap_err();
            assert!(e.to_string().contains("chunk size"), "{e}");
            let seen = server.await.unwrap();
            assert!(seen[1].starts_with("GET /y?q=1 HTTP/1.1\r\n"), "{seen:?}");
            assert!(seen[0].contains("Host: docker\r\n"));
        });
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn event_stream_splits_values_across_chunks() {
        let dir = tempdir();
        rt().block_on(async {
            let body = "{\"Type\":\"container\",\"Action\":\"start\"}\n{\"Type\":\"network\",\"Action\":\"create\"}\n";
            let (a, b) = body.split_at(20);
            let reply = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n",
                a.len(),
                b.len()
            );
            let (client, _server) = serve(&dir, vec![reply.into_bytes()]).await;
            let mut s = client.stream("/events").await.unwrap();
            let first: serde_json::Value = s.next().await.unwrap().unwrap();
            let second: serde_json::Value = s.next().await.unwrap().unwrap();
            assert_eq!(first["Action"], "start");
            assert_eq!(second["Type"], "network");
            // The server closes without the final chunk: the stream reports it.
            assert!(s.next::<serde_json::Value>().await.is_err());
        });
        let _ = std::fs::remove_dir_all(dir);
    }

    /// An event over the bound is skipped (None), and the stream goes on with the next one.
    #[test]
    fn an_oversized_event_is_skipped_and_the_stream_goes_on() {
        let dir = tempdir();
        rt().block_on(async {
            let huge = format!("{{\"Type\":\"container\",\"Labels\":\"{}\"}}\n", "x".repeat(300 * 1024));
            let body = format!("{huge}{{\"Type\":\"network\",\"Action\":\"create\"}}\n");
            let mut reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for chunk in body.as_bytes().chunks(16 * 1024) {
                reply.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                reply.extend_from_slice(chunk);
                reply.extend_from_slice(b"\r\n");
            }
            let (client, _server) = serve(&dir, vec![reply]).await;
            let mut s = client.stream("/events").await.unwrap();
            assert!(s.next::<serde_json::Value>().await.unwrap().is_none(), "skipped");
            let next: serde_json::Value = s.next().await.unwrap().unwrap();
            assert_eq!(next["Type"], "network");
            assert!(s.lines.buf.capacity() < 2 * bounds::EVENT_BYTES, "the skipped event was not kept");
        });
        let _ = std::fs::remove_dir_all(dir);
    }

    /// An event arriving whole, newline included, in one chunk: still over the bound, still
    /// skipped (it used to be taken in, whatever its size).
    #[test]
    fn an_oversized_event_in_one_chunk_is_skipped() {
        let mut lines = EventLines::default();
        let huge = format!("{{\"Labels\":\"{}\"}}\n", "x".repeat(bounds::EVENT_BYTES));
        lines.push(format!("{huge}{{\"Type\":\"network\"}}\n").as_bytes());
        assert_eq!(lines.next_line(), Some(Line::Skipped));
        assert_eq!(lines.next_line(), Some(Line::Value(b"{\"Type\":\"network\"}\n".to_vec())));
        assert_eq!(lines.next_line(), None);
    }

    #[test]
    fn missing_socket_names_the_path() {
        rt().block_on(async {
            let e = Client::new("/nonexistent/docker.sock")
                .get_json::<serde_json::Value>("/version")
                .await
                .unwrap_err();
            assert!(e.to_string().contains("/nonexistent/docker.sock"), "{e}");
        });
    }

    #[test]
    fn query_encoding() {
        assert_eq!(encode_query("{\"type\":[\"x\"]}"), "%7B%22type%22%3A%5B%22x%22%5D%7D");
    }
}
