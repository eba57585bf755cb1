//! Against rootless Docker (Debian's `dockerd-rootless.sh` and RootlessKit, slirp4netns, the
//! builtin port driver) of a test user of its own, its API on /run/user/UID/docker.sock. Run as
//! root through `sudo ./x test`.
//!
//! The user, its subordinate ids, the `/dev/net/tun` ACL, the daemon, its image, containers and
//! processes are removed by their guards, also on panic (`bindtrace_tests::rootless`,
//! `bindtrace_tests::rootless_docker`). The machine's own Docker daemon is not used. Host ports
//! are picked free at run time, names are unique, and traffic only goes to loopback.
use std::{os::unix::fs::MetadataExt, process::Command};

use bindtrace_tests::{
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
