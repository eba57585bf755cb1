//! The kernel matrix's scenario runner: the core scenarios with every hook this kernel supports,
//! and the clear refusal of those it does not. Runs as root, natively or as the workload of a
//! qemu guest (`cargo xtask kernels`), so it needs nothing but `ip`, `tc` and the bindtrace
//! binary named by `BINDTRACE_BIN`: listeners are threads of this process, not python.
//!
//! Usage: `bindtrace-matrix [--expect-hooks HOOK,HOOK...]`. With `--expect-hooks`, the set of
//! hooks bindtrace accepts on this kernel must be exactly that set. Prints one `@@` line per check
//! (the xtask reads them from the guest's console) and exits 1 if any check failed.
use std::{
    io::Read as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    panic::{AssertUnwindSafe, catch_unwind},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use bindtrace_tests::{
    Bindtrace, Container, Hook, NativeListener, Netns, Topology,
    bindtrace::binary,
    connect,
    native::{ingress_programs, programs_held_by, wait_unloaded},
};
use serde_json::Value;

const ALL: [Hook; 3] = [Hook::TcpSendReset, Hook::KfreeSkb, Hook::Tc];
/// Generous: under qemu's software emulation everything is 10-50 times slower.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_millis(1500);

/// The message bindtrace must stop with when a hook is missing from this kernel.
fn unsupported_message(hook: Hook) -> &'static str {
    match hook {
        Hook::TcpSendReset => "tcp:tcp_send_reset has no reset reason",
        Hook::KfreeSkb => "skb:kfree_skb carries no drop reason",
        Hook::Tc => "(tc is supported everywhere)",
    }
}

struct Report {
    checks: u32,
    failed: u32,
}

impl Report {
    /// Runs `f`, printing `@@ CHECK hook name PASS|FAIL`; a panic is a failure.
    fn check(&mut self, hook: &str, name: &str, f: impl FnOnce()) {
        let t0 = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(f));
        let secs = t0.elapsed().as_secs_f64();
        self.checks += 1;
        match result {
            Ok(()) => println!("@@ CHECK {hook} {name:?} PASS {secs:.2}s"),
            Err(payload) => {
                self.failed += 1;
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let first = msg.lines().next().unwrap_or("");
                println!("@@ CHECK {hook} {name:?} FAIL {secs:.2}s: {first}");
            }
        }
    }
}

