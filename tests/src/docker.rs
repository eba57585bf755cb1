//! The real Docker Engine for tests: a busybox image built locally, containers and networks,
//! each owned by a guard that removes it on drop (also when a test panics), and a relay in
//! front of the daemon's socket that a test can kill and restart.
//!
//! Names are unique per test process and call (other engineers' tests and containers may run
//! at the same time on this machine). The machine's own dockerd is never reconfigured.
use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{IpAddr, TcpListener},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::net::unique;

/// The daemon's own socket.
pub const DOCKER_SOCK: &str = "/var/run/docker.sock";

/// bindtrace's image under test: `BINDTRACE_IMAGE` (set by `./x test`), else `bindtrace:latest`.
pub fn bindtrace_image() -> String {
    std::env::var("BINDTRACE_IMAGE").unwrap_or_else(|_| "bindtrace:latest".to_owned())
}

/// Skips (true) when this machine cannot run bindtrace's image; under CI that is a failure
/// instead.
pub fn skip_without_image() -> bool {
    let why = if !crate::is_root() {
        "needs root"
    } else if !available() {
        "no Docker daemon answers here"
    } else if !docker(&["image", "inspect", &bindtrace_image()]).status.success() {
        "the image is missing (build it with `./x image`)"
    } else {
        return false;
    };
    crate::skip(why);
    true
}

/// Whether a Docker daemon answers here (tests skip without one).
pub fn available() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).stdin(Stdio::null()).output().expect("run docker")
}

/// `docker ARGS`, panicking with its stderr on failure; returns stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A name nobody else uses: `bt-<what><pid>x<n>`.
pub fn unique_name(what: &str) -> String {
    unique(&format!("bt-{what}"))
}

/// A TCP port free on the host right now (for `-p PORT:...`).
pub fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port()
}

/// An image holding Debian's static busybox (`/bin/busybox` of this machine) and a page under
/// /www, made with `docker import` (no registry needed). Removed on drop.
pub struct Image {
    pub tag: String,
}

impl Image {
    pub fn busybox() -> Image {
        Image::busybox_with(&[])
    }

    /// The busybox image with a dynamically linked program of this machine at `inside`, and
    /// the libraries `ldd` says it loads, at their own paths (for the test tools of
    /// `tests/src/bin`, which are not static).
    pub fn busybox_with_program(program: &Path, inside: &str) -> Image {
        let out = Command::new("ldd").arg(program).output().expect("ldd");
        assert!(out.status.success(), "ldd {}: {}", program.display(), String::from_utf8_lossy(&out.stderr));
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let libs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')).map(str::to_owned))
            .collect();
        let mut files: Vec<(&str, &Path)> = libs.iter().map(|l| (l.as_str(), Path::new(l))).collect();
        files.push((inside, program));
        Image::busybox_with(&files)
    }

    /// The busybox image with more files: (path in the image, file on this machine).
    pub fn busybox_with(files: &[(&str, &Path)]) -> Image {
        let tag = format!("{}:busybox", unique_name("img"));
        let root = std::env::temp_dir().join(unique_name("rootfs"));
        for (inside, outside) in files {
            let dest = root.join(inside.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(outside, &dest).unwrap_or_else(|e| panic!("{}: {e}", outside.display()));
        }
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("www")).unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("/bin/busybox (busybox-static)");
        for applet in ["sh", "httpd", "wget", "nc", "sleep", "cat", "echo", "ls", "ps"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        std::fs::write(root.join("www/index.html"), "hello from a bindtrace test\n").unwrap();
        let mut tar = Command::new("tar")
            .args(["-C", root.to_str().unwrap(), "-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        let out = Command::new("docker")
            .args(["import", "-", &tag])
            .stdin(tar.stdout.take().unwrap())
            .output()
            .expect("docker import");
        let _ = tar.wait();
        let _ = std::fs::remove_dir_all(&root);
        assert!(out.status.success(), "docker import: {}", String::from_utf8_lossy(&out.stderr));
        Image { tag }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.tag]);
    }
}

/// A user-defined bridge network, removed on drop (declare it before its containers, so they
/// are dropped first).
pub struct Network {
    pub name: String,
    pub id: String,
}

impl Network {
    pub fn create() -> Network {
        let name = unique_name("net");
        let id = docker_ok(&["network", "create", "--driver", "bridge", &name]);
        Network { name, id }
    }

