//! Count keys that come and go: a port scan must not end bindtrace's usefulness, container churn
//! must not fill its maps, and every refusal stays counted. Real kernel, real namespaces.
use std::time::Duration;

use bindtrace_tests::{
    Bindtrace, Hook, Listener, Topology, connect, metrics::scrape, metrics::syn_flood, root_or_skip,
    snmp_out_rsts,
};
use serde_json::Value;

/// A small map, so that a scan four times its size runs in a second or two (the same ratio as
/// a full 65 535-port scan against the default 16 384 keys).
const COUNTS_SIZE: u64 = 1024;
const SCANNED_PORTS: u16 = 4096;
/// Namespaces that come, get refused once and go, after the scan.
const CHURN: usize = 24;
const LINE_WAIT: Duration = Duration::from_secs(30);

macro_rules! for_each_hook {
    ($($name:ident),* $(,)?) => {
        mod tcp_send_reset { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::TcpSendReset) } } )* }
        mod kfree_skb { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::KfreeSkb) } } )* }
        mod tc { $( #[test] fn $name() { if super::root_or_skip() { super::$name(super::Hook::Tc) } } )* }
    };
}

for_each_hook!(
    a_port_scan_leaves_room_for_everyone_and_every_count_adds_up,
    flips_under_a_flood_on_both_cpus_lose_no_count,
);

fn known_count(l: &Value) -> u64 {
    l["count"].as_u64().unwrap_or(0)
}

fn a_port_scan_leaves_room_for_everyone_and_every_count_adds_up(hook: Hook) {
    let mut topo = Topology::new();
    let scanned = topo.container();
    let size = COUNTS_SIZE.to_string();
    let mut bt = Bindtrace::start(
        &topo.host,
        hook,
        &["--counts-size", &size, "--idle-key-after", "2s", "--fold-window", "200ms"],
    );
    let rsts_before = snmp_out_rsts(&scanned.ns);

    // The scan: one SYN to each of 4 096 ports where nothing listens.
    let ports: Vec<u16> = (1..=SCANNED_PORTS).collect();
    let flood = syn_flood(&topo.host, scanned.ipv4, &ports, ports.len() as u64, 2, Duration::from_secs(60));
    assert_eq!(flood.sent, SCANNED_PORTS as u64, "every SYN of the scan went out");

    // Then namespaces come, are refused once on their loopback-bound port, and go: each gets
    // its line, scan or no scan.
    let mut churn_refusals = 0u64;
    for i in 0..CHURN {
        let c = topo.container();
        // Refusals count from the moment bindtrace watches the namespace's interface.
        let watching = format!("watching {} (", c.host_veth);
        assert!(bt.wait_stderr(&watching, LINE_WAIT), "never watched {}:\n{}", c.host_veth, bt.stderr());
        let _server = Listener::start(&c.ns.name, "127.0.0.1", 8080, &[]);
        let err = connect(&topo.host, c.ipv4, 8080).expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        churn_refusals += 1;
        let inode = c.ns.inode();
        let line = bt.expect_line(&format!("the line of namespace {i}"), LINE_WAIT, |l| {
            l["event"] == "refused" && l["netns"] == inode && l["target_port"] == 8080
        });
        assert_eq!(line["verdict"], "loopback_only", "{line}");
        // `c` and its server go here: the port leaves scope and its keys leave the kernel.
    }

    // Idle keys leave the kernel at the next flips, and userspace forgets them once their
    // lines are written: both gauges come back down to what is left (the scanned container's
    // port is still in scope, but idle).
    let settled = wait_for_gauges(&topo, |kernel, userspace| kernel == 0 && userspace == 0);
    assert!(settled.is_some(), "count keys did not return to zero:\n{}", bt.stderr());

    let scan_rsts = snmp_out_rsts(&scanned.ns) - rsts_before;
    assert_eq!(scan_rsts, SCANNED_PORTS as u64, "the scanned container refused every SYN");
    assert_eq!(bt.stop(), Some(0), "clean exit:\n{}", bt.stderr());
    let stderr = bt.stderr();
    let lines = bt.lines();
    let refused: Vec<&Value> = lines.iter().filter(|l| l["event"] == "refused").collect();
    let keyed: u64 = refused.iter().map(|l| known_count(l)).sum();
    let unknown = refused.iter().filter(|l| l["count"].is_null()).count();
    let overflow = summary_overflow(&stderr);
    let made = scan_rsts + churn_refusals;
    assert_eq!(keyed + overflow, made, "counted lines plus overflow are every refusal made:\n{stderr}");
    assert!(
        stderr.contains(&format!("{made} refusals counted since start")),
        "the exit summary counts every refusal, overflow included:\n{stderr}"
    );
    assert!(overflow > 0, "a scan four times the map's size overflows it while the map is full");
    assert!(unknown > 0, "refusals that overflowed got lines of unknown count");
    for l in refused.iter().filter(|l| l["count"].is_null()) {
        assert_eq!(l["count_unknown"]["reason"], "map_full", "{l}");
        assert!(l["count_unknown"]["overflowed"].as_u64().unwrap() > 0, "{l}");
    }
    // Quiet: no warning per refusal, no warning per second.
    let warnings = stderr.lines().filter(|l| l.contains("WARN")).count();
    assert!(warnings <= 3, "{warnings} warnings:\n{stderr}");
}

