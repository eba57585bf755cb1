//! Against the real Docker Engine of this machine: containers, published ports, docker-proxy,
//! DNAT and direct connections, networks created while running, the audit, `bindtrace check`,
//! and the daemon going away. Run as root through `sudo ./x test`.
//!
//! Images are built locally (busybox, `docker import`); every image, container and network is
//! removed by its guard, also on panic. Host ports are picked free at run time, names are
//! unique, and traffic only goes to addresses of containers and namespaces these tests make.
use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::MetadataExt,
    process::Command,
    time::Duration,
};

use bindtrace_tests::{
    Bindtrace,
    bindtrace::binary,
    docker::{self, Container, DOCKER_SOCK, HostLink, Image, Network, Relay, curl, free_port},
    native::programs_held_by,
    root_or_skip,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);
const QUIET: Duration = Duration::from_millis(1500);

/// True when this test cannot run here (see `bindtrace_tests::skip`: under `CI` it fails).
fn skip() -> bool {
    if !root_or_skip() {
        return true;
    }
    if !docker::available() {
        bindtrace_tests::skip("no Docker daemon answers here");
        return true;
    }
    false
}

/// busybox httpd serving /www on ADDR:PORT inside the container.
fn httpd(addr: &str, port: u16) -> Vec<String> {
    ["httpd", "-f", "-p", &format!("{addr}:{port}"), "-h", "/www"].map(String::from).to_vec()
}

fn run(img: &Image, opts: &[&str], cmd: &[String]) -> Container {
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    Container::run(img, opts, &cmd)
}

fn refused_for(bt: &Bindtrace, c: &Container) -> Value {
    bt.expect_line(&format!("refused for {}", c.name), WAIT, |l| {
        l["event"] == "refused" && l["container"]["name"] == c.name.as_str()
    })
}

fn lines_for(bt: &Bindtrace, event: &str, c: &Container) -> Vec<Value> {
    bt.lines()
        .into_iter()
        .filter(|l| l["event"] == event && l["container"]["name"] == c.name.as_str())
        .collect()
}

fn count_stderr(bt: &Bindtrace, needle: &str) -> usize {
    bt.stderr().lines().filter(|l| l.contains(needle)).count()
}

/// Waits until stderr has `n` lines containing both `needle` and `also`.
fn wait_stderr_count(bt: &Bindtrace, needle: &str, also: &str, n: usize) {
    for _ in 0..300 {
        if bt.stderr().lines().filter(|l| l.contains(needle) && l.contains(also)).count() >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("stderr never had {n} lines with {needle:?} and {also:?}:\n{}", bt.stderr());
}

/// Connects to `to` until a line matching `pred` comes (at most 30 tries, each waiting up to
/// 100 ms for the line): for refusals that may land in a moment bindtrace cannot attribute
/// yet (a namespace being watched, an inventory being read), where one dial is not enough.
fn connect_until_line(bt: &Bindtrace, to: SocketAddr, pred: impl Fn(&Value) -> bool) -> Option<Value> {
    for _ in 0..30 {
        let _ = TcpStream::connect_timeout(&to, Duration::from_secs(2));
        if bt.has_line_within(Duration::from_millis(100), &pred) {
            return bt.lines().into_iter().find(|l| pred(l));
        }
    }
    None
}

/// 1. The classic: a loopback-bound server behind `-p`; curl gets an empty reply or a reset,
///    bindtrace names the container, the published port, docker-proxy and the httpd pid. The
///    same server bound to 0.0.0.0 serves the page and causes no event.
#[test]
fn loopback_server_behind_docker_proxy() {
    if skip() {
        return;
    }
    let img = Image::busybox();
    let (port, other_port, good_port) = (free_port(), free_port(), free_port());
    // Published twice: the line names the binding the connection used.
    let bad = run(
        &img,
        &["-p", &format!("{other_port}:8000"), "-p", &format!("{port}:8000")],
        &httpd("127.0.0.1", 8000),
    );
    let good = run(&img, &["-p", &format!("{good_port}:8000")], &httpd("0.0.0.0", 8000));
    bad.wait_listening(8000);
    good.wait_listening(8000);
    let mut bt = Bindtrace::start_here(&[]);

    let (code, _) = curl(&format!("http://localhost:{port}/"));
    assert!(code == 52 || code == 56, "curl should get an empty reply (52) or a reset (56), got {code}");
    let line = refused_for(&bt, &bad);
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["via"], "docker-proxy", "{line:#}");
    assert_eq!(line["client_process"]["comm"], "docker-proxy", "{line:#}");
    assert_eq!(line["published"]["host_port"], port, "{line:#}");
    let host_ip = line["published"]["host_ip"].as_str().unwrap();
    assert!(host_ip == "0.0.0.0" || host_ip == "::", "{line:#}");
    assert_eq!(line["container"]["id"], bad.short_id());
    assert_eq!(line["container"]["image"], img.tag.as_str());
    assert_eq!(line["bridge"], "docker0");
    assert_eq!(line["target_ip"], bad.ip("bridge").to_string());
    assert_eq!(line["target_port"], 8000);
    let holder = &line["listeners"][0]["pids"][0];
    assert_eq!(line["listeners"][0]["ip"], "127.0.0.1", "{line:#}");
    assert_eq!(holder["pid"], bad.pid(), "{line:#}");
    assert_eq!(holder["container_pid"], 1, "{line:#}");
    assert_eq!(holder["comm"], "httpd");
    assert!(holder["cmdline"].as_str().unwrap().contains("httpd -f -p 127.0.0.1:8000"), "{line:#}");
    let hint = line["hint"].as_str().unwrap();
    assert!(hint.contains(&format!("-p 127.0.0.1:{port}:8000")), "{hint}");
    assert!(hint.contains("`-p 0.0.0.0:8000`"), "{hint}");

    let (code, body) = curl(&format!("http://localhost:{good_port}/"));
    assert_eq!((code, body.as_str()), (0, "hello from a bindtrace test\n"));
    // After the exit flush, which prints everything counted.
    assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
    assert!(lines_for(&bt, "refused", &good).is_empty(), "{:#?}", bt.lines());
    assert!(lines_for(&bt, "audit", &good).is_empty(), "{:#?}", bt.lines());
}

