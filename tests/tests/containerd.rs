//! Against containerd (issue 15, test 4): a private daemon of the test's own (Debian's
//! containerd 1.6, its own root, state and sockets; see `bindtrace_tests::containerd`), tasks
//! run with `ctr` and named the way the kubelet names them, in its OCI annotations.
//!
//! bindtrace runs in the host's namespace without `-i`, as on a Kubernetes node, reading the
//! daemon's task state directory (`--containerd-state`). Addresses are the test's own
//! (10.231.153.0/24 on its CNI bridge, 10.231.154.9 routed); traffic goes only there.
use std::{process::Command, time::Duration};

use bindtrace_tests::{
    Bindtrace,
    containerd::{self, Daemon, K8S_NAMESPACE},
    docker::curl,
    root_or_skip,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);
const POD_SUBNET: &str = "10.231.153.0/24";
const ROUTED_ADDRESS: &str = "10.231.154.9";

fn skip() -> bool {
    if !root_or_skip() {
        return true;
    }
    if !containerd::available() {
        bindtrace_tests::skip("containerd or the CNI plugins are not installed (`./x setup` installs them)");
        return true;
    }
    false
}

/// Waits until something in process `pid`'s network namespace listens on 127.0.0.1:8000.
fn wait_listening(pid: u32) {
    for _ in 0..200 {
        let out =
            Command::new("nsenter").args(["-t", &pid.to_string(), "-n", "cat", "/proc/net/tcp"]).output();
        let tcp = String::from_utf8_lossy(&out.expect("nsenter").stdout).into_owned();
        // 127.0.0.1:8000 (little-endian address, port 0x1F40) in state LISTEN (0A).
        if tcp.lines().any(|l| l.contains(" 0100007F:1F40 00000000:0000 0A ")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on 127.0.0.1:8000 in the namespace of pid {pid}");
}

/// `ip ARGS` (optionally inside process `pid`'s network namespace), panicking on failure.
fn ip(pid: Option<u32>, args: &[&str]) {
    let mut cmd = match pid {
        Some(p) => {
            let mut c = Command::new("nsenter");
            c.args(["-t", &p.to_string(), "-n", "ip"]);
            c
        }
        None => Command::new("ip"),
    };
    let out = cmd.args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A host-side veth, deleted on drop (its peer goes with it).
struct Veth(String);

impl Drop for Veth {
    fn drop(&mut self) {
        let _ =
            Command::new("ip").args(["link", "del", &self.0]).stderr(std::process::Stdio::null()).status();
    }
}

fn refused_line(bt: &Bindtrace, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    bt.expect_line(what, WAIT, |l| l["event"] == "refused" && pred(l))
}

/// 4. A pod (a pause task on a CNI bridge and an app task in its namespace, with the kubelet's
///    annotations) whose server listens on 127.0.0.1:8000: a connection from the host to the
///    pod's address is reported as pod NAME in namespace NS, `loopback_only`. Then a task on a
///    routed veth without a bridge (a /32 route, as Calico does), named by nerdctl's
///    annotation: watched too, its line without a bridge.
#[test]
fn pod_on_a_cni_bridge_and_a_routed_workload() {
    if skip() {
        return;
    }
    let tag = std::process::id() % 1000;
    let mut d = Daemon::start();
    let image = format!("docker.io/library/containerd-bt{tag}:latest");
    d.import_busybox(K8S_NAMESPACE, &image);
    let bridge = format!("containerdb{tag}");
    d.cni_bridge(&format!("containerd-bt{tag}"), &bridge, POD_SUBNET);
    let state = d.task_state_dir();
    let mut bt = Bindtrace::start_here(&["--containerd-state", state.to_str().unwrap()]);

    // The pod: its sandbox (pause) and its app, as the kubelet's CRI plugin annotates them.
    let sandbox = format!("{:064x}", 0x00c0_ffee_0000_u64 + u64::from(std::process::id()));
    let app = format!("containerd-app{tag}");
    let pod = |kind: &str, image_name: &str| -> Vec<String> {
        [
            format!("io.kubernetes.cri.container-type={kind}"),
            "io.kubernetes.cri.sandbox-name=web-0".into(),
            "io.kubernetes.cri.sandbox-namespace=containerd-shop".into(),
            format!("io.kubernetes.cri.sandbox-id={sandbox}"),
            format!("io.kubernetes.cri.image-name={image_name}"),
        ]
        .into_iter()
        .flat_map(|a| ["--annotation".to_owned(), a])
        .collect()
    };
    let pause_args = pod("sandbox", "registry.k8s.io/pause:3.6");
    let pause_args: Vec<&str> = pause_args.iter().map(String::as_str).collect();
    d.run(K8S_NAMESPACE, true, &pause_args, &image, &sandbox, &["sleep", "3600"]);
    let pause_pid = d.pid(K8S_NAMESPACE, &sandbox);
    let with_ns = format!("network:/proc/{pause_pid}/ns/net");
    let mut app_args = pod("container", "containerd-shop/web:1");
    app_args.extend(["--with-ns".to_owned(), with_ns]);
    let app_args: Vec<&str> = app_args.iter().map(String::as_str).collect();
    d.run(
        K8S_NAMESPACE,
        false,
        &app_args,
        &image,
        &app,
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    wait_listening(pause_pid);
    let pod_ip = d.address(K8S_NAMESPACE, &sandbox, "eth0");
    assert!(
        bt.wait_stderr(&format!("{bridge}: watching"), WAIT),
        "the pod's veth on {bridge} is watched without -i:\n{}",
        bt.stderr()
    );

    let (code, _) = curl(&format!("http://{pod_ip}:8000/"));
    assert_eq!(code, 7, "the pod's kernel resets the SYN: nothing listens on its address");
    let line = refused_line(&bt, "the pod's refusal", |l| l["container"]["pod"] == "web-0");
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["container"]["runtime"], "containerd", "{line:#}");
    assert_eq!(line["container"]["namespace"], "containerd-shop", "{line:#}");
    assert_eq!(line["container"]["name"], "web-0", "{line:#}");
    assert_eq!(line["container"]["id"], &sandbox[..12], "{line:#}");
    assert_eq!(line["container"]["image"], "containerd-shop/web:1", "the app's image, not pause: {line:#}");
    assert_eq!(line["bridge"], bridge.as_str(), "{line:#}");
    assert_eq!(line["target_ip"], pod_ip.to_string(), "{line:#}");
    assert_eq!(line["listeners"][0]["ip"], "127.0.0.1", "{line:#}");
    assert_eq!(line["via"], "direct", "the CNI bridge's prefix is watched by the connect tracker: {line:#}");
    assert_eq!(line["client_process"]["comm"], "curl", "{line:#}");

    // A routed workload: a veth with no bridge, a /32 route to its address.
    let routed = format!("containerd-routed{tag}");
    d.run(
        K8S_NAMESPACE,
        false,
        &[
            "--annotation",
            "nerdctl/name=containerd-routed-web",
            "--annotation",
            r#"nerdctl/ports=[{"HostPort":18931,"ContainerPort":8000,"Protocol":"tcp","HostIP":"0.0.0.0"}]"#,
        ],
        &image,
        &routed,
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    let routed_pid = d.pid(K8S_NAMESPACE, &routed);
    let host_side = Veth(format!("containerdr{tag}"));
    let pod_side = format!("containerdp{tag}");
    ip(None, &["link", "add", &host_side.0, "type", "veth", "peer", "name", &pod_side]);
    ip(None, &["link", "set", &pod_side, "netns", &routed_pid.to_string()]);
    ip(Some(routed_pid), &["addr", "add", &format!("{ROUTED_ADDRESS}/32"), "dev", &pod_side]);
    ip(Some(routed_pid), &["link", "set", &pod_side, "up"]);
    ip(Some(routed_pid), &["route", "add", "default", "dev", &pod_side]);
    ip(None, &["link", "set", &host_side.0, "up"]);
    ip(None, &["route", "add", &format!("{ROUTED_ADDRESS}/32"), "dev", &host_side.0]);
    wait_listening(routed_pid);
    assert!(
        bt.wait_stderr(&format!("watching {}", host_side.0), WAIT),
        "the routed veth {} is watched:\n{}",
        host_side.0,
        bt.stderr()
    );
    // Its address was set after its veth came up: the host route, added last as a CNI does,
    // is what tells bindtrace to read it (no link changes after it).
    assert!(
        bt.wait_stderr(&format!("{ROUTED_ADDRESS}/32"), WAIT),
        "the routed address is watched by the connect tracker once its route is there:\n{}",
        bt.stderr()
    );
    let (code, _) = curl(&format!("http://{ROUTED_ADDRESS}:8000/"));
    assert_eq!(code, 7, "the routed workload resets the SYN");
    let line = refused_line(&bt, "the routed workload's refusal", |l| {
        l["container"]["name"] == "containerd-routed-web"
    });
    assert_eq!(line["verdict"], "loopback_only", "{line:#}");
    assert_eq!(line["container"]["runtime"], "containerd", "{line:#}");
    assert_eq!(line["container"]["pod"], Value::Null, "{line:#}");
    assert_eq!(line["container"]["namespace"], Value::Null, "{line:#}");
    assert_eq!(line["bridge"], Value::Null, "no bridge: {line:#}");
    assert_eq!(line["veth"], host_side.0.as_str(), "{line:#}");
    assert_eq!(line["target_ip"], ROUTED_ADDRESS, "{line:#}");
    assert_eq!(line["via"], "direct", "the routed address is watched on its own: {line:#}");
    assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());

    // `bindtrace check` reads the same state: nerdctl's published port is audited, the pod is
    // found by its Kubernetes name and said to have no port list to audit.
    let out = Command::new(bindtrace_tests::bindtrace::binary())
        .args(["check", "--format", "json", "--containerd-state", state.to_str().unwrap()])
        .args(["containerd:containerd-routed-web", "k8s:containerd-shop/web-0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(out.status.code(), Some(1), "loopback-only: {doc:#}\n{stderr}");
    assert_eq!(doc["containers"], 1, "{doc:#}");
    let row = &doc["ports"][0];
    assert_eq!(row["container"]["name"], "containerd-routed-web", "{doc:#}");
    assert_eq!(row["container"]["runtime"], "containerd", "{doc:#}");
    assert_eq!(row["target_port"], 8000, "{doc:#}");
    assert_eq!(row["verdict"], "loopback_only", "{doc:#}");
    assert_eq!(row["bindings"][0]["host_port"], 18931, "{doc:#}");
    assert!(
        stderr.contains("k8s:containerd-shop/web-0: no published ports known"),
        "the pod is found, and why it has no row is said:\n{stderr}"
    );
    let out = Command::new(bindtrace_tests::bindtrace::binary())
        .args(["check", "--containerd-state", state.to_str().unwrap(), "k8s:containerd-shop/nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "a pod not running: {out:?}");

    // doctor says what the state directory holds: the pod and the routed workload.
    let out = Command::new(bindtrace_tests::bindtrace::binary())
        .args(["doctor", "--format", "json", "--no-metrics", "--containerd-state", state.to_str().unwrap()])
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let line = doc["checks"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "containerd")).cloned();
    let detail = line.as_ref().and_then(|l| l["detail"].as_str()).unwrap_or_default().to_owned();
    assert!(detail.contains("2 workloads outside Docker's own"), "{doc:#}");
    assert!(detail.contains("1 of them pods"), "{doc:#}");
}
