//! Against rootful podman (netavark, bridge podman0) through its Docker-compatible API, served
//! by a `podman system service` of each test's own. Run as root through `sudo ./x test`.
//!
//! Images are imported from a busybox rootfs (no registry); every image, container and the
//! service are removed by their guards, also on panic. Host ports are picked free at run time,
//! names are unique, and traffic only goes to loopback.
use std::{process::Command, time::Duration};

use bindtrace_tests::{
    Bindtrace,
    bindtrace::binary,
    docker::{self, curl, free_port},
    podman::{self, CniPodman, Container, Image, RunDir, Service},
    root_or_skip,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// True when this test cannot run here (see `bindtrace_tests::skip`: under `CI` it fails).
fn skip() -> bool {
    if !root_or_skip() {
        return true;
    }
    if !podman::available() {
        bindtrace_tests::skip("podman is not installed (`./x setup` installs it)");
        return true;
    }
    false
}

fn line_for(bt: &Bindtrace, event: &str, c: &Container) -> Value {
    bt.expect_line(&format!("{event} for {}", c.name), WAIT, |l| {
        l["event"] == event && l["container"]["name"] == c.name.as_str()
    })
}

/// 1. The loopback-bound server of issue 15 published with `-p H:C` on podman0: audited by
///    name before any connection, then the refused connection to the published port (netavark
///    DNATs 127.0.0.1 to the container) is reported by name, published port, via and verdict;
///    `bindtrace check` finds it too.
#[test]
fn loopback_server_behind_netavark_dnat() {
    if skip() {
        return;
    }
    let service = Service::start();
    let img = Image::busybox();
    let port = free_port();
    let bad = Container::run(
        &img,
        &["-p", &format!("{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    bad.wait_listening(8000);
    let mut bt = Bindtrace::start_here(&["--docker-host", service.path(), "--audit-grace", "1s"]);
    let inventory = bt.stderr().lines().find(|l| l.contains("podman: ")).map(str::to_owned);
    assert!(inventory.is_some_and(|l| l.contains("bridges podman0")), "{}", bt.stderr());

    let audit = line_for(&bt, "audit", &bad);
    assert_eq!(audit["verdict"], "loopback_only", "{audit:#}");
    assert_eq!(audit["container"]["runtime"], "podman", "{audit:#}");
    assert_eq!(audit["container"]["id"], bad.short_id(), "{audit:#}");
    assert_eq!(audit["container"]["image"], img.tag.as_str(), "{audit:#}");
    assert_eq!(audit["target_port"], 8000, "{audit:#}");
    assert_eq!(audit["target_ip"], bad.ip().to_string(), "{audit:#}");
    assert_eq!(audit["published"]["host_port"], port, "{audit:#}");
    assert_eq!(audit["listeners"][0]["ip"], "127.0.0.1", "{audit:#}");
    assert!(
        bt.lines().iter().all(|l| l["event"] != "refused"),
        "the audit comes before any connection: {:#?}",
        bt.lines()
    );

    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert_eq!(code, 7, "netavark's DNAT delivers the SYN and the container resets it");
    let line = line_for(&bt, "refused", &bad);
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["via"], "dnat", "{line:#}");
    assert_eq!(line["bridge"], "podman0", "{line:#}");
    assert_eq!(line["container"]["runtime"], "podman", "{line:#}");
    assert_eq!(line["container"]["id"], bad.short_id(), "{line:#}");
    assert_eq!(line["published"]["host_port"], port, "{line:#}");
    assert_eq!(line["target_ip"], bad.ip().to_string(), "{line:#}");
    assert_eq!(line["target_port"], 8000, "{line:#}");
    let holder = &line["listeners"][0]["pids"][0];
    assert_eq!(holder["pid"], bad.pid(), "{line:#}");
    assert_eq!(holder["comm"], "httpd", "{line:#}");
    assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());

    // `bindtrace check` through the same API: exit 1, the port loopback-only.
    let out = Command::new(binary())
        .args(["check", "--format", "json", "--docker-host", service.path(), &bad.name])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["ports"][0]["verdict"], "loopback_only", "{doc:#}");
    assert_eq!(doc["ports"][0]["container"]["runtime"], "podman", "{doc:#}");
    assert_eq!(doc["ports"][0]["published"]["host_port"], port, "{doc:#}");
}

/// 2. bindtrace first, then the container: podman0 does not exist until netavark makes it for
///    the first container, and the libpod network list names it before that. The container's
///    start is audited and its refusal reported, both by name.
#[test]
fn a_container_started_later_on_a_bridge_made_later() {
    if skip() {
        return;
    }
    let service = Service::start();
    let img = Image::busybox();
    let bt = Bindtrace::start_here(&["--docker-host", service.path(), "--audit-grace", "1s"]);
    let port = free_port();
    let bad = Container::run(
        &img,
        &["-p", &format!("{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    let audit = line_for(&bt, "audit", &bad);
    assert_eq!(audit["verdict"], "loopback_only", "{audit:#}");
    assert_eq!(audit["container"]["runtime"], "podman", "{audit:#}");
    assert_eq!(audit["published"]["host_port"], port, "{audit:#}");

    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert_eq!(code, 7, "netavark's DNAT delivers the SYN and the container resets it");
    let line = line_for(&bt, "refused", &bad);
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["via"], "dnat", "{line:#}");
    assert_eq!(line["bridge"], "podman0", "{line:#}");
    assert_eq!(line["published"]["host_port"], port, "{line:#}");
}

/// 3. Docker and podman at once (`--docker-host` twice): a loopback-bound container of each is
///    audited by name with its runtime; Docker goes away (a relay in front of its socket is
///    stopped: the daemon is never touched) and podman keeps being followed; Docker comes back
///    and is followed again.
#[test]
fn docker_and_podman_at_once_one_going_away() {
    if skip() {
        return;
    }
    if !bindtrace_tests::docker::available() {
        bindtrace_tests::skip("no Docker daemon answers here");
        return;
    }
    let service = Service::start();
    let pimg = Image::busybox();
    let dimg = docker::Image::busybox();
    let mut relay = docker::Relay::start(docker::DOCKER_SOCK);
    let relay_path = relay.path().to_str().unwrap().to_owned();
    let bt = Bindtrace::start_here(&[
        "--docker-host",
        &relay_path,
        "--docker-host",
        service.path(),
        "--audit-grace",
        "1s",
    ]);
    let httpd = ["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"];
    let pod = Container::run(&pimg, &["-p", &format!("{}:8000", free_port())], &httpd);
    let dock = docker::Container::run(&dimg, &["-p", &format!("{}:8000", free_port())], &httpd);
    let audit = line_for(&bt, "audit", &pod);
    assert_eq!(
        (&audit["container"]["runtime"], &audit["verdict"]),
        (&"podman".into(), &"loopback_only".into())
    );
    let audit = bt.expect_line("audit of the Docker container", WAIT, |l| {
        l["event"] == "audit" && l["container"]["name"] == dock.name.as_str()
    });
    assert_eq!(
        (&audit["container"]["runtime"], &audit["verdict"]),
        (&"docker".into(), &"loopback_only".into())
    );

    relay.stop();
    assert!(bt.wait_stderr("unavailable", WAIT), "{}", bt.stderr());
    let pod2 = Container::run(&pimg, &["-p", &format!("{}:8000", free_port())], &httpd);
    let audit = line_for(&bt, "audit", &pod2);
    assert_eq!(audit["container"]["runtime"], "podman", "podman is followed while Docker is away: {audit:#}");

    relay.resume();
    assert!(bt.wait_stderr("is back", WAIT), "{}", bt.stderr());
    let dock2 = docker::Container::run(&dimg, &["-p", &format!("{}:8000", free_port())], &httpd);
    let audit = bt.expect_line("audit of the second Docker container", WAIT, |l| {
        l["event"] == "audit" && l["container"]["name"] == dock2.name.as_str()
    });
    assert_eq!(audit["container"]["runtime"], "docker", "{audit:#}");
}

/// `bindtrace check ARGS` against both engines; its exit code, stdout and stderr.
fn check_both(service: &Service, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary())
        .args([
            "check",
            "--format",
            "json",
            "--docker-host",
            docker::DOCKER_SOCK,
            "--docker-host",
            service.path(),
        ])
        .args(args)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// 4. One name in Docker and in podman: `bindtrace check NAME` consults both and is ambiguous
///    (exit 3, both listed by qualified name); `docker:NAME` and `podman:NAME` pick one each
///    (exit 1, loopback-only); a name nobody runs exits 4. The metrics tell the two apart by
///    their `runtime` label: one series each, each counting its own refusal, in a scrape and
///    in a real Prometheus.
#[test]
fn one_name_in_docker_and_podman() {
    if skip() {
        return;
    }
    if !bindtrace_tests::docker::available() {
        bindtrace_tests::skip("no Docker daemon answers here");
        return;
    }
    let service = Service::start();
    let (pimg, dimg) = (Image::busybox(), docker::Image::busybox());
    let name = docker::unique_name("twin");
    let (dport, pport) = (free_port(), free_port());
    let httpd = ["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"];
    let publish = |port: u16| format!("{port}:8000");
    let mut dargs = vec!["run", "-d", "--name", &name];
    let dpub = publish(dport);
    dargs.extend(["-p", &dpub, &dimg.tag]);
    dargs.extend(httpd);
    let dock = docker::Container { id: docker::docker_ok(&dargs), name: name.clone() };
    let ppub = publish(pport);
    let mut pargs =
        vec!["run", "-d", "--name", &name, "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"];
    pargs.extend(["-p", &ppub, &pimg.tag]);
    pargs.extend(httpd);
    let pod = Container { id: podman::podman_ok(&pargs), name: name.clone() };
    dock.wait_listening(8000);
    pod.wait_listening(8000);

    let (code, stdout, stderr) = check_both(&service, &[&name]);
    assert_eq!(code, Some(3), "ambiguous: {stdout}{stderr}");
    assert!(
        stderr.contains(&format!("docker:{name}")) && stderr.contains(&format!("podman:{name}")),
        "{stderr}"
    );
    for runtime in ["docker", "podman"] {
        let (code, stdout, stderr) = check_both(&service, &[&format!("{runtime}:{name}")]);
        assert_eq!(code, Some(1), "{runtime}: {stdout}{stderr}");
        let doc: Value = serde_json::from_str(&stdout).unwrap();
        let ports = doc["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 1, "{doc:#}");
        assert_eq!(ports[0]["container"]["runtime"], runtime, "{doc:#}");
        assert_eq!(ports[0]["verdict"], "loopback_only", "{doc:#}");
    }
    let (code, stdout, stderr) = check_both(&service, &[&docker::unique_name("nobody")]);
    assert_eq!(code, Some(4), "not found: {stdout}{stderr}");

    // The metrics: bindtrace on a free loopback port of its own, a real Prometheus scraping it.
    let maddr = format!("127.0.0.1:{}", free_port());
    let prom = bindtrace_tests::metrics::Prometheus::start_here(&maddr);
    let mut cmd = Command::new(binary());
    cmd.args(["--format", "json", "--metrics-addr", &maddr, "--audit-grace", "1s"]).args([
        "--docker-host",
        docker::DOCKER_SOCK,
        "--docker-host",
        service.path(),
    ]);
    let mut bt = Bindtrace::spawn_cmd(cmd);
    assert!(bt.wait_ready(WAIT), "{}", bt.stderr());
    let (code, _) = curl(&format!("http://127.0.0.1:{dport}/"));
    assert!(code == 52 || code == 56, "docker-proxy gets the reset: curl exit {code}");
    let (code, _) = curl(&format!("http://127.0.0.1:{pport}/"));
    assert_eq!(code, 7, "netavark's DNAT delivers the SYN and the container resets it");
    for runtime in ["docker", "podman"] {
        bt.expect_line(&format!("the {runtime} container's refusal"), WAIT, |l| {
            l["event"] == "refused"
                && l["container"]["name"] == name.as_str()
                && l["container"]["runtime"] == runtime
        });
    }
    let addr = maddr.parse().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let refused = "bindtrace_refused_connections_total";
    let scrape = loop {
        let reply = bindtrace_tests::metrics::http_get(addr, "/metrics", None).expect("scrape");
        let scrape = bindtrace_tests::metrics::Scrape::parse(&reply.body);
        let both = ["docker", "podman"]
            .iter()
            .all(|r| !scrape.series(refused, &[("container", &name), ("runtime", r)]).is_empty());
        if both || std::time::Instant::now() > deadline {
            break scrape;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for runtime in ["docker", "podman"] {
        let series = scrape.series(refused, &[("container", &name), ("runtime", runtime)]);
        assert_eq!(series.len(), 1, "{runtime}: {}", scrape.text);
        assert_eq!(series[0].value, 1.0, "{runtime}: one curl, one refusal: {}", scrape.text);
        assert_eq!(series[0].labels["verdict"], "loopback_only", "{}", scrape.text);
        let gauge =
            scrape.series("bindtrace_loopback_listeners", &[("container", &name), ("runtime", runtime)]);
        assert_eq!(gauge.len(), 1, "{runtime}: {}", scrape.text);
    }
    // Prometheus sees the same: one series per runtime, 1 each, 2 by container.
    let deadline = std::time::Instant::now() + WAIT;
    let by =
        |runtime: &str| format!("{refused}{{job=\"bindtrace\",container=\"{name}\",runtime=\"{runtime}\"}}");
    while prom.value(&by("podman")).is_none() || prom.value(&by("docker")).is_none() {
        assert!(std::time::Instant::now() < deadline, "Prometheus never scraped both:\n{}", prom.stderr());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!((prom.value(&by("docker")), prom.value(&by("podman"))), (Some(1.0), Some(1.0)));
    assert_eq!(prom.value(&format!("sum by (container) ({refused}{{container=\"{name}\"}})")), Some(2.0));
    drop(prom);
    assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
}

/// 5. podman's sockets made after start are followed without a restart: bindtrace starts with
///    no podman socket in its run directory (`--run-dir`, a private one); then rootful podman's
///    `podman/podman.sock` appears (a service started on it), and its container is audited and
///    its refusal reported by name; that service stops, a user logs in (`user/UID` made and a
///    tmpfs mounted on it, as logind does), a service starts on `user/UID/podman/podman.sock`,
///    and its container is reported by name too (only that service can have said so).
#[test]
fn podman_sockets_made_after_start_are_followed() {
    if skip() {
        return;
    }
    let mut run = RunDir::new();
    let img = Image::busybox();
    let no_docker = run.path.join("docker.sock");
    let bt = Bindtrace::start_here(&[
        "--run-dir",
        run.path(),
        "--docker-host",
        no_docker.to_str().unwrap(),
        "--audit-grace",
        "1s",
    ]);
    let httpd = ["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"];

    std::fs::create_dir_all(run.path.join("podman")).unwrap();
    let rootful = Service::start_at(run.path.join("podman/podman.sock"));
    assert!(bt.wait_stderr("podman.sock appeared", WAIT), "{}", bt.stderr());
    let port = free_port();
    let first = Container::run(&img, &["-p", &format!("{port}:8000")], &httpd);
    let audit = line_for(&bt, "audit", &first);
    assert_eq!(
        (&audit["verdict"], &audit["container"]["runtime"]),
        (&"loopback_only".into(), &"podman".into())
    );
    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert_eq!(code, 7, "netavark's DNAT delivers the SYN and the container resets it");
    let line = line_for(&bt, "refused", &first);
    assert_eq!(line["published"]["host_port"], port, "{line:#}");
    let gone = format!("{} unavailable", rootful.path());
    drop(rootful);
    assert!(bt.wait_stderr(&gone, WAIT), "{}", bt.stderr());

    let home = run.login(4242);
    std::fs::create_dir_all(home.join("podman")).unwrap();
    let _user = Service::start_at(home.join("podman/podman.sock"));
    assert!(bt.wait_stderr("4242/podman/podman.sock appeared", WAIT), "{}", bt.stderr());
    let port = free_port();
    let second = Container::run(&img, &["-p", &format!("{port}:8000")], &httpd);
    let audit = line_for(&bt, "audit", &second);
    assert_eq!(audit["verdict"], "loopback_only", "{audit:#}");
    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert_eq!(code, 7);
    let line = line_for(&bt, "refused", &second);
    assert_eq!(line["container"]["runtime"], "podman", "{line:#}");
    assert_eq!(line["published"]["host_port"], port, "{line:#}");
}

/// 6. Issue 15's test 5: Docker and podman at once, podman stopped mid-run (its service
///    killed): Docker's container keeps being reported by name; podman comes back (the service
///    started again on its socket) and is followed again: a container started after its return
///    is audited and its refusal reported by name.
#[test]
fn podman_stopped_mid_run_docker_keeps_reporting() {
    if skip() {
        return;
    }
    if !bindtrace_tests::docker::available() {
        bindtrace_tests::skip("no Docker daemon answers here");
        return;
    }
    let service = Service::start();
    let socket = service.socket.clone();
    let (pimg, dimg) = (Image::busybox(), docker::Image::busybox());
    let bt = Bindtrace::start_here(&[
        "--docker-host",
        docker::DOCKER_SOCK,
        "--docker-host",
        service.path(),
        "--audit-grace",
        "1s",
    ]);
    let httpd = ["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"];
    let (dport, pport) = (free_port(), free_port());
    let dock = docker::Container::run(&dimg, &["-p", &format!("{dport}:8000")], &httpd);
    let pod = Container::run(&pimg, &["-p", &format!("{pport}:8000")], &httpd);
    line_for(&bt, "audit", &pod);
    bt.expect_line("audit of the Docker container", WAIT, |l| {
        l["event"] == "audit" && l["container"]["name"] == dock.name.as_str()
    });

    let gone = format!("{} unavailable", service.path());
    drop(service);
    assert!(bt.wait_stderr(&gone, WAIT), "{}", bt.stderr());
    let (code, _) = curl(&format!("http://127.0.0.1:{dport}/"));
    assert!(code == 52 || code == 56, "docker-proxy gets the reset: curl exit {code}");
    let line = bt.expect_line("the Docker container's refusal while podman is away", WAIT, |l| {
        l["event"] == "refused" && l["container"]["name"] == dock.name.as_str()
    });
    assert_eq!(
        (&line["container"]["runtime"], &line["verdict"]),
        (&"docker".into(), &"loopback_only".into())
    );

    let _service = Service::start_at(socket.clone());
    let back = format!("{} is back", socket.display());
    assert!(bt.wait_stderr(&back, WAIT), "{}", bt.stderr());
    let pport2 = free_port();
    let pod2 = Container::run(&pimg, &["-p", &format!("{pport2}:8000")], &httpd);
    let audit = line_for(&bt, "audit", &pod2);
    assert_eq!(audit["container"]["runtime"], "podman", "{audit:#}");
    let (code, _) = curl(&format!("http://127.0.0.1:{pport2}/"));
    assert_eq!(code, 7, "netavark's DNAT delivers the SYN and the container resets it");
    let line = line_for(&bt, "refused", &pod2);
    assert_eq!(
        (&line["container"]["runtime"], &line["verdict"]),
        (&"podman".into(), &"loopback_only".into())
    );
    assert_eq!(line["published"]["host_port"], pport2, "{line:#}");
}

/// 7. Test 1's second half: rootful podman with the CNI backend (a private containers.conf,
///    Debian's plugins in /usr/lib/cni, private storage and run roots, a network of the test's
///    own on its own subnet): the loopback-bound server published with `-p H:8000` is audited
///    by name before any connection, and the refused connection to the published port (CNI's
///    portmap DNAT, `via` dnat) is reported by name with its published port, bridge and verdict.
#[test]
fn loopback_server_behind_cni_portmap() {
    if skip() {
        return;
    }
    let cni = CniPodman::new();
    let net = docker::unique_name("cni");
    // A subnet of its own: the default network's 10.88.0.0/16 is netavark's podman0's too.
    cni.ok(&["network", "create", "--disable-dns", "--subnet", "10.123.231.0/24", &net]);
    let bridge = cni.ok(&["network", "inspect", "--format", "{{.NetworkInterface}}", &net]);
    assert!(!bridge.is_empty(), "the CNI network names its bridge");
    let service = Service::start_with(cni.command(), cni.dir.join("podman.sock"));
    let img = Image::busybox_with(|| cni.command());
    let port = free_port();
    let name = docker::unique_name("pcni");
    let publish = format!("{port}:8000");
    let id = cni.ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &net,
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "-p",
        &publish,
        &img.tag,
        "httpd",
        "-f",
        "-p",
        "127.0.0.1:8000",
        "-h",
        "/www",
    ]);
    let bad = Container { name, id };
    let ip = cni.ok(&[
        "inspect",
        "--format",
        &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
        &bad.name,
    ]);
    let bt = Bindtrace::start_here(&["--docker-host", service.path()]);
    assert!(bt.stderr().contains(&bridge), "the CNI bridge is followed: {}", bt.stderr());

    let audit = line_for(&bt, "audit", &bad);
    assert_eq!(audit["verdict"], "loopback_only", "{audit:#}");
    assert_eq!(audit["container"]["runtime"], "podman", "{audit:#}");
    assert_eq!(audit["container"]["id"], bad.short_id(), "{audit:#}");
    assert_eq!(audit["published"]["host_port"], port, "{audit:#}");
    assert_eq!(audit["target_ip"], ip.as_str(), "{audit:#}");
    assert!(bt.lines().iter().all(|l| l["event"] != "refused"), "the audit comes before any connection");

    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert_eq!(code, 7, "CNI's portmap DNAT delivers the SYN and the container resets it");
    let line = line_for(&bt, "refused", &bad);
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["bridge"], bridge.as_str(), "{line:#}");
    assert_eq!(line["container"]["runtime"], "podman", "{line:#}");
    assert_eq!(line["published"]["host_port"], port, "{line:#}");
    assert_eq!(line["target_ip"], ip.as_str(), "{line:#}");
    assert_eq!(line["target_port"], 8000, "{line:#}");
    assert_eq!(line["via"], "dnat", "{line:#}");
    drop(bt);
    drop(bad);
    drop(img);
    drop(service);
}
