//! The connect tracker's keys carry the refused namespace: two networks that reuse the same
//! addresses (rootless Docker's 172.17.0.0/16 inside RootlessKit's namespace, parallel plain
//! namespaces) give refusals with identical 4-tuples, and each must name its own connector.
//!
//! Two bridges in bindtrace's namespace, each an L2 segment of its own with the same prefix
//! (10.77.0.0/24): on each, a "router" namespace (10.77.0.1, the client) and a container
//! (10.77.0.2, a loopback-bound server). The clients connect from the same source port, so both
//! refusals have the 4-tuple 10.77.0.1:41000 -> 10.77.0.2:8080, in two namespaces.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use bindtrace_tests::{Bindtrace, Hook, Listener, Netns, net::unique, root_or_skip};
use serde_json::Value;

macro_rules! for_each_hook {
    ($($name:ident),* $(,)?) => {
        mod tcp_send_reset { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::TcpSendReset) } } )* }
        mod kfree_skb { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::KfreeSkb) } } )* }
        mod tc { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::Tc) } } )* }
    };
}

for_each_hook!(same_tuple_in_two_namespaces_names_each_its_own_connector);

const CLIENT: &str = "10.77.0.1";
const TARGET: &str = "10.77.0.2";
const CLIENT_PORT: u16 = 41000;
const PORT: u16 = 8080;
/// Long enough that the second network's refusal (a second or so of process starts) is made
/// well before the first network's folded line is due.
const FOLD_WINDOW: &str = "10s";
const LINE_WAIT: Duration = Duration::from_secs(40);

/// One L2 segment: a bridge in `host`, a router namespace with the client's address and a
/// container with the target's, each on a veth that is a port of the bridge.
struct Network {
    router: Netns,
    container: Netns,
    container_veth: String,
}

fn attach(host: &Netns, bridge: &str, ns: &Netns, addr: &str) -> String {
    let host_veth = unique("nskv");
    let tmp = unique("nskp");
    host.ip(&["link", "add", &host_veth, "type", "veth", "peer", "name", &tmp]);
    host.ip(&["link", "set", &host_veth, "master", bridge, "up"]);
    host.ip(&["link", "set", &tmp, "netns", &ns.name]);
    ns.ip(&["link", "set", &tmp, "name", "eth0"]);
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    host_veth
}

fn network(host: &Netns) -> (String, Network) {
    let bridge = unique("nskb");
    host.ip(&["link", "add", &bridge, "type", "bridge"]);
    // The same prefix on both bridges: it is what the connect tracker watches. bindtrace's
    // namespace never routes to it; each segment's traffic stays on its bridge.
    host.ip(&["addr", "add", "10.77.0.254/24", "dev", &bridge]);
    host.ip(&["link", "set", &bridge, "up"]);
    let router = Netns::new("nskeys-r");
    let container = Netns::new("nskeys-c");
    attach(host, &bridge, &router, CLIENT);
    let container_veth = attach(host, &bridge, &container, TARGET);
    (bridge, Network { router, container, container_veth })
}

/// Connects from the router's client address and fixed port to the container, in a process of
/// its own (so each connector has its own pid); returns that pid once the connect was refused.
fn refused_from(router: &Netns) -> u32 {
    let script = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{CLIENT}', {CLIENT_PORT}))\n\
         try:\n    s.connect(('{TARGET}', {PORT}))\n    print('connected')\n\
         except ConnectionRefusedError:\n    print('refused')\n"
    );
    let child = Command::new("ip")
        .args(["netns", "exec", &router.name, "python3", "-c", &script])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("start the client");
    // `ip netns exec` execs the command: the pid is python's.
    let pid = child.id();
    let out = child.wait_with_output().expect("client output");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "refused", "from {}", router.name);
    pid
}

fn same_tuple_in_two_namespaces_names_each_its_own_connector(hook: Hook) {
    let host = Netns::new("nskeys-h");
    let (br1, one) = network(&host);
    let (br2, two) = network(&host);
    let _server1 = Listener::start(&one.container.name, "127.0.0.1", PORT, &[]);
    let _server2 = Listener::start(&two.container.name, "127.0.0.1", PORT, &[]);
    let bt =
        Bindtrace::start(&host, hook, &["-i", &br1, "-i", &br2, "--no-docker", "--fold-window", FOLD_WINDOW]);
    for n in [&one, &two] {
        let watching = format!("watching {} (", n.container_veth);
        assert!(bt.wait_stderr(&watching, LINE_WAIT), "never watched {}:\n{}", n.container_veth, bt.stderr());
    }
    let (ino1, ino2) = (one.container.inode(), two.container.inode());
    let of =
        |ino: u64| move |l: &Value| l["event"] == "refused" && l["netns"] == ino && l["target_port"] == PORT;

    // The first network: its first refusal gets a line at once; a second one (the same tuple,
    // in the fold window) is folded into a line written when the window closes, attributed then.
    let first = refused_from(&one.router);
    let line = bt.expect_line("the first network's line", LINE_WAIT, of(ino1));
    let again = refused_from(&one.router);
    // The second network, the same 4-tuple, while the first one's folded line is pending.
    let second = refused_from(&two.router);
    bt.expect_line("the second network's line", LINE_WAIT, of(ino2));
    let folded = bt.expect_line("the first network's folded line", LINE_WAIT, |l| of(ino1)(l) && *l != line);

    let lines = bt.lines();
    let pos = |want: &Value| lines.iter().position(|l| l == want).unwrap();
    let second_line = lines.iter().find(|l| of(ino2)(l)).unwrap();
    assert!(
        pos(second_line) < pos(&folded),
        "the second network's refusal came before the first one's folded line (else this test checks nothing)"
    );
    // The line without its listeners and hint (long, and not what this test is about).
    let brief = |l: &Value| {
        format!(
            "netns {} {}:{} via {} client_process {}",
            l["netns"], l["client_ip"], l["client_port"], l["via"], l["client_process"]
        )
    };
    let ours = [first, again];
    for l in lines.iter().filter(|l| of(ino1)(l)) {
        assert_eq!(l["client_ip"], CLIENT, "{}", brief(l));
        assert_eq!(l["client_port"], CLIENT_PORT, "{}", brief(l));
        assert_eq!(l["via"], "direct", "{}", brief(l));
        let pid = l["client_process"]["pid"].as_u64().unwrap_or(0) as u32;
        assert!(
            ours.contains(&pid),
            "the first network's line names its own client {ours:?}, not {second}: {}",
            brief(l)
        );
    }
    for l in lines.iter().filter(|l| of(ino2)(l)) {
        assert_eq!(l["via"], "direct", "{}", brief(l));
        assert_eq!(
            l["client_process"]["pid"],
            second,
            "the second network's line names its own client: {}",
            brief(l)
        );
    }
}
