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
    podman::{self, Container, Image, Service},
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
