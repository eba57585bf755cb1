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
    let mut caught = None;
    for _ in 0..30 {
        let _ = TcpStream::connect_timeout(&SocketAddr::new(ip, 8000), Duration::from_secs(2));
        caught = bt.lines().into_iter().find(|l| l["event"] == "refused" && l["target_ip"] == ip.to_string());
        if caught.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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
