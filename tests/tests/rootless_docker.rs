//! Against rootless Docker (Debian's `dockerd-rootless.sh` and RootlessKit, slirp4netns, the
//! builtin port driver) of a test user of its own, its API on /run/user/UID/docker.sock. Run as
//! root through `sudo ./x test`.
//!
//! The user, its subordinate ids, the `/dev/net/tun` ACL, the daemon, its image, containers and
//! processes are removed by their guards, also on panic (`bindtrace_tests::rootless`,
//! `bindtrace_tests::rootless_docker`). The machine's own Docker daemon is not used. Host ports
//! are picked free at run time, names are unique, and traffic only goes to loopback.
use std::{os::unix::fs::MetadataExt, process::Command, time::Duration};

use bindtrace_tests::{
    Bindtrace,
    bindtrace::binary,
    docker::{curl, free_port},
    root_or_skip,
    rootless::User,
    rootless_docker::{self, BIP, Daemon},
};

/// True when this test cannot run here (see `bindtrace_tests::skip`: under `CI` it fails).
fn skip() -> bool {
    if !root_or_skip() {
        return true;
    }
    if let Some(missing) = rootless_docker::available() {
        bindtrace_tests::skip(&format!("{missing} is not installed (`./x setup` installs it)"));
        return true;
    }
    false
}

const WAIT: Duration = Duration::from_secs(20);