fn refused(from: &Netns, addr: IpAddr, port: u16) {
    let err = connect(from, addr, port).expect_err("the connection should be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "to {addr}:{port}");
}

fn refused_lines(bt: &Bindtrace, port: u16) -> Vec<Value> {
    bt.lines().into_iter().filter(|l| l["event"] == "refused" && l["target_port"] == port).collect()
}

/// Starts bindtrace with `hook`: Ok(running) or Err(exit code, stderr) when it refuses.
fn start(host: &Netns, hook: Hook) -> Result<Bindtrace, (Option<i32>, String)> {
    let mut bt = Bindtrace::spawn(host, hook, &[]);
    if bt.wait_ready(Duration::from_secs(120)) { Ok(bt) } else { Err(bt.wait_exit(Duration::from_secs(30))) }
}

/// The core scenarios against one running bindtrace.
fn scenarios(report: &mut Report, hook: Hook, topo: &mut Topology, c: &Container, mut bt: Bindtrace) {
    let h = hook.arg();
    let ours = programs_held_by(bt.pid());
    // The same addresses behind another bridge of another "host": not ours.
    let mut other = Topology::new();
    let theirs = other.container();
    let _l4 = NativeListener::start(&c.ns, SocketAddr::new("127.0.0.1".parse().unwrap(), 8000));
    let _l6 = NativeListener::start(&c.ns, SocketAddr::new("::1".parse().unwrap(), 8001));
    let _healthy = NativeListener::start(&c.ns, SocketAddr::new("0.0.0.0".parse().unwrap(), 8002));
    let _theirs = NativeListener::start(&theirs.ns, SocketAddr::new("127.0.0.1".parse().unwrap(), 8000));

    report.check(h, "namespace off the bridge", || {
        assert_eq!(theirs.ipv4, c.ipv4);
        refused(&other.host, theirs.ipv4, 8000);
        std::thread::sleep(QUIET);
        assert!(refused_lines(&bt, 8000).is_empty(), "{:#?}", bt.lines());
    });
    report.check(h, "loopback listener, IPv4", || {
        refused(&topo.host, c.ipv4, 8000);
        let l = bt.expect_line("for 8000 over IPv4", EVENT_TIMEOUT, |l| {
            l["event"] == "refused" && l["target_port"] == 8000
        });
        assert_eq!(l["verdict"], "loopback_only", "{l:#}");
        assert_eq!(l["family"], "ipv4");
        assert_eq!(l["hook"], h);
        assert_eq!(l["target_ip"], c.ipv4.to_string());
        assert_eq!(l["client_ip"], topo.gateway_v4().to_string());
        assert_eq!(l["netns"], c.ns.inode());
        assert_eq!(l["bridge"], "docker0");
        assert_eq!(l["veth"], c.host_veth.as_str());
        assert_eq!(l["count"], 1);
        // No pid: bindtrace names processes of the container's namespace, and this listener's
        // process lives elsewhere (only its socket is in there). detect.rs checks the pids.
        assert_eq!(l["listeners"][0]["ip"], "127.0.0.1");
        assert_eq!(l["listeners"][0]["port"], 8000);
    });
    report.check(h, "loopback listener, IPv6", || {
        refused(&topo.host, c.ipv6, 8001);
        let l = bt.expect_line("for 8001 over IPv6", EVENT_TIMEOUT, |l| {
            l["event"] == "refused" && l["target_port"] == 8001
        });
        assert_eq!(l["verdict"], "loopback_only", "{l:#}");
        assert_eq!(l["family"], "ipv6");
        assert_eq!(l["target_ip"], c.ipv6.to_string());
        assert_eq!(l["listeners"][0]["ip"], "::1");
        assert_eq!(l["hook"], h);
    });
    report.check(h, "no listener", || {
        refused(&topo.host, c.ipv4, 8003);
        let l = bt
            .expect_line("for 8003", EVENT_TIMEOUT, |l| l["event"] == "refused" && l["target_port"] == 8003);
        assert_eq!(l["verdict"], "no_listener", "{l:#}");
        let ports: Vec<&Value> = l["listeners"].as_array().unwrap().iter().map(|x| &x["port"]).collect();
        assert!(ports.contains(&&Value::from(8000)), "names what does listen: {l:#}");
    });
    udp_scenarios(report, hook, topo, c, &bt);
    report.check(h, "healthy listener, no event", || {
        let mut s = connect(&topo.host, c.ipv4, 8002).expect("a listener on 0.0.0.0 accepts");
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.contains("200 OK"), "{reply:?}");
        std::thread::sleep(QUIET);
        assert!(refused_lines(&bt, 8002).is_empty(), "{:#?}", bt.lines());
        // And the namespace off the bridge never showed up.
        let strangers: Vec<Value> = bt
            .lines()
            .into_iter()
            .filter(|l| l["event"] == "refused" && l["netns"] != c.ns.inode())
            .collect();
        assert!(strangers.is_empty(), "{strangers:#?}");
    });
    if hook == Hook::Tc {
        report.check(h, "port that leaves is detached", || {
            let attached =
                |ns: &Netns, ifname: &str| ingress_programs(ns, ifname).iter().any(|id| ours.contains(id));
            let d = topo.container();
            wait(|| attached(&topo.host, &d.host_veth), "a new port is attached");
            topo.host.ip(&["link", "set", &d.host_veth, "nomaster"]);
            wait(|| !attached(&topo.host, &d.host_veth), "a port that left docker0 is detached");
        });
    }
    if hook == Hook::Tc {
        report.check(h, "after a SIGKILL the next start removes what was left, nothing else", || {
            // A topology of its own: the bindtrace above (a live instance too) is not in it.
            let mut own = Topology::new();
            let c = own.container();
            bindtrace_tests::tc_recovery::sigkill_recovery(&own, &c, Duration::from_secs(120));
        });
    }
    report.check(h, "clean detach", || {
        assert!(!ours.is_empty());
        assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
        assert!(bt.stderr().contains("bindtrace: detached"));
        assert_eq!(wait_unloaded(&ours), Vec::<u32>::new(), "programs left loaded");
        let left: Vec<u32> = ingress_programs(&topo.host, &c.host_veth);
        assert!(left.iter().all(|id| !ours.contains(id)), "{} still has {left:?}", c.host_veth);
    });
}

