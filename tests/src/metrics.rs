//! Scraping bindtrace, a real Prometheus server, and a bounded SYN flood, for the metrics tests.
//! Everything talks to loopback or to addresses of namespaces the tests made.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::net::{Netns, connect_nonblocking, unique};

/// bindtrace's default metrics address.
pub const METRICS_ADDR: &str = "127.0.0.1:19462";

/// One HTTP exchange, timed.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
    pub elapsed: Duration,
}

/// `GET path` on `addr` from the calling thread's namespace (HTTP/1.1, one request, then close).
pub fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> std::io::Result<Reply> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let elapsed = start.elapsed();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type").then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Ok(Reply { status, content_type, body: body.to_owned(), elapsed })
}

/// Scrapes bindtrace's default address from inside `ns`.
pub fn scrape(ns: &Netns) -> Scrape {
    let addr: SocketAddr = METRICS_ADDR.parse().unwrap();
    let reply = ns.run(|| http_get(addr, "/metrics", None)).expect("scrape bindtrace");
    assert_eq!(reply.status, 200, "{reply:?}");
    Scrape::parse(&reply.body)
}

/// One sample of a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A scrape in the Prometheus text format, parsed (enough of it for these tests).
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {l:?}"));
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}"));
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => {
                        (name, parse_labels(rest.strip_suffix('}').expect("closing brace")))
                    }
                    None => (series, BTreeMap::new()),
                };
                Sample { name: name.to_owned(), labels, value }
            })
            .collect();
        Scrape { text: text.to_owned(), samples }
    }

    /// Samples of metric `name` whose labels include every `(key, value)` of `with`.
    pub fn series(&self, name: &str, with: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name && with.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// Sum of those samples (0 when there are none).
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> u64 {
        self.series(name, with).iter().map(|s| s.value as u64).sum()
    }

    /// Names declared by `# TYPE` lines.
    pub fn families(&self) -> Vec<String> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_owned(), value);
        rest = &after[end..];
    }
    out
}

/// Percent-encoding for a query string value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 of the calling thread's namespace.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real Prometheus server (Debian's `prometheus`) in `ns`, on loopback, with its own data
/// directory, scraping bindtrace's default address every second. Killed and removed on drop.
pub struct Prometheus<'a> {
    /// None: the test's own (the host's) network namespace.
    ns: Option<&'a Netns>,
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl<'a> Prometheus<'a> {
    /// `rule_files`: absolute paths of rule files to load (they must be valid).
    pub fn start(ns: &'a Netns, rule_files: &[PathBuf]) -> Prometheus<'a> {
        Prometheus::launch(Some(ns), METRICS_ADDR, rule_files)
    }

    /// The same in the test's own network namespace (next to real runtimes), scraping the
    /// bindtrace at `target` (`ADDR:PORT`).
    pub fn start_here(target: &str) -> Prometheus<'static> {
        Prometheus::launch(None, target, &[])
    }

    fn launch(ns: Option<&'a Netns>, target: &str, rule_files: &[PathBuf]) -> Prometheus<'a> {
        let dir = std::env::temp_dir().join(unique("btprom"));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let rules: String = rule_files.iter().map(|p| format!("  - {}\n", p.display())).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{rules}\
             scrape_configs:\n  - job_name: bindtrace\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = in_ns(ns, free_port);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = match ns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &ns.name, "prometheus"]);
                cmd
            }
            None => Command::new("prometheus"),
        };
        let child = cmd
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .expect("start prometheus (Debian package `prometheus`)");
        let p = Prometheus { ns, child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if in_ns(ns, || http_get(addr, "/-/ready", None)).is_ok_and(|r| r.status == 200) {
                break p;
            }
            assert!(Instant::now() < deadline, "prometheus not ready in 30 s:\n{}", p.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// An instant query through the HTTP API; returns `data.result`.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        let reply = in_ns(self.ns, || http_get(self.addr, &path, None)).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&reply.body).map_err(|e| format!("{e}: {}", reply.body))?;
        if v["status"] != "success" {
            return Err(format!("{expr}: {}", reply.body));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The single value of a query that yields one series, or None when it yields none.
    pub fn value(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr).unwrap_or_else(|e| panic!("query failed: {e}"));
        assert!(result.len() <= 1, "{expr} gave several series: {result:#?}");
        result.first().map(|r| r["value"][1].as_str().unwrap().parse().unwrap())
    }
}

/// `f` inside `ns`, or here.
fn in_ns<R: Send>(ns: Option<&Netns>, f: impl FnOnce() -> R + Send) -> R {
    match ns {
        Some(ns) => ns.run(f),
        None => f(),
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Result of [`syn_flood`].
#[derive(Debug, Clone, Copy)]
pub struct Flood {
    /// connect() calls that sent a SYN.
    pub sent: u64,
    pub elapsed: Duration,
}

/// Sends up to `total` SYNs from inside `ns` to `target` on `ports` (round robin), from
/// `threads` threads: each is a non-blocking connect closed at once (a closed SYN_SENT socket
/// sends nothing more). Stops at `total` or after `limit`, whichever comes first.
pub fn syn_flood(
    ns: &Netns,
    target: IpAddr,
    ports: &[u16],
    total: u64,
    threads: usize,
    limit: Duration,
) -> Flood {
    let next = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let start = Instant::now();
    ns.run(|| {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= total || (i.is_multiple_of(1024) && start.elapsed() > limit) {
                            break;
                        }
                        if connect_once(target, ports[(i % ports.len() as u64) as usize]) {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        })
    });
    Flood { sent: sent.load(Ordering::Relaxed), elapsed: start.elapsed() }
}

/// One non-blocking connect: true when the SYN went out (EINPROGRESS, or refused at once).
/// The socket is closed on return (a closed SYN_SENT socket sends nothing more).
fn connect_once(target: IpAddr, port: u16) -> bool {
    let (_fd, err) = connect_nonblocking(target, port).expect("socket");
    matches!(err, 0 | libc::EINPROGRESS | libc::ECONNREFUSED)
}
