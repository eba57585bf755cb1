//! The framework hints (bindtrace/src/diagnose/framework.rs) run against the real programs:
//! each server is started in a plain network namespace on a bridge, bound to loopback (its
//! default, or an explicit loopback argument), and reached through a DNAT rule in the host
//! namespace. bindtrace's line must name the server and give a fix; the fix, run as the line
//! says, must listen on 0.0.0.0 or `[::]` and take the same forwarded connection.
//!
//! The PyPI servers come from the venv `./x setup` makes (`target/hints-venv`), PHP from
//! Debian's php-cli; busybox is the tests' own. See docs/hints.md for the table of hints and
//! the ones not executed here. Run as root through `sudo ./x test hints`.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bindtrace_tests::{Bindtrace, Hook, Netns, Topology, root_or_skip, skip};

/// Where the host namespace's DNAT rule listens: an address of the host namespace's own.
const FRONT: &str = "198.18.0.1";
const FRONT_PORT: u16 = 18000;
/// The port every server listens on in its namespace.
const PORT: u16 = 8000;
/// Jupyter and Streamlit take seconds to start on a loaded 2-core machine.
const START: Duration = Duration::from_secs(90);
const WAIT: Duration = Duration::from_secs(20);

fn venv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/hints-venv")
}

/// Skips (false) without root or without what `./x setup` installs; under CI that fails.
fn ready(needs: &[&Path]) -> bool {
    if !root_or_skip() {
        return false;
    }
    if let Some(missing) = needs.iter().find(|p| !p.exists()) {
        skip(&format!("{} is missing: run `sudo ./x setup`", missing.display()));
        return false;
    }
    true
}

/// A server process in a namespace (`ip netns exec` execs it), in a process group of its own:
/// the whole group (pre-forked workers, kernels) is killed on drop.
struct Server {
    child: Child,
    what: String,
}

impl Server {
    fn start(ns: &Netns, dir: &Path, env: &[(&str, &str)], argv: &[String]) -> Server {
        let path = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            venv().join("bin").display()
        );
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "env", &format!("PATH={path}"), "HOME=/tmp"])
            .args(env.iter().map(|(k, v)| format!("{k}={v}")))
            .args(argv)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("ip netns exec");
        Server { child, what: argv.join(" ") }
    }

    /// Waits until something in the namespace listens on PORT; returns the bound address.
    fn wait_listening(&mut self, dir: &Path) -> IpAddr {
        let deadline = Instant::now() + START;
        loop {
            if let Some(addr) = listening_on(self.child.id(), PORT) {
                return addr;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.what, log(dir));
            }
            assert!(Instant::now() < deadline, "{} never listened on {PORT}:\n{}", self.what, log(dir));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let group = -(self.child.id() as i32);
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
}

/// The address a socket listening on `port` is bound to, from the namespace of `pid`
/// (`/proc/PID/net/tcp{,6}`, state 0A).
fn listening_on(pid: u32, port: u16) -> Option<IpAddr> {
    let want = format!("{port:04X}");
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok()?;
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some((addr, p)) = f.get(1).and_then(|a| a.split_once(':')) else { continue };
            if p == want && f.get(3) == Some(&"0A") {
                return Some(hex_addr(addr));
            }
        }
    }
    None
}

fn hex_addr(hex: &str) -> IpAddr {
    let words: Vec<[u8; 4]> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).unwrap().to_ne_bytes())
        .collect();
    if words.len() == 1 {
        IpAddr::from(words[0])
    } else {
        let mut b = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(w);
        }
        IpAddr::from(b)
    }
}

/// A connection from the host namespace to FRONT:FRONT_PORT, which DNAT sends to the server.
fn dial(host: &Netns) -> std::io::Result<TcpStream> {
    host.run(|| {
        TcpStream::connect_timeout(
            &SocketAddr::new(FRONT.parse().unwrap(), FRONT_PORT),
            Duration::from_secs(5),
        )
    })
}

/// The topology: a host namespace with docker0, a container namespace on it, and in the host
/// namespace FRONT (on its loopback interface) DNATed to the container's PORT.
struct Place {
    topo: Topology,
    ns: Netns,
    dir: PathBuf,
}