/// UDP (issue 14): a socket on 127.0.0.1 is `loopback_only`, a port without one over IPv6 is
/// `no_listener` naming it. Every hook counts UDP: both drop-reason hooks on kfree_skb (next to
/// tcp-send-reset, a second program), tc from the port unreachables, as a lower bound.
fn udp_scenarios(report: &mut Report, hook: Hook, topo: &Topology, c: &Container, bt: &Bindtrace) {
    let h = hook.arg();
    let (counted_by, at_least) = if hook == Hook::Tc { ("tc", true) } else { ("kfree-skb", false) };
    let socket = c.ns.run(|| UdpSocket::bind("127.0.0.1:8010")).expect("bind UDP 127.0.0.1:8010");
    let udp_line = |port: u16| {
        bt.expect_line(&format!("udp for {port}"), EVENT_TIMEOUT, |l| {
            l["event"] == "refused" && l["proto"] == "udp" && l["target_port"] == port
        })
    };
    report.check(h, "UDP loopback socket, IPv4", || {
        udp_refused(&topo.host, c.ipv4, 8010);
        let l = udp_line(8010);
        assert_eq!(l["verdict"], "loopback_only", "{l:#}");
        assert_eq!(l["hook"], counted_by, "{l:#}");
        assert_eq!(l["count"], 1, "{l:#}");
        assert_eq!(l.get("count_at_least").is_some(), at_least, "{l:#}");
        assert_eq!(l["listeners"][0]["ip"], "127.0.0.1");
        assert_eq!(l["listeners"][0]["port"], 8010);
    });
    report.check(h, "UDP no socket, IPv6", || {
        udp_refused(&topo.host, c.ipv6, 8011);
        let l = udp_line(8011);
        assert_eq!(l["verdict"], "no_listener", "{l:#}");
        assert_eq!(l["family"], "ipv6");
        let ports: Vec<&Value> = l["listeners"].as_array().unwrap().iter().map(|x| &x["port"]).collect();
        assert!(ports.contains(&&Value::from(8010)), "names the UDP socket bound: {l:#}");
    });
    drop(socket);
}

