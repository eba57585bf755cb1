//! Against rootless podman (slirp4netns, rootlessport) of a test user of its own, through that
//! user's `podman system service` on /run/user/UID/podman/podman.sock. Run as root through
//! `sudo ./x test`.
//!
//! The user, its subordinate ids, the `/dev/net/tun` ACL, its image, containers, service and
//! processes are removed by their guards, also on panic (`bindtrace_tests::rootless`). Host
//! ports are picked free at run time, names are unique, and traffic only goes to loopback (and,
//! inside the container, to its own loopback).
use std::{os::unix::fs::MetadataExt, process::Command, time::Duration};

use bindtrace_tests::{
    Bindtrace,
    bindtrace::binary,
    docker::{curl, free_port},
    root_or_skip,
    rootless::{self, User},
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// True when this test cannot run here (see `bindtrace_tests::skip`: under `CI` it fails).
fn skip() -> bool {
    if !root_or_skip() {
        return true;
    }
    if let Some(missing) = rootless::available() {
        bindtrace_tests::skip(&format!("{missing} is not installed (`./x setup` installs it)"));
        return true;
    }
    false
}

/// 2 (issue 15). A loopback-bound server in a rootless container published with `-p H:8000`:
/// rootlessport accepts on the host and its child, inside the container's namespace, dials the
/// container's own address, refused over that namespace's `lo`. Audited by name first; the
/// refused `curl` is reported by name, via rootlessport (the forwarder named by its
/// executable), with the published port; `bindtrace check` finds it too. The container's own
/// connection to its loopback, refused on the same `lo`, is not a forwarded one: no line.
#[test]
fn loopback_server_behind_rootlessport() {
    if skip() {
        return;
    }
    let user = User::create();
    let image = user.busybox_image();
    let port = free_port();
    let bad = user.run(
        &image,
        &["-p", &format!("{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    bad.wait_listening(8000);
    assert_eq!(bad.inspect("{{.HostConfig.NetworkMode}}"), "slirp4netns");
    let service = user.service();
    let mut bt = Bindtrace::start_here(&["--docker-host", service.path(), "--audit-grace", "1s"]);
    let named = |event: &'static str| {
        let name = bad.name.clone();
        move |l: &Value| l["event"] == event && l["container"]["name"] == name.as_str()
    };

    let audit = bt.expect_line("audit of the rootless container", WAIT, named("audit"));
    assert_eq!(audit["verdict"], "loopback_only", "{audit:#}");
    assert_eq!(audit["container"]["runtime"], "podman", "{audit:#}");
    assert_eq!(audit["container"]["id"], bad.short_id(), "{audit:#}");
    assert_eq!(audit["published"]["host_port"], port, "{audit:#}");
    assert_eq!(audit["listeners"][0]["ip"], "127.0.0.1", "{audit:#}");

    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert!(
        code == 52 || code == 56,
        "rootlessport accepts, then drops the connection it could not forward: curl {code}"
    );
    let line = bt.expect_line("refusal in the rootless container", WAIT, named("refused"));
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["via"], "rootlessport", "{line:#}");
    assert_eq!(line["published"]["host_port"], port, "{line:#}");
    assert_eq!(line["container"]["runtime"], "podman", "{line:#}");
    assert_eq!(line["container"]["id"], bad.short_id(), "{line:#}");
    assert_eq!(line["target_port"], 8000, "{line:#}");
    // On the namespace's lo: no bridge, no veth; the forwarder dials the container's own
    // address from that same address.
    assert_eq!(
        (&line["ifindex"], &line["bridge"], &line["veth"]),
        (&1.into(), &serde_json::Value::Null, &serde_json::Value::Null),
        "{line:#}"
    );
    assert_eq!(line["client_ip"], line["target_ip"], "{line:#}");
    assert!(!line["target_ip"].as_str().unwrap().starts_with("127."), "{line:#}");
    let own_ns = std::fs::metadata(format!("/proc/{}/ns/net", bad.pid())).unwrap().ino();
    assert_eq!(line["netns"], own_ns, "{line:#}");
    // The forwarder, named by its executable: its child's comm is `exe`.
    let forwarder = &line["client_process"];
    assert_eq!(forwarder["comm"], "rootlessport", "{line:#}");
    let exe = std::fs::read_link(format!("/proc/{}/exe", forwarder["pid"])).unwrap();
    assert!(exe.ends_with("rootlessport"), "{exe:?}");
    assert_eq!(line["listeners"][0]["pids"][0]["pid"], bad.pid(), "{line:#}");

    // The app's own connection to its loopback, on the same lo: refused, but not forwarded.
    let own = bad.exec(&["wget", "-q", "-T", "2", "-O-", "http://127.0.0.1:9/"]);
    assert!(!own.status.success(), "nothing listens on 127.0.0.1:9 in the container");
    bt.expect_none_after_exit("the container's own loopback connection", |l| {
        l["event"] == "refused" && l["target_port"] == 9
    });

    let out = Command::new(binary())
        .args(["check", "--format", "json", "--docker-host", service.path(), &bad.name])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["ports"][0]["verdict"], "loopback_only", "{doc:#}");
    assert_eq!(doc["ports"][0]["published"]["host_port"], port, "{doc:#}");
}

/// Issue 15, the tc hook (kernels before 5.17): the same loopback-bound container with
/// `--hook tc`, once with tcx links and once with clsact filters (the path of those kernels).
/// The refusal crosses the container's own `lo`, so the classifier is attached there, inside the
/// container's namespace: reported by name, via rootlessport, on ifindex 1 of that namespace;
/// the container's own loopback connection is not counted; and after bindtrace exits nothing of
/// it is left on that `lo`.
#[test]
fn tcns_loopback_server_behind_rootlessport_on_the_tc_hook() {
    use bindtrace_tests::native::{ingress_programs_of_pid, programs_held_by, wait_unloaded};
    if skip() {
        return;
    }
    let user = User::create();
    let image = user.busybox_image();
    let port = free_port();
    let bad = user.run(
        &image,
        &["-p", &format!("{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    bad.wait_listening(8000);
    let service = user.service();
    let own_ns = std::fs::metadata(format!("/proc/{}/ns/net", bad.pid())).unwrap().ino();
    for mode in [&[][..], &["--tc-clsact"][..]] {
        let mut args = vec!["--hook", "tc", "--docker-host", service.path()];
        args.extend_from_slice(mode);
        let mut bt = Bindtrace::start_here(&args);
        let ours = programs_held_by(bt.pid());
        let on_lo = ingress_programs_of_pid(bad.pid(), "lo");
        assert!(
            on_lo.iter().any(|id| ours.contains(id)),
            "{mode:?}: lo not attached: {on_lo:?}\n{}",
            bt.stderr()
        );

        let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
        assert!(code == 52 || code == 56, "curl {code}");
        let name = bad.name.clone();
        let line = bt.expect_line("refusal on the container's lo, tc hook", WAIT, move |l: &Value| {
            l["event"] == "refused" && l["container"]["name"] == name.as_str()
        });
        assert_eq!(line["via"], "rootlessport", "{mode:?} {line:#}");
        assert_eq!(line["published"]["host_port"], port, "{line:#}");
        assert_eq!(line["container"]["id"], bad.short_id(), "{line:#}");
        assert_eq!(line["target_port"], 8000, "{line:#}");
        assert_eq!((&line["ifindex"], &line["netns"]), (&1.into(), &own_ns.into()), "{line:#}");
        assert!(!line["target_ip"].as_str().unwrap().starts_with("127."), "{line:#}");
        // The reset crosses lo twice (egress, then ingress): attached at ingress only, it is
        // counted once.
        assert_eq!(line["count"], 1, "{line:#}");

        let own = bad.exec(&["wget", "-q", "-T", "2", "-O-", "http://127.0.0.1:9/"]);
        assert!(!own.status.success(), "nothing listens on 127.0.0.1:9 in the container");
        bt.expect_none_after_exit("the container's own loopback connection", |l| {
            l["event"] == "refused" && l["target_port"] == 9
        });
        let left = ingress_programs_of_pid(bad.pid(), "lo");
        assert!(left.iter().all(|id| !ours.contains(id)), "{mode:?}: left on lo: {left:?}");
        assert_eq!(wait_unloaded(&ours), Vec::<u32>::new(), "{mode:?}: programs left loaded");
    }

    // A SIGKILLed bindtrace's clsact filter on that lo outlives it; the next start removes it
    // before attaching its own there, and leaves nothing at its exit.
    let args = ["--hook", "tc", "--tc-clsact", "--docker-host", service.path()];
    let mut killed = Bindtrace::start_here(&args);
    let killed_progs = programs_held_by(killed.pid());
    unsafe { libc::kill(killed.pid() as i32, libc::SIGKILL) };
    killed.stop();
    let left = ingress_programs_of_pid(bad.pid(), "lo");
    assert!(left.iter().any(|id| killed_progs.contains(id)), "no filter survived the SIGKILL: {left:?}");
    let mut restarted = Bindtrace::start_here(&args);
    let stderr = restarted.stderr();
    let reaped = format!("clsact filters that a killed bindtrace left in netns {own_ns}");
    assert!(stderr.contains(&reaped), "{stderr}");
    let ours = programs_held_by(restarted.pid());
    let now = ingress_programs_of_pid(bad.pid(), "lo");
    assert!(now.iter().all(|id| !killed_progs.contains(id)), "the dead instance's filter stayed: {now:?}");
    assert!(now.iter().any(|id| ours.contains(id)), "{now:?}");
    assert_eq!(restarted.stop(), Some(0), "{}", restarted.stderr());
    let left = ingress_programs_of_pid(bad.pid(), "lo");
    assert!(left.iter().all(|id| !ours.contains(id)), "left on lo: {left:?}");
}