impl Place {
    fn new(name: &str) -> Place {
        let mut topo = Topology::new();
        let c = topo.container();
        topo.host.ip(&["addr", "add", &format!("{FRONT}/32"), "dev", "lo"]);
        let dnat = Command::new("ip")
            .args([
                "netns",
                "exec",
                &topo.host.name,
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-d",
                FRONT,
            ])
            .args(["-p", "tcp", "--dport", &FRONT_PORT.to_string(), "-j", "DNAT", "--to-destination"])
            .arg(format!("{}:{PORT}", c.ipv4))
            .status()
            .unwrap();
        assert!(dnat.success(), "iptables DNAT in the host namespace");
        let dir = std::env::temp_dir().join(bindtrace_tests::net::unique(&format!("bt-hint-{name}")));
        std::fs::create_dir_all(&dir).unwrap();
        Place { topo, ns: c.ns, dir }
    }

    fn write(&self, file: &str, text: &str) {
        let path = self.dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = &self.topo;
    }
}

/// The fix a hint gives, applied: with "is started with `OLD`: use `NEW`", OLD replaced by NEW
/// in `argv`; with "use `CMD`" (the server's own flag), CMD's words followed by `rest`.
fn apply(hint: &str, argv: &[String], rest: &[&str]) -> Vec<String> {
    let quoted = |after: &str| -> Option<String> {
        let start = hint.find(after)? + after.len();
        Some(hint[start..].split('`').next()?.to_owned())
    };
    let new = quoted(": use `").unwrap_or_else(|| panic!("no fix in the hint: {hint}"));
    match quoted("is started with `") {
        Some(old) => {
            let joined = argv.join(" ");
            assert!(joined.contains(&old), "{old:?} is not in {joined:?}");
            joined.replacen(&old, &new, 1).split(' ').map(str::to_owned).collect()
        }
        None => new.split(' ').map(str::to_owned).chain(rest.iter().map(|s| s.to_string())).collect(),
    }
}

/// The whole check for one server: `loopback` (with `env`) listens on loopback only and the
/// forwarded connection is refused; bindtrace names `framework` and gives a fix; the fix
/// (plus `rest` when it is the server's own flag) listens on a wildcard address and the
/// forwarded connection is answered.
fn check(place: &Place, framework: &str, env: &[(&str, &str)], loopback: &[&str], rest: &[&str]) {
    let argv: Vec<String> = loopback.iter().map(|s| s.to_string()).collect();
    let bt = Bindtrace::start(&place.topo.host, Hook::KfreeSkb, &[]);
    let hint = {
        let mut server = Server::start(&place.ns, &place.dir, env, &argv);
        let bound = server.wait_listening(&place.dir);
        assert!(bound.is_loopback(), "{framework} should start on loopback here, not {bound}");
        let err = dial(&place.topo.host).expect_err("a loopback-only server refuses forwarded connections");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        let line = bt.expect_refused(PORT);
        assert_eq!(line["verdict"], "loopback_only", "{line:#}");
        let hint = line["hint"].as_str().unwrap().to_owned();
        assert!(hint.contains(&format!("{framework} ")), "the hint should name {framework}: {hint}");
        hint
    };
    let fixed = apply(&hint, &argv, rest);
    let mut server = Server::start(&place.ns, &place.dir, &[], &fixed);
    let bound = server.wait_listening(&place.dir);
    assert!(bound.is_unspecified(), "`{}` (from the hint: {hint}) binds {bound}", fixed.join(" "));
    let mut conn = dial(&place.topo.host).unwrap_or_else(|e| {
        panic!("`{}` listens, but the forwarded connection failed: {e}", fixed.join(" "))
    });
    // An HTTP answer of any status: the server itself took the connection.
    conn.set_read_timeout(Some(WAIT)).unwrap();
    conn.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut head = [0u8; 5];
    conn.read_exact(&mut head).unwrap_or_else(|e| panic!("no answer from `{}`: {e}", fixed.join(" ")));
    assert_eq!(&head, b"HTTP/", "`{}` answered {head:?}", fixed.join(" "));
}

const WSGI_APP: &str = "def app(environ, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [b'ok\\n']\n";
const ASGI_APP: &str = "async def app(scope, receive, send):\n    if scope['type'] != 'http':\n        return\n    await send({'type': 'http.response.start', 'status': 200, 'headers': [(b'content-type', b'text/plain')]})\n    await send({'type': 'http.response.body', 'body': b'ok\\n'})\n";

fn python() -> PathBuf {
    venv().join("bin/python")
}

#[test]
fn http_server() {
    if !ready(&[&python()]) {
        return;
    }
    let p = Place::new("httpserver");
    let port = PORT.to_string();
    check(
        &p,
        "python -m http.server",
        &[],
        &["python", "-m", "http.server", "--bind", "127.0.0.1", &port],
        &[],
    );
}