/// 2. DNAT: a client in a namespace of our own, on a veth to the host, dials a host address on
///    the published port; the kernel NATs it to the container.
#[test]
fn dnat_from_another_namespace() {
    if skip() {
        return;
    }
    let img = Image::busybox();
    let port = free_port();
    let c = run(&img, &["-p", &format!("{port}:8000")], &httpd("127.0.0.1", 8000));
    c.wait_listening(8000);
    let link = HostLink::new();
    let bt = Bindtrace::start_here(&[]);

    let err = link
        .ns
        .run(|| TcpStream::connect_timeout(&SocketAddr::new(link.host_ip, port), Duration::from_secs(3)))
        .expect_err("refused through the NAT");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let line = refused_for(&bt, &c);
    assert_eq!(line["via"], "dnat", "{line:#}");
    assert_eq!(line["verdict"], "loopback_only");
    assert_eq!(line["client_ip"], link.ns_ip.to_string(), "{line:#}");
    assert_eq!(line["original"]["client_ip"], link.ns_ip.to_string(), "{line:#}");
    assert_eq!(line["original"]["target_ip"], link.host_ip.to_string(), "{line:#}");
    assert_eq!(line["original"]["target_port"], port);
    assert_eq!(line["published"]["host_port"], port);
    assert_eq!(line["published"]["host_ip"], "0.0.0.0");
    assert_eq!(line["target_ip"], c.ip("bridge").to_string());
    assert!(line["client_process"].is_null(), "{line:#}");
}

/// 3. Direct: the host dials the container's address; then a second container dials it.
#[test]
fn direct_from_the_host_and_from_another_container() {
    if skip() {
        return;
    }
    let img = Image::busybox();
    let target = run(&img, &[], &httpd("127.0.0.1", 8000));
    target.wait_listening(8000);
    let ip = target.ip("bridge");
    let bt = Bindtrace::start_here(&["--fold-window", "200ms"]);

    let curl_run = Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://{ip}:8000/")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let curl_pid = curl_run.id();
    let status = curl_run.wait_with_output().unwrap().status;
    assert_eq!(status.code(), Some(7), "connection refused");
    let line = refused_for(&bt, &target);
    assert_eq!(line["via"], "direct", "{line:#}");
    assert_eq!(line["client_process"]["comm"], "curl", "{line:#}");
    assert_eq!(line["client_process"]["pid"], curl_pid, "{line:#}");
    assert!(line["client_container"].is_null());
    assert!(line["published"].is_null(), "{line:#}");

    std::thread::sleep(Duration::from_millis(400));
    // busybox nc (its static wget crashes without an NSS setup in the container). The client
    // container stays up: one that exits within milliseconds may be gone before Docker has
    // reported it, and is then named by process only.
    let client = run(&img, &[], &["sh".into(), "-c".into(), format!("nc -w 2 {ip} 8000; sleep 60")]);
    let line = bt.expect_line("refused from the second container", WAIT, |l| {
        l["event"] == "refused"
            && l["container"]["name"] == target.name.as_str()
            && !l["client_container"].is_null()
    });
    assert_eq!(line["via"], "direct", "{line:#}");
    assert_eq!(line["client_container"]["name"], client.name.as_str(), "{line:#}");
    assert_eq!(line["client_process"]["comm"], "nc", "{line:#}");
    assert_eq!(line["client_ip"], client.ip("bridge").to_string());
}