    /// A user-defined network with IPv6 (`--ipv6`) on a /64 of its own under fd00::/8, made
    /// from the process id and a counter so parallel runs do not ask for the same one (Docker
    /// 20.10 creates it without any daemon setting).
    pub fn create_ipv6() -> Network {
        static N: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let subnet = format!("fd00:{:x}:{:x}::/64", 0xb700 | (n & 0xff), std::process::id() & 0xffff);
        let name = unique_name("net6");
        let id =
            docker_ok(&["network", "create", "--driver", "bridge", "--ipv6", "--subnet", &subnet, &name]);
        Network { name, id }
    }

    /// The Linux bridge Docker made for it.
    pub fn bridge(&self) -> String {
        format!("br-{}", &self.id[..12])
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// A container started with `docker run -d`, removed (with `-f`) on drop.
pub struct Container {
    pub name: String,
    pub id: String,
}

impl Container {
    /// `docker run -d --name <unique> OPTS IMAGE CMD...`.
    pub fn run(image: &Image, opts: &[&str], cmd: &[&str]) -> Container {
        let name = unique_name("ctr");
        let mut args = vec!["run", "-d", "--name", &name];
        args.extend_from_slice(opts);
        args.push(&image.tag);
        args.extend_from_slice(cmd);
        let id = docker_ok(&args);
        Container { name, id }
    }

    pub fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "--format", format, &self.name])
    }

    /// Host pid of the main process.
    pub fn pid(&self) -> u32 {
        self.inspect("{{.State.Pid}}").parse().unwrap()
    }