#[test]
fn flask_run() {
    if !ready(&[&venv().join("bin/flask")]) {
        return;
    }
    let p = Place::new("flask");
    p.write(
        "app.py",
        "from flask import Flask\napp = Flask(__name__)\n\n@app.get('/')\ndef index():\n    return 'ok'\n",
    );
    let port = PORT.to_string();
    check(
        &p,
        "flask run",
        &[("FLASK_APP", "app.py")],
        &["flask", "run", "--port", &port],
        &["--port", &port],
    );
}

#[test]
fn django_runserver() {
    let admin = venv().join("bin/django-admin");
    if !ready(&[&admin]) {
        return;
    }
    let p = Place::new("django");
    let made =
        Command::new(&admin).args(["startproject", "hintsite", "."]).current_dir(&p.dir).status().unwrap();
    assert!(made.success(), "django-admin startproject");
    let port = PORT.to_string();
    check(
        &p,
        "django runserver",
        &[],
        &["python", "manage.py", "runserver", "--noreload", &port],
        &["--noreload"],
    );
}

#[test]
fn uvicorn() {
    if !ready(&[&venv().join("bin/uvicorn")]) {
        return;
    }
    let p = Place::new("uvicorn");
    p.write("main.py", ASGI_APP);
    let port = PORT.to_string();
    check(&p, "uvicorn", &[], &["uvicorn", "main:app", "--port", &port], &["main:app", "--port", &port]);
}

#[test]
fn gunicorn() {
    if !ready(&[&venv().join("bin/gunicorn")]) {
        return;
    }
    let p = Place::new("gunicorn");
    p.write("wsgi.py", WSGI_APP);
    // gunicorn's default is 127.0.0.1:8000.
    check(&p, "gunicorn", &[], &["gunicorn", "wsgi:app"], &["wsgi:app"]);
}

/// Another loopback endpoint on the command line (a statsd sink) is not the listener: the
/// fix must rewrite `-b`, not `--statsd-host` (issue 16, advice bug c).
#[test]
fn gunicorn_with_a_statsd_host() {
    if !ready(&[&venv().join("bin/gunicorn")]) {
        return;
    }
    let p = Place::new("gunicorn-statsd");
    p.write("wsgi.py", WSGI_APP);
    let addr = format!("127.0.0.1:{PORT}");
    check(
        &p,
        "gunicorn",
        &[],
        &["gunicorn", "--statsd-host", "localhost:8125", "-b", &addr, "wsgi:app"],
        &[],
    );
}

#[test]
fn hypercorn() {
    if !ready(&[&venv().join("bin/hypercorn")]) {
        return;
    }
    let p = Place::new("hypercorn");
    p.write("main.py", ASGI_APP);
    // hypercorn's default is 127.0.0.1:8000.
    check(&p, "hypercorn", &[], &["hypercorn", "main:app"], &["main:app"]);
}

#[test]
fn streamlit() {
    if !ready(&[&venv().join("bin/streamlit")]) {
        return;
    }
    let p = Place::new("streamlit");
    p.write("app.py", "import streamlit as st\nst.write('ok')\n");
    let port = PORT.to_string();
    // Streamlit listens on every address unless told otherwise: here a config variable says
    // loopback, so the command line has no address to rewrite and the hint is Streamlit's flag.
    let rest = ["app.py", "--server.headless", "true", "--server.port", &port];
    let mut loopback = vec!["streamlit", "run"];
    loopback.extend(rest);
    check(&p, "streamlit", &[("STREAMLIT_SERVER_ADDRESS", "127.0.0.1")], &loopback, &rest);
}

#[test]
fn jupyter_lab() {
    if !ready(&[&venv().join("bin/jupyter-lab")]) {
        return;
    }
    let p = Place::new("jupyter");
    let port = PORT.to_string();
    let rest = ["--allow-root", "--no-browser", "--port", &port, "--ServerApp.token="];
    let mut loopback = vec!["jupyter", "lab"];
    loopback.extend(rest);
    check(&p, "jupyter", &[], &loopback, &rest);
}

#[test]
fn busybox_httpd() {
    if !ready(&[Path::new("/bin/busybox")]) {
        return;
    }
    let p = Place::new("busybox");
    p.write("www/index.html", "ok\n");
    let addr = format!("127.0.0.1:{PORT}");
    check(&p, "busybox httpd", &[], &["busybox", "httpd", "-f", "-p", &addr, "-h", "www"], &[]);
}

#[test]
fn php_builtin_server() {
    if !ready(&[Path::new("/usr/bin/php")]) {
        return;
    }
    let p = Place::new("php");
    p.write("index.php", "<?php echo 'ok';\n");
    let addr = format!("127.0.0.1:{PORT}");
    check(&p, "php -S", &[], &["php", "-S", &addr], &[]);
}