/// 4. A network created after bindtrace started is followed; a container on two networks is
///    reported on the one the connection came through.
#[test]
fn networks_created_later_and_two_networks() {
    if skip() {
        return;
    }
    let img = Image::busybox();
    let bt = Bindtrace::start_here(&[]);
    let net = Network::create();
    assert!(
        bt.wait_stderr(&format!("following Docker network bridge {}", net.bridge()), WAIT),
        "{}",
        bt.stderr()
    );
    let port = free_port();
    let c = run(&img, &["--network", &net.name, "-p", &format!("{port}:8000")], &httpd("127.0.0.1", 8000));
    c.wait_listening(8000);
    // The audit sees it as soon as its interface and its Docker details are both known.
    bt.expect_line("audit on the new network", WAIT, |l| {
        l["event"] == "audit" && l["container"]["name"] == c.name.as_str()
    });
    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert!(code == 52 || code == 56, "curl exit {code}");
    let line = refused_for(&bt, &c);
    assert_eq!(line["bridge"], net.bridge().as_str(), "{line:#}");
    assert_eq!(line["via"], "docker-proxy", "{line:#}");
    assert_eq!(line["target_ip"], c.ip(&net.name).to_string());

    let two = run(&img, &[], &httpd("127.0.0.1", 9000));
    two.wait_listening(9000);
    docker::docker_ok(&["network", "connect", &net.name, &two.name]);
    // Watched once the new interface is inside the container (Docker moves it an instant
    // after enslaving its host side).
    let netns = std::fs::metadata(format!("/proc/{}/ns/net", two.pid())).unwrap().ino();
    wait_stderr_count(&bt, &format!("{}: watching", net.bridge()), &format!("(netns {netns},"), 1);
    let via_net = two.ip(&net.name);
    let err =
        TcpStream::connect_timeout(&SocketAddr::new(via_net, 9000), Duration::from_secs(3)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let line = refused_for(&bt, &two);
    assert_eq!(line["bridge"], net.bridge().as_str(), "{line:#}");
    assert_eq!(line["target_ip"], via_net.to_string());
    assert_eq!(line["via"], "direct");
    let via_bridge: IpAddr = two.ip("bridge");
    let _ =
        TcpStream::connect_timeout(&SocketAddr::new(via_bridge, 9000), Duration::from_secs(3)).unwrap_err();
    let line = bt.expect_line("refused through docker0", WAIT, |l| {
        l["event"] == "refused" && l["container"]["name"] == two.name.as_str() && l["bridge"] == "docker0"
    });
    assert_eq!(line["target_ip"], via_bridge.to_string());

    // Removing the network detaches its bridge.
    let bridge = net.bridge();
    drop((two, c));
    drop(net);
    assert!(bt.wait_stderr(&format!("Docker network bridge {bridge} removed"), WAIT), "{}", bt.stderr());
}

/// 5. Published 8000, the service listens on 0.0.0.0:3000: `no_listener` naming 3000 (and the
///    compose project and service, from the container's labels).
#[test]
fn port_mismatch_names_the_port_that_listens() {
    if skip() {
        return;
    }
    let img = Image::busybox();
    let port = free_port();
    // With the labels docker compose puts on its containers.
    let c = run(
        &img,
        &[
            "-p",
            &format!("{port}:8000"),
            "--label",
            "com.docker.compose.project=shop",
            "--label",
            "com.docker.compose.service=web",
        ],
        &httpd("0.0.0.0", 3000),
    );
    c.wait_listening(3000);
    let bt = Bindtrace::start_here(&[]);
    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert!(code == 52 || code == 56, "curl exit {code}");
    let line = refused_for(&bt, &c);
    assert_eq!(line["verdict"], "no_listener", "{line:#}");
    assert!(line["listeners"].as_array().unwrap().iter().any(|l| l["port"] == 3000), "{line:#}");
    let hint = line["hint"].as_str().unwrap();
    assert!(hint.contains(&format!("-p {port}:3000")), "{hint}");
    assert_eq!(line["container"]["compose_project"], "shop", "{line:#}");
    assert_eq!(line["container"]["compose_service"], "web", "{line:#}");
}

fn check(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary()).arg("check").args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// 6. The audit reports case 1 before any connection (and a port nothing listens on after the
///    grace period); `bindtrace check` exits 1 for it, 0 when every published port is reachable,
///    3 when it cannot run.
#[test]
fn audit_and_check() {
    if skip() {
        return;
    }
    let img = Image::busybox();
    let bt = Bindtrace::start_here(&["--audit-grace", "2s"]);
    let (port, good_port, idle_port) = (free_port(), free_port(), free_port());
    let bad = run(&img, &["-p", &format!("{port}:8000")], &httpd("127.0.0.1", 8000));
    let good = run(&img, &["-p", &format!("{good_port}:8000")], &httpd("0.0.0.0", 8000));
    let idle = run(&img, &["-p", &format!("{idle_port}:8000")], &["sleep".into(), "60".into()]);
    let audit = bt.expect_line("audit of the loopback server", WAIT, |l| {
        l["event"] == "audit" && l["container"]["name"] == bad.name.as_str()
    });
    assert_eq!(audit["verdict"], "loopback_only", "{audit:#}");
    assert_eq!(audit["target_port"], 8000);
    assert_eq!(audit["published"]["host_port"], port);
    assert_eq!(audit["listeners"][0]["ip"], "127.0.0.1");
    assert!(audit["hint"].as_str().unwrap().contains(&format!("-p 127.0.0.1:{port}:8000")), "{audit:#}");
    let idle_audit = bt.expect_line("audit of the idle container", WAIT, |l| {
        l["event"] == "audit" && l["container"]["name"] == idle.name.as_str()
    });
    assert_eq!(idle_audit["verdict"], "no_listener", "{idle_audit:#}");
    good.wait_listening(8000);
    std::thread::sleep(QUIET);
    assert!(lines_for(&bt, "audit", &good).is_empty(), "{:#?}", bt.lines());
    assert!(
        bt.lines().iter().all(|l| l["event"] != "refused" || l["container"]["name"] != bad.name.as_str())
    );

    let (code, out, err) = check(&[&bad.name]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("loopback_only") && out.contains(&bad.name), "{out}");
    let (code, out, err) = check(&["--format", "json", &bad.name, &good.name]);
    assert_eq!(code, Some(1), "{out}{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["exit_code"], 1);
    let verdicts: Vec<&str> =
        doc["ports"].as_array().unwrap().iter().map(|p| p["verdict"].as_str().unwrap()).collect();
    assert_eq!(verdicts.len(), 2, "{doc:#}");
    assert!(verdicts.contains(&"loopback_only") && verdicts.contains(&"ok"), "{doc:#}");
    let (code, out, err) = check(&[&good.name]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = check(&["--audit-grace", "0s", &idle.name]);
    assert_eq!(code, Some(2), "{out}{err}");
    let (code, _, err) = check(&["--docker-host", "/nonexistent/docker.sock"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("/nonexistent/docker.sock"), "{err}");
}

/// 7. The Docker socket goes away and comes back while bindtrace runs: no crash, one warning,
///    container details resume.
#[test]
fn docker_socket_goes_away_and_comes_back() {
    if skip() {
        return;
    }
    let img = Image::busybox();
    let mut relay = Relay::start(DOCKER_SOCK);
    let bt =
        Bindtrace::start_here(&["--docker-host", relay.path().to_str().unwrap(), "--fold-window", "200ms"]);
    assert!(bt.stderr().contains("Docker: "), "{}", bt.stderr());

    relay.stop();
    assert!(bt.wait_stderr("unavailable", WAIT), "{}", bt.stderr());
    // Started while bindtrace cannot see Docker: refused, reported without its name.
    let port = free_port();
    let c = run(&img, &["-p", &format!("{port}:8000")], &httpd("127.0.0.1", 8000));
    c.wait_listening(8000);
    let ip = c.ip("bridge");
    let caught = connect_until_line(&bt, SocketAddr::new(ip, 8000), |l| {
        l["event"] == "refused" && l["target_ip"] == ip.to_string()
    });
    let line = caught.unwrap_or_else(|| panic!("no refusal while Docker was away:\n{}", bt.stderr()));
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert!(line["container"].is_null(), "{line:#}");

    relay.resume();
    assert!(bt.wait_stderr("is back: container details resume", WAIT), "{}", bt.stderr());
    std::thread::sleep(Duration::from_millis(300));
    let _ = TcpStream::connect_timeout(&SocketAddr::new(ip, 8000), Duration::from_secs(2));
    let line = refused_for(&bt, &c);
    assert_eq!(line["verdict"], "loopback_only");
    assert_eq!(count_stderr(&bt, "WARN"), 1, "one warning for the outage:\n{}", bt.stderr());
    assert!(bt.stderr().lines().filter(|l| l.contains("unavailable")).count() == 1, "{}", bt.stderr());
    drop(bt);
}

/// `--no-docker`: the detector of before, by namespace and address, with no API calls.
#[test]
fn no_docker_keeps_the_plain_detector() {
    if skip() {
        return;
    }
    let img = Image::busybox();
    let port = free_port();
    let c = run(&img, &["-p", &format!("{port}:8000")], &httpd("127.0.0.1", 8000));
    c.wait_listening(8000);
    let ip = c.ip("bridge");
    let mut bt = Bindtrace::start_here(&["--no-docker"]);
    let _ = TcpStream::connect_timeout(&SocketAddr::new(ip, 8000), Duration::from_secs(2));
    let line = bt.expect_line("refused without Docker", WAIT, |l| {
        l["event"] == "refused" && l["target_ip"] == ip.to_string()
    });
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert!(line["container"].is_null() && line["published"].is_null(), "{line:#}");
    // Who connected is not a Docker matter: still recorded.
    assert_eq!(line["via"], "direct", "{line:#}");
    assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
    assert!(bt.lines().iter().all(|l| l["event"] != "audit"), "{:#?}", bt.lines());
    assert!(!bt.stderr().contains("Docker"), "{}", bt.stderr());
}

/// The port of Docker's embedded DNS in the container's namespace: the TCP listener on
/// 127.0.0.11 the daemon opens on a user-defined network (waited for: it comes with the
/// network's set-up).
fn embedded_dns_port(c: &Container) -> u16 {
    let pid = c.pid();
    for _ in 0..200 {
        let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
        let port = tcp.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, port) = f.get(1)?.split_once(':')?;
            (addr == "0B00007F" && f.get(3) == Some(&"0A")).then(|| u16::from_str_radix(port, 16).ok())?
        });
        if let Some(port) = port {
            return port;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} has no embedded DNS listener on 127.0.0.11", c.name);
}

/// No line of `lines` offers Docker's embedded DNS as what listens.
fn assert_no_embedded_dns(line: &Value, dns_port: u16) {
    let listeners = line["listeners"].as_array().unwrap();
    assert!(listeners.iter().all(|l| l["ip"] != "127.0.0.11"), "{line:#}");
    let hint = line["hint"].as_str().unwrap();
    assert!(!hint.contains("127.0.0.11") && !hint.contains(&format!(":{dns_port}")), "{hint}");
    assert!(hint.starts_with("nothing listens on any TCP port in this namespace"), "{hint}");
}

/// 8. A user-defined network (Compose's default), nothing listening on the published port:
///    the namespace holds only Docker's embedded DNS (127.0.0.11, a random port, the daemon's
///    socket), which neither the audit nor the refusal offers as "the port the service uses".
#[test]
fn embedded_dns_is_never_what_listens() {
    if skip() {
        return;
    }
    let img = Image::busybox();
    // Created after start, so bindtrace's line that it follows the bridge can be awaited.
    let bt = Bindtrace::start_here(&["--audit-grace", "1s"]);
    let net = Network::create();
    assert!(
        bt.wait_stderr(&format!("following Docker network bridge {}", net.bridge()), WAIT),
        "{}",
        bt.stderr()
    );
    let port = free_port();
    let c =
        run(&img, &["--network", &net.name, "-p", &format!("{port}:8000")], &["sleep".into(), "60".into()]);
    let dns_port = embedded_dns_port(&c);
    let audit = bt.expect_line("audit of the idle container", WAIT, |l| {
        l["event"] == "audit" && l["container"]["name"] == c.name.as_str()
    });
    assert_eq!(audit["verdict"], "no_listener", "{audit:#}");
    assert_no_embedded_dns(&audit, dns_port);
    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert!(code == 52 || code == 56, "curl exit {code}");
    let line = refused_for(&bt, &c);
    assert_eq!(line["verdict"], "no_listener", "{line:#}");
    assert_no_embedded_dns(&line, dns_port);
}

/// 9. A network with IPv6: `-p` publishes on 0.0.0.0 and `::`, and docker-proxy forwards IPv6
///    clients to the container's IPv6 address. A service on 0.0.0.0 only serves IPv4 clients
///    and refuses IPv6 ones: the audit reports the IPv6 side and `check` does not exit 0. The
///    same service on `[::]` (dual-stack) is reachable over both.
#[test]
fn ipv6_published_ports_are_audited() {
    if skip() {
        return;
    }
    let img = Image::busybox();
    // Created after start, so bindtrace's line that it follows the bridge can be awaited.
    let bt = Bindtrace::start_here(&["--audit-grace", "2s"]);
    let net = Network::create_ipv6();
    assert!(
        bt.wait_stderr(&format!("following Docker network bridge {}", net.bridge()), WAIT),
        "{}",
        bt.stderr()
    );
    let (port, good_port) = (free_port(), free_port());
    let v4only = run(&img, &["--network", &net.name, "-p", &format!("{port}:8000")], &httpd("0.0.0.0", 8000));
    let dual = run(&img, &["--network", &net.name, "-p", &format!("{good_port}:8000")], &httpd("[::]", 8000));
    v4only.wait_listening(8000);
    dual.wait_listening(8000);
    let v6 = v4only.ipv6(&net.name);

    let audit = bt.expect_line("audit of the IPv6 side", WAIT, |l| {
        l["event"] == "audit" && l["container"]["name"] == v4only.name.as_str()
    });
    assert_eq!(audit["verdict"], "wrong_family", "{audit:#}");
    assert_eq!(audit["family"], "ipv6", "{audit:#}");
    assert_eq!(audit["target_ip"], v6.to_string(), "{audit:#}");
    assert_eq!(audit["published"]["host_ip"], "::", "{audit:#}");
    assert_eq!(audit["bindings"].as_array().unwrap().len(), 1, "{audit:#}");
    // What the audit says is what clients get: IPv4 served, IPv6 refused.
    let (code, body) = curl(&format!("http://127.0.0.1:{port}/"));
    assert_eq!((code, body.as_str()), (0, "hello from a bindtrace test\n"));
    let (code, _) = curl(&format!("http://[::1]:{port}/"));
    assert!(code == 52 || code == 56, "curl over IPv6: exit {code}");
    let line = refused_for(&bt, &v4only);
    assert_eq!((&line["verdict"], &line["family"]), (&"wrong_family".into(), &"ipv6".into()), "{line:#}");
    assert_eq!(line["target_ip"], v6.to_string(), "{line:#}");
    for family in ["ipv4", "ipv6"] {
        let (code, _) = curl(&format!(
            "http://{}/",
            if family == "ipv4" { format!("127.0.0.1:{good_port}") } else { format!("[::1]:{good_port}") }
        ));
        assert_eq!(code, 0, "dual-stack over {family}");
    }

    let (code, out, err) = check(&["--format", "json", &v4only.name, &dual.name]);
    assert_eq!(code, Some(2), "{out}{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    let rows: Vec<(String, String, String)> = doc["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
            (p["container"]["name"].as_str().unwrap().to_owned(), s("family"), s("verdict"))
        })
        .collect();
    let want =
        |name: &str, family: &str, verdict: &str| (name.to_owned(), family.to_owned(), verdict.to_owned());
    for row in [
        want(&v4only.name, "ipv4", "ok"),
        want(&v4only.name, "ipv6", "wrong_family"),
        want(&dual.name, "ipv4", "ok"),
        want(&dual.name, "ipv6", "ok"),
    ] {
        assert!(rows.contains(&row), "{row:?} not in {rows:?}");
    }
    assert_eq!(rows.len(), 4, "{doc:#}");
    let (code, out, err) = check(&[&dual.name]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("1 published port (2 address checks) in 1 container: 2 reachable, 0 not"), "{out}");
}

/// Longevity test 5: while Docker is unreachable, a container is removed and the kernel hands
/// its namespace's inode to a new namespace (made in a bounded loop until the inode recurs:
/// the old one is freed a moment after the container goes). The new namespace, attached to
/// the same network's bridge and refused there, is not named after the dead container.
#[test]
fn a_dead_containers_inode_names_no_new_namespace_while_docker_is_away() {
    if skip() {
        return;
    }
    let img = Image::busybox();
    let net = Network::create();
    let mut relay = Relay::start(DOCKER_SOCK);
    let bt = Bindtrace::start_here(&["--docker-host", relay.path().to_str().unwrap(), "-v"]);
    let dead = Container::run(&img, &["--network", &net.name], &["sleep", "3600"]);
    let inode = std::fs::metadata(format!("/proc/{}/ns/net", dead.pid())).unwrap().ino();
    assert!(bt.wait_stderr(&format!("(netns {inode},"), WAIT), "never watched:\n{}", bt.stderr());
    // The inventory knows it: a refusal there is named after it.
    let ip = dead.ip(&net.name);
    let named = connect_until_line(&bt, SocketAddr::new(ip, 8080), |l| {
        l["event"] == "refused" && l["container"]["name"] == dead.name
    });
    assert!(named.is_some(), "the container was never named:\n{}", bt.stderr());

    relay.stop();
    assert!(bt.wait_stderr("unavailable", WAIT), "{}", bt.stderr());
    drop(dead);
    // Namespaces made until one gets the dead one's inode (bindtrace lets go of a departed
    // port's namespace 10 s after it left scope; then the kernel frees it). The others are
    // held meanwhile, so the allocator does not hand out the same lower free number each time.
    let mut held = Vec::new();
    let give_up = std::time::Instant::now() + Duration::from_secs(60);
    let reused = loop {
        let ns = bindtrace_tests::Netns::new("btreuse");
        if ns.inode() == inode {
            break ns;
        }
        held.push(ns);
        assert!(
            std::time::Instant::now() < give_up,
            "inode {inode} did not recur within 60 s ({} namespaces made)",
            held.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(held);
    // On the dead container's network, at an address Docker's allocator reaches last.
    let subnet = docker::docker_ok(&[
        "network",
        "inspect",
        "--format",
        "{{(index .IPAM.Config 0).Subnet}}",
        &net.name,
    ]);
    let (base, len) = subnet.split_once('/').expect("a subnet");
    let (base, len): (std::net::Ipv4Addr, u32) = (base.parse().unwrap(), len.parse().unwrap());
    assert!(len <= 24, "subnet {subnet} too small");
    // The network's own address plus 250: inside the subnet whatever its prefix.
    let addr = std::net::Ipv4Addr::from(u32::from(base) + 250);
    assert_eq!(u32::from(addr) >> (32 - len), u32::from(base) >> (32 - len), "{addr} outside {subnet}");
    let veth = bindtrace_tests::net::unique("vbr");
    bindtrace_tests::net::ip(&[
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &reused.name,
    ]);
    bindtrace_tests::net::ip(&["link", "set", &veth, "master", &net.bridge(), "up"]);
    reused.ip(&["addr", "add", &format!("{addr}/{len}"), "dev", "eth0"]);
    reused.ip(&["link", "set", "eth0", "up"]);
    assert!(
        bt.wait_stderr(&format!("watching {veth} (netns {inode},"), WAIT),
        "never watched:\n{}",
        bt.stderr()
    );
    let _server = bindtrace_tests::Listener::start(&reused.name, "127.0.0.1", 8081, &[]);
    let err = TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(addr), 8081), Duration::from_secs(2))
        .expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let line = bt.expect_line("the refusal in the reused namespace", WAIT, |l| {
        l["event"] == "refused" && l["netns"] == inode && l["target_port"] == 8081
    });
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert!(line["container"].is_null(), "named after the dead container:\n{line:#}");
    bindtrace_tests::net::ip(&["link", "del", &veth]);
}

/// The busybox image with `bindtrace-udp` (serve or send one datagram) at /bin/bindtrace-udp.
fn udp_image() -> Image {
    Image::busybox_with_program(
        std::path::Path::new(env!("CARGO_BIN_EXE_bindtrace-udp")),
        "/bin/bindtrace-udp",
    )
}

/// A UDP port free on the host right now (for `-p PORT:.../udp`).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port()
}

