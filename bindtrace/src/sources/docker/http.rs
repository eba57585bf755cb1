//! A small HTTP/1.1 client for the Docker Engine API over its unix socket.
//!
//! bindtrace needs GET requests with JSON replies (`Content-Length` or chunked) and one long
//! chunked stream (`/events`). That is what this file does, on tokio's `UnixStream`, one
//! connection per request (`Connection: close`): about 250 lines instead of bollard's or
//! hyper's dependency trees (see README, "Docker API client").
use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

/// Replies larger than this are refused (a `GET /containers/json` on a host with thousands of
/// containers is a few MB).
const MAX_BODY: usize = 64 << 20;
/// Header lines and chunk-size lines longer than this are a protocol error.
const MAX_LINE: usize = 16 << 10;
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
}

/// The Docker Engine API at a unix socket.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    socket: PathBuf,
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// One response being read: status, framing, and the connection.
struct Response {
    status: u16,
    framing: Framing,
    conn: BufReader<UnixStream>,
    what: String,
    /// Chunked: the current chunk is exhausted and the stream ended.
    done: bool,
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
            let mut resp = self.request(path).await?;
            let body = resp.read_body().await?;
            if resp.status != 200 {
                return Err(status_error(&what, resp.status, &body));
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
        let mut resp = tokio::time::timeout(REQUEST_TIMEOUT, self.request(path))
            .await
            .map_err(|_| DockerError::Timeout { what: what.clone() })??;
        if resp.status != 200 {
            let body =
                tokio::time::timeout(REQUEST_TIMEOUT, resp.read_body()).await.unwrap_or(Ok(Vec::new()))?;
            return Err(status_error(&what, resp.status, &body));
        }
        Ok(JsonStream { resp, buf: Vec::new() })
    }

    async fn request(&self, path: &str) -> Result<Response, DockerError> {
        let what = format!("GET {path}");
        let mut stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| DockerError::Connect { path: self.socket.clone(), source })?;
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: bindtrace/{}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|source| DockerError::Io { what: what.clone(), source })?;
        let mut conn = BufReader::new(stream);
        let status_line = read_line(&mut conn, &what).await?;
        let status = parse_status(&status_line).ok_or_else(|| DockerError::Protocol {
            what: what.clone(),
            detail: format!("status line {status_line:?}"),
        })?;
        let mut framing = Framing::UntilClose;
        loop {
            let line = read_line(&mut conn, &what).await?;
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
                framing = Framing::Chunked;
            } else if name.eq_ignore_ascii_case("content-length") && !matches!(framing, Framing::Chunked) {
                let n = value.parse().map_err(|_| DockerError::Protocol {
                    what: what.clone(),
                    detail: format!("Content-Length {value:?}"),
                })?;
                framing = Framing::Length(n);
            }
        }
        Ok(Response { status, framing, conn, what, done: false })
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

/// `HTTP/1.1 200 OK` -> 200.
fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// One CRLF- (or LF-) terminated line, without the terminator.
async fn read_line(conn: &mut BufReader<UnixStream>, what: &str) -> Result<String, DockerError> {
    let mut line = Vec::new();
    let n = (&mut *conn)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|source| DockerError::Io { what: what.to_owned(), source })?;
    if n == 0 {
        return Err(DockerError::Closed { what: what.to_owned() });
    }
    if line.last() != Some(&b'\n') {
        return Err(DockerError::Protocol { what: what.to_owned(), detail: "line too long or cut".into() });
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line)
        .map_err(|_| DockerError::Protocol { what: what.to_owned(), detail: "not UTF-8".into() })
}

impl Response {
    fn io(&self, source: io::Error) -> DockerError {
        DockerError::Io { what: self.what.clone(), source }
    }