/// One datagram from `from` to a closed `addr:port`: the port unreachable comes back as
/// ECONNREFUSED on the connected socket.
fn udp_refused(from: &Netns, addr: IpAddr, port: u16) {
    let err = from
        .run(|| -> std::io::Result<usize> {
            let s = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            s.set_read_timeout(Some(EVENT_TIMEOUT))?;
            s.connect(SocketAddr::new(addr, port))?;
            s.send(b"bindtrace matrix")?;
            s.recv(&mut [0u8; 64])
        })
        .expect_err("the datagram should be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "to {addr}:{port}: {err}");
}

fn wait(cond: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `--hook auto`: prints its choice and the reason; the choice is the best supported hook.
fn auto(report: &mut Report, best: Option<Hook>) {
    report.check("auto", "chooses the best supported hook", || {
        let topo = Topology::new();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.host.name, &binary(), "--format", "json", "--hook", "auto", "-v"]);
        let mut bt = Bindtrace::spawn_cmd(cmd);
        assert!(bt.wait_ready(Duration::from_secs(120)), "{}", bt.stderr());
        assert_eq!(bt.stop(), Some(0));
        let stderr = bt.stderr();
        if let Some(layout) = stderr.lines().find_map(|l| l.split_once("kernel layout from BTF: ")) {
            println!("@@ LAYOUT {}", layout.1);
        }
        // Which UDP connector recorders this kernel lets attach (fexit, the refused-read
        // tracepoint, or none): said, not checked, as the hooks' own lines are.
        if let Some(udp) = stderr.lines().find(|l| {
            l.contains("UDP connectors")
                || l.contains("UDP connects")
                || l.contains("not tracking who connects")
        }) {
            println!("@@ UDP_CONNECTORS {}", udp.split_once("] ").map_or(udp, |x| x.1));
        }
        // Whether the connect tracker attached here, and its parking (said, not checked).
        for l in stderr
            .lines()
            .filter(|l| l.contains("tp_btf/tcp_receive_reset") || l.contains("connect tracker: no parking"))
        {
            println!("@@ CONNECT_TRACKER {}", l.split_once("] ").map_or(l, |x| x.1));
        }
        let best = best.expect("at least one hook is supported");
        let chose = format!("(hook {}: BTF: ", best.arg());
        let line = stderr.lines().find(|l| l.contains("(hook ")).unwrap_or("");
        println!("@@ AUTO {}", line.split_once("] ").map_or(line, |x| x.1));
        assert!(line.contains(&chose), "expected {chose:?} in {line:?}");
    });
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let expect: Option<Vec<String>> = match args.as_slice() {
        [] => None,
        [flag, list] if flag == "--expect-hooks" => Some(list.split(',').map(str::to_owned).collect()),
        _ => {
            eprintln!("usage: bindtrace-matrix [--expect-hooks HOOK,HOOK...]");
            return ExitCode::from(2);
        }
    };
    let uname = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("@@ KERNEL {}", uname.trim());
    // Where UDP verdicts come from here: the sock_diag dump, or /proc/net/udp{,6} without it.
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let udp_diag = modules.lines().any(|l| l.starts_with("udp_diag "));
    println!(
        "@@ UDP_DIAG {}",
        if udp_diag { "module loaded" } else { "no module loaded (built in, or /proc/net/udp)" }
    );
    let t0 = Instant::now();
    let mut report = Report { checks: 0, failed: 0 };
    let mut supported = Vec::new();
    for hook in ALL {
        let h = hook.arg();
        let t = Instant::now();
        let mut topo = Topology::new();
        let c = topo.container();
        match start(&topo.host, hook) {
            Ok(bt) => {
                let stderr = bt.stderr();
                let how = stderr.lines().find(|l| l.contains("(hook ")).unwrap_or("");
                println!("@@ HOOK {h} supported: {}", how.split_once("] ").map_or(how, |x| x.1));
                supported.push(hook);
                scenarios(&mut report, hook, &mut topo, &c, bt);
            }
            Err((code, stderr)) => {
                let line = stderr.lines().find(|l| l.contains("error:")).unwrap_or("").to_owned();
                println!("@@ HOOK {h} unsupported: {line}");
                report.check(h, "unsupported: exits 1 with the clear message", || {
                    assert_eq!(code, Some(1), "{stderr}");
                    assert!(stderr.contains(unsupported_message(hook)), "{stderr}");
                });
            }
        }
        println!("@@ TIME {h} {:.1}s", t.elapsed().as_secs_f64());
    }
    auto(&mut report, supported.first().copied());
    let names: Vec<&str> = supported.iter().map(|h| h.arg()).collect();
    if let Some(expect) = &expect {
        report.check("matrix", "supported hooks as expected", || {
            assert_eq!(names, expect.iter().map(String::as_str).collect::<Vec<_>>());
        });
    }
    let ok = report.failed == 0;
    println!(
        "@@ RESULT {} hooks={} checks={} failed={} time={:.1}s",
        if ok { "PASS" } else { "FAIL" },
        names.join(","),
        report.checks,
        report.failed,
        t0.elapsed().as_secs_f64()
    );
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