fn udp_tool(mode: &str, addr: &str) -> Vec<String> {
    ["/bin/bindtrace-udp", mode, addr].map(String::from).to_vec()
}

/// 10. UDP: servers bound to 127.0.0.1 behind `-p H:C/udp`. The audit reports them before any
///     datagram and `check` exits 1 naming the port as `C/udp`. A datagram from a namespace of
///     our own to a host address on H is DNATed: conntrack's entry, which outlives a UDP refusal,
///     gives `via` dnat, the original client and the published port. A datagram from the host to
///     127.0.0.1:H goes through docker-proxy: its line names the container, the server, `via`
///     docker-proxy (the proxy process, from the kernel's record of its UDP connect: Docker 20.10's
///     proxy closes that socket on the first ECONNREFUSED, before anyone can look) and the
///     published address the proxy serves.
#[test]
fn udp_loopback_server_behind_a_published_port() {
    if skip() {
        return;
    }
    let img = udp_image();
    let (nat_port, proxy_port) = (free_udp_port(), free_udp_port());
    let nat = run(&img, &["-p", &format!("{nat_port}:5353/udp")], &udp_tool("serve", "127.0.0.1:5353"));
    let proxied = run(&img, &["-p", &format!("{proxy_port}:5353/udp")], &udp_tool("serve", "127.0.0.1:5353"));
    nat.wait_udp_bound(5353);
    proxied.wait_udp_bound(5353);
    let link = HostLink::new();
    // The recorders' line is at debug level.
    let mut cmd = std::process::Command::new(bindtrace_tests::bindtrace::binary());
    cmd.args(["--format", "json", "--no-metrics"])
        .env("RUST_LOG", "info,bindtrace::app::scope_sync=debug,bindtrace::attribution::connect=debug");
    let mut bt = Bindtrace::spawn_cmd(cmd);
    assert!(bt.wait_ready(WAIT), "{}", bt.stderr());
    // The recorders of UDP connectors: the start-up line names those attached, the fexit pair
    // is attached both or neither, and one of them runs (the docker-proxy line below needs it).
    assert!(bt.wait_stderr("UDP connectors: recorded by", WAIT), "{}", bt.stderr());
    let ids = programs_held_by(bt.pid());
    let names: Vec<String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .filter_map(|p| p.name_as_str().map(str::to_owned))
        .collect();
    let fexit = names.iter().filter(|n| n.starts_with("fx_udp")).count();
    let reads = names.iter().any(|n| n.starts_with("bt_sock_recv"));
    let started = bt.stderr();
    let said = started.lines().find(|l| l.contains("UDP connectors: recorded by")).unwrap();
    assert!(fexit == 0 || fexit == 2, "{names:?}");
    assert!(fexit == 0 || !reads, "the per-recvmsg tracepoint only where fexit is refused: {names:?}");
    assert!(fexit == 2 || reads, "one recorder runs: {names:?}");
    assert_eq!(said.contains("recorded by fexit/"), fexit == 2, "{said} {names:?}");
    assert_eq!(
        said.contains("recorded by tp_btf/sock_recv_length") || said.contains("and by tp_btf"),
        reads,
        "{said} {names:?}"
    );
    for (c, port) in [(&nat, nat_port), (&proxied, proxy_port)] {
        let audit = bt.expect_line("audit of a UDP loopback server", WAIT, |l| {
            l["event"] == "audit" && l["container"]["name"] == c.name.as_str()
        });
        assert_eq!(audit["verdict"], "loopback_only", "{audit:#}");
        assert_eq!(audit["proto"], "udp", "{audit:#}");
        assert_eq!(audit["target_port"], 5353, "{audit:#}");
        assert_eq!(audit["published"]["host_port"], port, "{audit:#}");
        let hint = audit["hint"].as_str().unwrap();
        assert!(hint.contains(&format!("-p 127.0.0.1:{port}:5353/udp")), "{audit:#}");
    }
    let (code, out, err) = check(&[&nat.name]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("5353/udp") && out.contains("loopback_only"), "{out}");

    let udp_refused = |c: &Container| {
        bt.expect_line("refused UDP datagram", WAIT, |l| {
            l["event"] == "refused" && l["container"]["name"] == c.name.as_str() && l["proto"] == "udp"
        })
    };
    link.ns
        .run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.send_to(b"bindtrace udp test", SocketAddr::new(link.host_ip, nat_port)).map(drop)
        })
        .unwrap();
    let line = udp_refused(&nat);
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["via"], "dnat", "{line:#}");
    assert_eq!(line["original"]["client_ip"], link.ns_ip.to_string(), "{line:#}");
    assert_eq!(line["original"]["target_ip"], link.host_ip.to_string(), "{line:#}");
    assert_eq!(line["original"]["target_port"], nat_port, "{line:#}");
    assert_eq!(line["published"]["host_port"], nat_port, "{line:#}");
    assert_eq!(line["target_ip"], nat.ip("bridge").to_string(), "{line:#}");
    assert_eq!(line["target_port"], 5353, "{line:#}");
    assert_eq!(line["listeners"][0]["ip"], "127.0.0.1", "{line:#}");
    assert_eq!(line["listeners"][0]["pids"][0]["pid"], nat.pid(), "{line:#}");
    assert!(
        line["hint"].as_str().unwrap().contains(&format!("-p 127.0.0.1:{nat_port}:5353/udp")),
        "{line:#}"
    );

    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"bindtrace udp test", ("127.0.0.1", proxy_port)).unwrap();
    let line = udp_refused(&proxied);
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["listeners"][0]["pids"][0]["pid"], proxied.pid(), "{line:#}");
    assert_eq!(line["target_ip"], proxied.ip("bridge").to_string(), "{line:#}");
    assert_eq!(line["target_port"], 5353, "{line:#}");
    // The proxy's socket may be closed by now (Docker 20.10 closes it at the first refusal):
    // the kernel's record of its connect() names it all the same.
    assert_eq!(line["via"], "docker-proxy", "{line:#}");
    assert!(line["original"].is_null(), "{line:#}");
    assert_eq!(line["client_process"]["comm"], "docker-proxy", "{line:#}");
    let proxy_pid = line["client_process"]["pid"].as_u64().expect("the proxy's pid");
    let argv = std::fs::read(format!("/proc/{proxy_pid}/cmdline")).expect("the proxy still runs");
    let argv: Vec<String> =
        argv.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let flag = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned();
    assert_eq!(flag("-proto").as_deref(), Some("udp"), "{argv:?}");
    assert_eq!(flag("-host-port"), Some(proxy_port.to_string()), "{argv:?}");
    assert_eq!(line["published"]["host_port"], proxy_port, "{line:#}");
    assert_eq!(line["published"]["host_ip"].as_str(), flag("-host-ip").as_deref(), "{line:#}");
    assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
}