    /// The whole body.
    async fn read_body(&mut self) -> Result<Vec<u8>, DockerError> {
        let mut body = Vec::new();
        match self.framing {
            Framing::Length(n) => {
                if n > MAX_BODY {
                    return Err(DockerError::Protocol {
                        what: self.what.clone(),
                        detail: format!("{n}-byte body"),
                    });
                }
                body.resize(n, 0);
                self.conn.read_exact(&mut body).await.map_err(|e| self.io(e))?;
            }
            Framing::UntilClose => {
                (&mut self.conn)
                    .take(MAX_BODY as u64)
                    .read_to_end(&mut body)
                    .await
                    .map_err(|e| self.io(e))?;
            }
            Framing::Chunked => {
                while let Some(chunk) = self.next_chunk().await? {
                    body.extend_from_slice(&chunk);
                    if body.len() > MAX_BODY {
                        return Err(DockerError::Protocol {
                            what: self.what.clone(),
                            detail: "body too large".into(),
                        });
                    }
                }
            }
        }
        Ok(body)
    }

    /// The next piece of the body as it arrives; None at its end.
    async fn next_piece(&mut self) -> Result<Option<Vec<u8>>, DockerError> {
        match self.framing {
            Framing::Chunked => self.next_chunk().await,
            _ => {
                if self.done {
                    return Ok(None);
                }
                let mut buf = vec![0u8; 8192];
                let n = self.conn.read(&mut buf).await.map_err(|e| self.io(e))?;
                if n == 0 {
                    self.done = true;
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some(buf))
            }
        }
    }

    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, DockerError> {
        if self.done {
            return Ok(None);
        }
        let line = read_line(&mut self.conn, &self.what).await?;
        let hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16).map_err(|_| DockerError::Protocol {
            what: self.what.clone(),
            detail: format!("chunk size {line:?}"),
        })?;
        if size == 0 {
            // Trailers, then the empty line.
            while !read_line(&mut self.conn, &self.what).await?.is_empty() {}
            self.done = true;
            return Ok(None);
        }
        if size > MAX_BODY {
            return Err(DockerError::Protocol {
                what: self.what.clone(),
                detail: format!("{size}-byte chunk"),
            });
        }
        let mut chunk = vec![0u8; size];
        self.conn.read_exact(&mut chunk).await.map_err(|e| self.io(e))?;
        let mut crlf = [0u8; 2];
        self.conn.read_exact(&mut crlf).await.map_err(|e| self.io(e))?;
        if &crlf != b"\r\n" {
            return Err(DockerError::Protocol {
                what: self.what.clone(),
                detail: "chunk not followed by CRLF".into(),
            });
        }
        Ok(Some(chunk))
    }
}

/// Newline-separated JSON values from a streaming reply. Values may span chunks, and a chunk
/// may hold several.
pub(crate) struct JsonStream {
    resp: Response,
    buf: Vec<u8>,
}

impl JsonStream {
    /// The next value; an error when the stream ends (the daemon or a relay went away).
    pub(crate) async fn next<T: DeserializeOwned>(&mut self) -> Result<T, DockerError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return serde_json::from_slice(line).map_err(|e| DockerError::Protocol {
                    what: self.resp.what.clone(),
                    detail: e.to_string(),
                });
            }
            if self.buf.len() > MAX_LINE * 64 {
                return Err(DockerError::Protocol {
                    what: self.resp.what.clone(),
                    detail: "event too large".into(),
                });
            }
            match self.resp.next_piece().await? {
                Some(piece) => self.buf.extend_from_slice(&piece),
                None => return Err(DockerError::Closed { what: self.resp.what.clone() }),
            }
        }
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
    use tokio::{io::AsyncWriteExt, net::UnixListener};

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
            let first: serde_json::Value = s.next().await.unwrap();
            let second: serde_json::Value = s.next().await.unwrap();
            assert_eq!(first["Action"], "start");
            assert_eq!(second["Type"], "network");
            // The server closes without the final chunk: the stream reports it.
            assert!(s.next::<serde_json::Value>().await.is_err());
        });
        let _ = std::fs::remove_dir_all(dir);
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
        assert_eq!(parse_status("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status("SSH-2.0"), None);
    }
}