/// The flip protocol under load: refusals on both CPUs at the highest rate this machine makes
/// while the maps flip every quarter second. Every refusal the kernel made is in a line's count.
fn flips_under_a_flood_on_both_cpus_lose_no_count(hook: Hook) {
    let mut topo = Topology::new();
    let flooded = topo.container();
    let mut bt =
        Bindtrace::start(&topo.host, hook, &["-v", "--idle-key-after", "250ms", "--fold-window", "200ms"]);
    let rsts_before = snmp_out_rsts(&flooded.ns);
    let ports: Vec<u16> = (20_000..20_064).collect();
    // Flood in rounds until the maps have flipped twice while the flood ran: how many rounds
    // that takes depends on how fast this machine refuses, so it is a condition, not a count.
    // Bounded: at most 40 rounds of 20 000 SYNs.
    let flips_so_far =
        |bt: &Bindtrace| bt.stderr().lines().filter(|l| l.contains("count maps flipped")).count();
    let flips_before = flips_so_far(&bt);
    let mut sent = 0;
    for _ in 0..40 {
        sent += syn_flood(&topo.host, flooded.ipv4, &ports, 20_000, 2, Duration::from_secs(20)).sent;
        if flips_so_far(&bt) >= flips_before + 2 {
            break;
        }
    }
    let made = snmp_out_rsts(&flooded.ns) - rsts_before;
    assert!(made >= sent / 2, "the namespace refused the flood ({made} of {sent} SYNs)");
    assert_eq!(bt.stop(), Some(0), "clean exit:\n{}", bt.stderr());
    let stderr = bt.stderr();
    let flips = stderr.lines().filter(|l| l.contains("count maps flipped")).count();
    assert!(flips >= flips_before + 2, "the maps flipped during the flood ({flips} flips):\n{stderr}");
    let counted: u64 = bt.lines().iter().filter(|l| l["event"] == "refused").map(known_count).sum();
    assert_eq!(counted, made, "every refusal of the flood is in a line's count ({flips} flips)");
    assert_eq!(summary_overflow(&stderr), 0, "the default map never filled");
    assert!(stderr.contains(&format!("{made} refusals counted since start")), "{stderr}");
}

/// Polls the count-key gauges until `done(kernel, userspace)`; None after a minute. A wait on
/// a condition, not a timing assertion: the flips come every `--idle-key-after`.
fn wait_for_gauges(topo: &Topology, done: impl Fn(u64, u64) -> bool) -> Option<(u64, u64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let s = scrape(&topo.host);
        let kernel = s.sum("bindtrace_count_keys", &[("held", "kernel")]);
        let userspace = s.sum("bindtrace_count_keys", &[("held", "userspace")]);
        if done(kernel, userspace) {
            return Some((kernel, userspace));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// The overflow figure of the exit summary ("..., N found the count map full ..."), 0 if absent.
fn summary_overflow(stderr: &str) -> u64 {
    let Some(at) = stderr.find(" found the count map full") else { return 0 };
    stderr[..at].rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Found by the soak: a namespace deleted with `ip netns del` while its veth is on the bridge
/// lives only as long as someone holds it. bindtrace held it (so its veth, so its port, so the
/// namespace stayed: forever); now it lets go, the port leaves scope and the namespace (with its
/// veth) is freed. No refusal is needed for that; one is made anyway, and it keeps its line.
#[test]
fn a_deleted_namespace_is_let_go_and_its_port_leaves_scope() {
    if !root_or_skip() {
        return;
    }
    let mut topo = Topology::new();
    let c = topo.container();
    let bt = Bindtrace::start(&topo.host, Hook::TcpSendReset, &["--fold-window", "200ms"]);
    assert!(bt.wait_stderr(&format!("watching {} (", c.host_veth), LINE_WAIT), "{}", bt.stderr());
    let err = connect(&topo.host, c.ipv4, 8080).expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let inode = c.ns.inode();
    bt.expect_line("the line of the namespace", LINE_WAIT, |l| {
        l["event"] == "refused" && l["netns"] == inode
    });
    let veth = c.host_veth.clone();
    drop(c); // `ip netns del`: only bindtrace could keep it alive now
    let left = format!("port {veth} left scope");
    assert!(bt.wait_stderr(&left, Duration::from_secs(60)), "the port never left scope:\n{}", bt.stderr());
    // Freed: its veth pair went with it (teardown is deferred, so this is awaited).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exists = || {
        let out =
            std::process::Command::new("ip").args(["-n", &topo.host.name, "link", "show", &veth]).output();
        out.expect("run ip").status.success()
    };
    while exists() {
        assert!(std::time::Instant::now() < deadline, "{veth} still exists: the namespace was not freed");
        std::thread::sleep(Duration::from_millis(100));
    }
}