    /// Address on `network` (`bridge` for the default one).
    pub fn ip(&self, network: &str) -> IpAddr {
        self.inspect(&format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"))
            .parse()
            .unwrap_or_else(|e| panic!("{} has no address on {network}: {e}", self.name))
    }

    /// IPv6 address on `network`.
    pub fn ipv6(&self, network: &str) -> IpAddr {
        self.inspect(&format!("{{{{(index .NetworkSettings.Networks \"{network}\").GlobalIPv6Address}}}}"))
            .parse()
            .unwrap_or_else(|e| panic!("{} has no IPv6 address on {network}: {e}", self.name))
    }

    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    /// Waits until the container's main process listens on `port` (read from its namespace's
    /// /proc/net/tcp{,6}); panics after 10 s.
    pub fn wait_listening(&self, port: u16) {
        crate::proc::wait_socket(self.pid(), port, crate::proc::Bound::TcpListening, &self.name);
    }

    /// Waits until a UDP socket of the container's namespace is bound to `port` and not
    /// connected (read from its /proc/net/udp{,6}); panics after 10 s.
    pub fn wait_udp_bound(&self, port: u16) {
        crate::proc::wait_socket(self.pid(), port, crate::proc::Bound::Udp, &self.name);
    }

    /// Waits for the container to exit; returns its exit code.
    pub fn wait_exit(&self) -> i32 {
        docker_ok(&["wait", &self.name]).parse().unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

/// `curl -sS --max-time 5 URL`: exit code and body.
pub fn curl(url: &str) -> (i32, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "5", url]).output().expect("run curl");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A unix-socket relay in front of the Docker daemon's socket: what bindtrace sees as the
/// daemon going away and coming back, without touching the daemon. `stop` closes the
/// listening socket and every relayed connection (the event stream included).
///
/// The relay itself must not be what fails: an error of one `accept` or one upstream connect
/// costs that connection only (counted, see [`Relay::stats`]), never the acceptor, and a
/// connection's descriptors are let go when both its directions end, so an hour of requests
/// does not pile up descriptors in the test process.
pub struct Relay {
    pub path: PathBuf,
    upstream: PathBuf,
    running: Option<Running>,
    stats: Arc<RelayStats>,
}

/// What the relay did since it was made (over every stop and resume).
#[derive(Debug, Default)]
pub struct RelayStats {
    pub accepted: AtomicU64,
    /// Accepted connections dropped because the daemon's socket did not take the connection.
    pub upstream_failures: AtomicU64,
    /// `accept` errors other than "nothing pending" (the acceptor goes on).
    pub accept_errors: AtomicU64,
    /// Connections cut by `stop`.
    pub cut: AtomicU64,
}

struct Running {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, [UnixStream; 2]>>>,
    acceptor: JoinHandle<()>,
    resumed: Instant,
}

impl Relay {
    pub fn start(upstream: &str) -> Relay {
        let path = std::env::temp_dir().join(format!("{}.sock", unique_name("relay")));
        let mut r = Relay { path, upstream: upstream.into(), running: None, stats: Arc::default() };
        r.resume();
        r
    }

    /// (Re)opens the relay's socket.
    pub fn resume(&mut self) {
        assert!(self.running.is_none(), "relay already running");
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).expect("bind relay socket");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<HashMap<u64, [UnixStream; 2]>>> = Arc::default();
        let (stop2, conns2, upstream, stats) =
            (stop.clone(), conns.clone(), self.upstream.clone(), self.stats.clone());
        let acceptor = std::thread::spawn(move || {
            let mut next_id = 0u64;
            while !stop2.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(e) => {
                        stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("relay: accept: {e} (going on)");
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                next_id += 1;
                if let Err(e) = relay_one(next_id, client, &upstream, &conns2) {
                    stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("relay: connection {next_id} dropped: {e}");
                }
            }
        });
        self.running = Some(Running { stop, conns, acceptor, resumed: Instant::now() });
    }

    /// Kills the relay: the socket disappears and every relayed connection is cut.
    pub fn stop(&mut self) {
        let Some(r) = self.running.take() else { return };
        r.stop.store(true, Ordering::SeqCst);
        let _ = r.acceptor.join();
        let _ = std::fs::remove_file(&self.path);
        for [client, server] in r.conns.lock().unwrap().drain().map(|(_, c)| c) {
            self.stats.cut.fetch_add(1, Ordering::Relaxed);
            let _ = client.shutdown(std::net::Shutdown::Both);
            let _ = server.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The relay's own account, for a failure's message: is it running (and for how long),
    /// connections open now, and the counters.
    pub fn stats(&self) -> String {
        let s = &self.stats;
        let state = match &self.running {
            Some(r) => format!(
                "running for {:.1}s ({} connections open, acceptor {})",
                r.resumed.elapsed().as_secs_f64(),
                r.conns.lock().unwrap().len(),
                if r.acceptor.is_finished() { "ENDED" } else { "alive" }
            ),
            None => "stopped".to_owned(),
        };
        format!(
            "relay {state}; since start: {} accepted, {} dropped at the upstream connect, {} accept errors, {} cut by stops",
            s.accepted.load(Ordering::Relaxed),
            s.upstream_failures.load(Ordering::Relaxed),
            s.accept_errors.load(Ordering::Relaxed),
            s.cut.load(Ordering::Relaxed)
        )
    }
}

/// Connects `client` to the daemon and pipes both ways; `conns` holds the connection (for
/// `stop` to cut) until both directions have ended.
fn relay_one(
    id: u64,
    client: UnixStream,
    upstream: &Path,
    conns: &Arc<Mutex<HashMap<u64, [UnixStream; 2]>>>,
) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let server = UnixStream::connect(upstream)?;
    let (c2, s2) = (client.try_clone()?, server.try_clone()?);
    let held = [client.try_clone()?, server.try_clone()?];
    conns.lock().unwrap().insert(id, held);
    let ends = Arc::new(AtomicU8::new(0));
    for (from, to) in [(client, server), (s2, c2)] {
        let (ends, conns) = (ends.clone(), conns.clone());
        std::thread::spawn(move || {
            pipe(from, to);
            // The second direction to end lets the connection go.
            if ends.fetch_add(1, Ordering::SeqCst) == 1 {
                conns.lock().unwrap().remove(&id);
            }
        });
    }
    Ok(())
}

/// Copies `from` to `to` until `from` ends, then half-closes `to`.
fn pipe(mut from: UnixStream, mut to: UnixStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A veth from the host's (root) namespace to a namespace of the test's own, with a /30 of
/// 198.18.0.0/15 (the benchmarking range, which nothing else here uses): the host side has
/// `.1`, the namespace side `.2`. Deleted with the namespace.
pub struct HostLink {
    pub ns: crate::Netns,
    pub host_ifname: String,
    pub host_ip: IpAddr,
    pub ns_ip: IpAddr,
}

impl HostLink {
    pub fn new() -> HostLink {
        let ns = crate::Netns::new("btcli");
        let host_ifname = unique("bd");
        let (x, y) = (std::process::id() % 250, (crate::net::next_seq() % 63) * 4);
        let host_ip: IpAddr = format!("198.18.{x}.{}", y + 1).parse().unwrap();
        let ns_ip: IpAddr = format!("198.18.{x}.{}", y + 2).parse().unwrap();
        crate::net::ip(&[
            "link",
            "add",
            &host_ifname,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns.name,
        ]);
        crate::net::ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_ifname]);
        crate::net::ip(&["link", "set", &host_ifname, "up"]);
        ns.ip(&["addr", "add", &format!("{ns_ip}/30"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        HostLink { ns, host_ifname, host_ip, ns_ip }
    }
}

impl Default for HostLink {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_ifname]).status();
    }
}