/// 11. UDP between containers: a datagram to a closed port of one container from another is
///     `via direct`, naming the sending container (found by its address on the network).
#[test]
fn udp_datagram_from_another_container_is_direct() {
    if skip() {
        return;
    }
    let img = udp_image();
    let target = run(&img, &[], &["sleep".into(), "120".into()]);
    // Both run before bindtrace starts, so its first inventory knows the sender's address.
    let sender = run(&img, &[], &["sleep".into(), "120".into()]);
    let mut bt = Bindtrace::start_here(&[]);
    let addr = format!("{}:5354", target.ip("bridge"));
    docker::docker_ok(&["exec", &sender.name, "/bin/bindtrace-udp", "send", &addr]);
    let line = bt.expect_line("refused UDP datagram from a container", WAIT, |l| {
        l["event"] == "refused" && l["container"]["name"] == target.name.as_str() && l["proto"] == "udp"
    });
    assert_eq!(line["target_port"], 5354, "{line:#}");
    assert_eq!(line["verdict"], "no_listener", "{line:#}");
    assert_eq!(line["via"], "direct", "{line:#}");
    assert_eq!(line["client_container"]["name"], sender.name.as_str(), "{line:#}");
    assert_eq!(line["client_ip"], sender.ip("bridge").to_string(), "{line:#}");
    assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
}