/// `ip -br addr` inside the network namespace of `pid`.
fn addresses_in(pid: u32) -> String {
    let out =
        Command::new("nsenter").args(["-t", &pid.to_string(), "-n", "ip", "-br", "addr"]).output().unwrap();
    assert!(out.status.success(), "nsenter: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The set-up itself: the test user's rootless daemon runs a container published with
/// `-p H:8000`; its docker0 (with our `--bip`) is in RootlessKit's namespace, not the host's;
/// the container's namespace is another one again; and the loopback-bound server behind the
/// published port is the classic case: RootlessKit accepts on the host, docker-proxy inside
/// its namespace cannot reach the app, the client gets an empty reply.
#[test]
fn a_rootless_daemon_runs_the_classic_case() {
    if skip() {
        return;
    }
    let user = User::create();
    let daemon = Daemon::start(&user);
    assert!(daemon.docker_ok(&["info", "--format", "{{.SecurityOptions}}"]).contains("rootless"));
    let image = daemon.busybox_image();
    let port = free_port();
    let bad = daemon.run(
        &image,
        &["-p", &format!("{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    bad.wait_listening(8000);

    let inner = addresses_in(daemon.pid());
    let bip = BIP.split('/').next().unwrap();
    assert!(inner.lines().any(|l| l.starts_with("docker0 ") && l.contains(bip)), "{inner}");
    let ns = |pid: u32| std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    assert_ne!(ns(daemon.pid()), own, "dockerd runs in RootlessKit's namespace");
    assert_ne!(ns(bad.pid()), ns(daemon.pid()), "the container has a namespace of its own");
    assert_eq!(bad.inspect("{{.NetworkSettings.IPAddress}}"), "10.201.0.2");

    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert_eq!(code, 52, "RootlessKit accepts, docker-proxy cannot forward: an empty reply");
}

/// 3 (issue 15). `bindtrace` with no flags, started before the user's rootless daemon: the
/// daemon's socket under /run/user/UID is found as it appears, its container is audited and
/// its refused connection reported by name (runtime docker, rootless), inside RootlessKit's
/// namespace: the container's own namespace, the veth and docker0 as they are named in
/// RootlessKit's, the published port and the loopback_only verdict with the fix.
#[test]
fn rootless_docker_container_reported_by_name() {
    if skip() {
        return;
    }
    let user = User::create();
    let bt = Bindtrace::start_here(&["--audit-grace", "1s"]);
    let daemon = Daemon::start(&user);
    let image = daemon.busybox_image();
    let port = free_port();
    let bad = daemon.run(
        &image,
        &["-p", &format!("{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    bad.wait_listening(8000);
    let named = |event: &'static str| {
        let name = bad.name.clone();
        move |l: &serde_json::Value| l["event"] == event && l["container"]["name"] == name.as_str()
    };

    let audit = bt.expect_line("audit of the rootless Docker container", WAIT, named("audit"));
    assert_eq!(audit["verdict"], "loopback_only", "{audit:#}");
    assert_eq!(audit["container"]["runtime"], "docker", "{audit:#}");
    assert_eq!(audit["container"]["rootless"], true, "{audit:#}");
    assert_eq!(audit["container"]["id"], bad.short_id(), "{audit:#}");
    assert_eq!(audit["published"]["host_port"], port, "{audit:#}");
    assert_eq!(audit["listeners"][0]["ip"], "127.0.0.1", "{audit:#}");

    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert_eq!(code, 52, "RootlessKit accepts, docker-proxy cannot forward: an empty reply");
    let line = bt.expect_line("refusal in the rootless Docker container", WAIT, named("refused"));
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["container"]["runtime"], "docker", "{line:#}");
    assert_eq!(line["container"]["rootless"], true, "{line:#}");
    assert_eq!(line["container"]["id"], bad.short_id(), "{line:#}");
    assert_eq!(line["target_port"], 8000, "{line:#}");
    assert_eq!(line["target_ip"], "10.201.0.2", "{line:#}");
    assert_eq!(line["published"]["host_port"], port, "{line:#}");
    assert!(line["hint"].as_str().unwrap().contains("0.0.0.0"), "the fix: {line:#}");
    let ns = |pid: u32| std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    assert_eq!(line["netns"], ns(bad.pid()), "{line:#}");
    // The bridge and veth as RootlessKit's namespace names them: docker0 there, and the peer
    // of the container's eth0 on it.
    assert_eq!(line["bridge"], "docker0", "{line:#}");
    let veths = Command::new("nsenter")
        .args(["-t", &daemon.pid().to_string(), "-n", "ip", "-o", "link", "show", "master", "docker0"])
        .output()
        .unwrap();
    let veths = String::from_utf8_lossy(&veths.stdout);
    let veth = line["veth"].as_str().unwrap_or_else(|| panic!("a veth: {line:#}"));
    assert!(veths.contains(&format!(" {veth}@")), "{veth} is on RootlessKit's docker0: {veths}");
    assert_eq!(line["listeners"][0]["pids"][0]["pid"], bad.pid(), "{line:#}");
    // RootlessKit's port driver forwarded it: the connector is the daemon's docker-proxy, in
    // RootlessKit's namespace, dialing from that docker0's address.
    assert_eq!(line["via"], "rootlesskit", "{line:#}");
    assert_eq!(line["client_ip"], BIP.split('/').next().unwrap(), "{line:#}");
    let proxy = &line["client_process"];
    assert_eq!(proxy["comm"], "docker-proxy", "{line:#}");
    let proxy_ns = std::fs::metadata(format!("/proc/{}/ns/net", proxy["pid"])).unwrap().ino();
    assert_eq!(proxy_ns, ns(daemon.pid()), "docker-proxy runs in RootlessKit's namespace");
}

/// Issue 15, the tc hook (kernels before 5.17): the classic case with `--hook tc`. The
/// container's veth peer is in RootlessKit's namespace, so the classifier is attached there,
/// inside that namespace: the refusal is reported by name with docker0 and the veth as
/// RootlessKit's namespace names them; after bindtrace exits nothing of it is left on that
/// veth (tcx links, then clsact filters: the path of those kernels).
#[test]
fn tcns_rootless_docker_on_the_tc_hook() {
    use bindtrace_tests::native::{ingress_programs_of_pid, programs_held_by, wait_unloaded};
    if skip() {
        return;
    }
    let user = User::create();
    let daemon = Daemon::start(&user);
    let image = daemon.busybox_image();
    let port = free_port();
    let bad = daemon.run(
        &image,
        &["-p", &format!("{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    bad.wait_listening(8000);
    let ns = |pid: u32| std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    for mode in [&[][..], &["--tc-clsact"][..]] {
        let mut args = vec!["--hook", "tc"];
        args.extend_from_slice(mode);
        let mut bt = Bindtrace::start_here(&args);
        let ours = programs_held_by(bt.pid());
        let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
        assert_eq!(code, 52, "RootlessKit accepts, docker-proxy cannot forward: an empty reply");
        let name = bad.name.clone();
        let line = bt.expect_line("refusal in RootlessKit's namespace, tc hook", WAIT, move |l| {
            l["event"] == "refused" && l["container"]["name"] == name.as_str()
        });
        assert_eq!(line["container"]["rootless"], true, "{mode:?} {line:#}");
        assert_eq!(line["container"]["id"], bad.short_id(), "{line:#}");
        assert_eq!(line["target_port"], 8000, "{line:#}");
        assert_eq!(line["published"]["host_port"], port, "{line:#}");
        assert_eq!(line["netns"], ns(bad.pid()), "{line:#}");
        assert_eq!(line["bridge"], "docker0", "{line:#}");
        assert_eq!(line["via"], "rootlesskit", "{line:#}");
        let veth = line["veth"].as_str().unwrap_or_else(|| panic!("a veth: {line:#}")).to_owned();
        let on_veth = ingress_programs_of_pid(daemon.pid(), &veth);
        assert!(on_veth.iter().any(|id| ours.contains(id)), "{mode:?}: {veth} not attached: {on_veth:?}");
        assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
        let left = ingress_programs_of_pid(daemon.pid(), &veth);
        assert!(left.iter().all(|id| !ours.contains(id)), "{mode:?}: left on {veth}: {left:?}");
        assert_eq!(wait_unloaded(&ours), Vec::<u32>::new(), "{mode:?}: programs left loaded");
    }
}

/// Issue 15's rootless Docker edges, on one daemon run with `--userland-proxy=false` (its
/// ports are then DNATed by iptables inside RootlessKit's namespace, and RootlessKit's port
/// driver is never asked to listen on the host: nobody calls its API without
/// `rootlesskit-docker-proxy`), a loopback-bound container published with `-p H:8000`:
/// - `bindtrace check docker:NAME` finds it through the user's socket and audits its port;
/// - `bindtrace doctor` has a `docker_rootless` line for the user's socket, and a
///   `podman_rootless` line for the same user's podman service;
/// - `bindtrace` follows RootlessKit's conntrack table: a connection to the published port made
///   inside RootlessKit's namespace (the only place it is published) is reported by name,
///   `via` dnat, with the published port and the original tuple from that table.
#[test]
fn rlops_userland_proxy_off_dnat_is_read_from_rootlesskits_table() {
    if skip() {
        return;
    }
    let user = User::create();
    let daemon = Daemon::start_with(&user, &["--userland-proxy=false"]);
    let image = daemon.busybox_image();
    let port = free_port();
    let bad = daemon.run(
        &image,
        &["-p", &format!("{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    bad.wait_listening(8000);
    let target = bad.inspect("{{.NetworkSettings.IPAddress}}");

    // check: no eBPF, the user's socket found under /run/user.
    let out = Command::new(binary())
        .args(["check", "--format", "json", &format!("docker:{}", bad.name)])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "loopback-only: {stdout}{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["containers"], 1, "{doc:#}");
    let row = &doc["ports"][0];
    assert_eq!(row["verdict"], "loopback_only", "{doc:#}");
    assert_eq!(row["container"]["name"], bad.name.as_str(), "{doc:#}");
    assert_eq!(row["container"]["rootless"], true, "{doc:#}");
    assert_eq!(row["published"]["host_port"], port, "{doc:#}");

    // doctor: a line for each of the user's sockets.
    let podman = user.service();
    let out = Command::new(binary())
        .args(["doctor", "--no-metrics", "--format", "json"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let line_of = |name: &str, sock: &str| {
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name && c["detail"].as_str().unwrap().contains(sock))
            .unwrap_or_else(|| panic!("no {name} line for {sock}: {doc:#}"))
            .clone()
    };
    let docker_line = line_of("docker_rootless", daemon.path());
    assert_eq!(docker_line["status"], "ok", "{docker_line:#}");
    let detail = docker_line["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("user {} (uid {})", user.name, user.uid)), "{detail}");
    assert!(detail.contains("rootless Docker") && detail.contains("1 running containers"), "{detail}");
    let podman_line = line_of("podman_rootless", podman.path());
    assert_eq!(podman_line["status"], "ok", "{podman_line:#}");
    drop(podman);

    // The port is published only inside RootlessKit's namespace: curl it there, at docker0's
    // address (DNAT in that namespace's OUTPUT chain, to the container).
    let bip = BIP.split('/').next().unwrap();
    let curl_inside = || {
        let out = Command::new("nsenter")
            .args(["-t", &daemon.pid().to_string(), "-n", "curl", "-sS", "--max-time", "5"])
            .arg(format!("http://{bip}:{port}/"))
            .output()
            .unwrap();
        out.status.code().unwrap_or(-1)
    };
    let bt = Bindtrace::start_here(&["--audit-grace", "1s"]);
    let name = bad.name.clone();
    let named = move |event: &'static str| {
        let name = name.clone();
        move |l: &serde_json::Value| l["event"] == event && l["container"]["name"] == name.as_str()
    };
    bt.expect_line("audit of the rootless container", WAIT, named("audit"));
    assert!(bt.wait_stderr("following the conntrack table of rootless dockerd", WAIT), "{}", bt.stderr());
    assert_eq!(curl_inside(), 7, "the container resets the DNATed SYN: refused");
    let line = bt.expect_line("refusal in the rootless container", WAIT, named("refused"));
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["container"]["rootless"], true, "{line:#}");
    assert_eq!(line["target_ip"], target.as_str(), "{line:#}");
    assert_eq!(line["target_port"], 8000, "{line:#}");
    assert_eq!(line["via"], "dnat", "RootlessKit's table has the flow: {line:#}");
    assert_eq!(line["published"]["host_port"], port, "{line:#}");
    assert_eq!(line["original"]["target_ip"], bip, "{line:#}");
    assert_eq!(line["original"]["target_port"], port, "{line:#}");
}

/// A user's rootless Docker socket that accepts and never answers, then dies (its listener
/// closed, the file left), next to rootful Docker: one warning naming it, the follower retrying
/// (a second connection comes), and rootful Docker's refusal reported by name meanwhile. The
/// socket is under a private `--run-dir` (a user's `user/UID/docker.sock` made after start),
/// never the real /run/user.
#[test]
fn rlops_a_hanging_rootless_socket_leaves_rootful_docker_reporting() {
    use bindtrace_tests::{docker, podman::RunDir};
    use std::{
        os::unix::net::UnixListener,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicUsize, Ordering},
        },
    };
    if !root_or_skip() {
        return;
    }
    if !docker::available() {
        bindtrace_tests::skip("no Docker daemon answers here");
        return;
    }
    let run = RunDir::new();
    let bt = Bindtrace::start_here(&[
        "--run-dir",
        run.path(),
        "--docker-host",
        docker::DOCKER_SOCK,
        "--audit-grace",
        "1s",
    ]);
    // The hanging "daemon": accepts, holds every connection, answers nothing; stops on `dead`.
    let dir = run.path.join("user/4243");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("docker.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let (accepted, dead) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let hang = {
        let (accepted, dead) = (accepted.clone(), dead.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !dead.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        held.push(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    };
    let path = sock.display().to_string();
    assert!(bt.wait_stderr(&format!("{path} appeared"), WAIT), "{}", bt.stderr());
    let warning = format!("Docker API at {path} unavailable");
    assert!(bt.wait_stderr(&warning, WAIT), "the hung socket is warned about: {}", bt.stderr());

    // Rootful Docker goes on: its loopback-bound container's refusal is reported by name.
    let image = docker::Image::busybox();
    let port = free_port();
    let bad = docker::Container::run(
        &image,
        &["-p", &format!("127.0.0.1:{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    bad.wait_listening(8000);
    let _ = curl(&format!("http://127.0.0.1:{port}/"));
    let name = bad.name.clone();
    let line = bt.expect_line("rootful Docker's refusal", WAIT, move |l| {
        l["event"] == "refused" && l["container"]["name"] == name.as_str()
    });
    assert_eq!(line["container"]["runtime"], "docker", "{line:#}");
    assert_eq!(line["published"]["host_port"], port, "{line:#}");

    // Retried: another connection after the first timed out.
    let deadline = std::time::Instant::now() + WAIT;
    while accepted.load(Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "the follower never retried: {}", bt.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    // It dies: the listener closes, the file stays (connections are refused from now on).
    dead.store(true, Ordering::SeqCst);
    hang.join().unwrap();
    let mut bt = bt;
    assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
    let stderr = bt.stderr();
    assert_eq!(stderr.matches(&warning).count(), 1, "one warning for the hung, then dead socket: {stderr}");
    assert!(stderr.lines().any(|l| l.contains("Docker: ") && l.contains("running containers")), "{stderr}");
}
