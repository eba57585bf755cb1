//! Prometheus metrics end to end: promtool on a live scrape, a real Prometheus server counting
//! exactly, exactness under a SYN flood, bounded cardinality, and where the endpoint listens.
//! Run as root through `sudo ./x test` (one test at a time).
use std::{
    collections::BTreeSet,
    io::Write,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use bindtrace_tests::{
    Bindtrace, Hook, Listener, Topology,
    bindtrace::binary,
    connect,
    metrics::{METRICS_ADDR, Prometheus, Scrape, http_get, scrape, syn_flood},
    root_or_skip, snmp_out_rsts,
};

const REFUSED: &str = "bindtrace_refused_connections_total";
const LOST: &str = "bindtrace_events_lost_total";
const FOLDED: &str = "bindtrace_cardinality_folded_total";
const LOOPBACK: &str = "bindtrace_loopback_listeners";

macro_rules! root_test {
    ($($name:ident),* $(,)?) => {
        $( #[test] fn $name() { if root_or_skip() { scenarios::$name() } } )*
    };
}

root_test!(
    live_scrape_passes_promtool,
    prometheus_counts_exactly_n,
    flood_is_counted_exactly_tcp_send_reset,
    flood_is_counted_exactly_kfree_skb,
    cardinality_is_capped_and_exact,
    endpoint_is_loopback_only_by_default,
    busy_port_is_named,
    server_survives_idle_connections_and_slowloris,
);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// Scrapes until `done` holds (bindtrace reads the kernel counters every second and when a
/// fold window closes) and returns that scrape; panics with the last one after `timeout`.
fn scrape_until(ns: &bindtrace_tests::Netns, timeout: Duration, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + timeout;
    loop {
        let s = scrape(ns);
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "condition not met within {timeout:?}; last scrape:\n{}", s.text);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Scrapes until bindtrace's total reaches `want` and returns that scrape and how long it took.
/// bindtrace writes one line per key before it counts it (each line reads the namespace's
/// listeners), so after a burst over many keys the total converges at the pace of the lines:
/// this waits as long as the total keeps growing, and fails when it stalls for 10 s, passes
/// `want`, or takes more than 2 minutes.
fn wait_for_total(ns: &bindtrace_tests::Netns, want: u64) -> (Scrape, Duration) {
    let start = Instant::now();
    let (mut last, mut progress) = (0, Instant::now());
    loop {
        let s = scrape(ns);
        let total = s.sum(REFUSED, &[]);
        assert!(total <= want, "bindtrace counted {total}, more than the {want} refusals:\n{}", s.text);
        if total == want {
            return (s, start.elapsed());
        }
        if total > last {
            (last, progress) = (total, Instant::now());
        }
        assert!(
            progress.elapsed() < Duration::from_secs(10) && start.elapsed() < Duration::from_secs(120),
            "bindtrace's total is stuck at {total} of {want} after {:?}:\n{}",
            start.elapsed(),
            s.text
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Refused connects from the host namespace, checked one by one.
fn refuse(topo: &Topology, addr: IpAddr, port: u16, times: usize) {
    for _ in 0..times {
        let err = connect(&topo.host, addr, port).expect_err("connection should be refused");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}

mod scenarios {
    use super::*;

    pub fn live_scrape_passes_promtool() {
        let mut topo = Topology::new();
        let c = topo.container();
        let _server = Listener::start(&c.ns.name, "127.0.0.1", 8000, &[]);
        let bt = Bindtrace::start(&topo.host, Hook::TcpSendReset, &[]);
        refuse(&topo, c.ipv4, 8000, 3);
        refuse(&topo, c.ipv4, 8001, 1);
        let container = format!("netns:{}", c.ns.inode());
        scrape_until(&topo.host, Duration::from_secs(10), |s| {
            s.sum(REFUSED, &[("container", &container)]) == 4
        });
        std::thread::sleep(Duration::from_millis(200));

        // What a user does: curl the endpoint, pipe it into promtool.
        let curl = Command::new("ip")
            .args(["netns", "exec", &topo.host.name, "curl", "-sS", "--max-time", "5"])
            .arg(format!("http://{METRICS_ADDR}/metrics"))
            .output()
            .expect("run curl");
        assert!(curl.status.success(), "curl: {}", String::from_utf8_lossy(&curl.stderr));
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool (Debian package `prometheus`)");
        promtool.stdin.take().unwrap().write_all(&curl.stdout).unwrap();
        let checked = promtool.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&curl.stdout);
        assert!(
            checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
            "promtool check metrics: {}{}\non:\n{text}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );

        let s = Scrape::parse(&text);
        let own = |port: &str, verdict: &str| {
            s.sum(REFUSED, &[("container", &container), ("container_port", port), ("verdict", verdict)])
        };
        assert_eq!(own("8000", "loopback_only"), 3, "{text}");
        assert_eq!(own("8001", "no_listener"), 1, "{text}");
        let line = s.series(REFUSED, &[("container_port", "8000")])[0];
        assert_eq!(line.labels["bridge"], "docker0");
        assert_eq!(line.labels["proto"], "tcp");
        assert!(!line.labels.contains_key("host_port"), "unknown host ports are absent, not empty");
        let listeners = s.series(LOOPBACK, &[("container", &container)]);
        assert_eq!(listeners.len(), 1, "{text}");
        assert_eq!(
            (listeners[0].labels["address"].as_str(), listeners[0].labels["port"].as_str()),
            ("127.0.0.1", "8000")
        );
        let build = &s.series("bindtrace_build_info", &[])[0].labels;
        assert_eq!(build["hook"], "tcp-send-reset");
        assert_eq!(build["hook_reason"], "chosen with --hook");
        assert_eq!(build["kernel"], std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim());
        for stage in ["kernel_ringbuf", "fold_window", "counts_map_full", "kernel_recursion"] {
            assert_eq!(s.series(LOST, &[("stage", stage)]).len(), 1, "{stage} present from the start");
        }
        assert!(s.sum("process_resident_memory_bytes", &[]) > 0);
        assert!(s.sum("process_open_fds", &[]) > 0);

        // Every family is documented in the metrics reference.
        let reference = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
        let families: BTreeSet<String> = s.families().into_iter().collect();
        for f in &families {
            assert!(reference.contains(&format!("`{f}")), "docs/metrics.md does not document {f}");
        }
        // The dashboard and the alerts only use what is exported.
        let known = |name: &str| families.contains(name) || ["up", "scrape_duration_seconds"].contains(&name);
        for file in ["deploy/grafana/bindtrace.json", "deploy/prometheus/alerts.yml"] {
            let body = std::fs::read_to_string(repo().join(file)).unwrap();
            for word in body.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if (word.starts_with("bindtrace_") || word.starts_with("process_")) && word.len() > 10 {
                    assert!(known(word), "{file} uses {word}, which bindtrace does not export");
                }
            }
        }

        // OpenMetrics for scrapers that ask for it.
        let addr: SocketAddr = METRICS_ADDR.parse().unwrap();
        let om = topo
            .host
            .run(|| http_get(addr, "/metrics", Some("application/openmetrics-text;version=1.0.0")))
            .unwrap();
        assert_eq!(om.content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8");
        assert!(
            om.body.ends_with("# EOF\n") && om.body.contains("# TYPE bindtrace_build info"),
            "{}",
            om.body
        );
        let plain = topo.host.run(|| http_get(addr, "/metrics", None)).unwrap();
        assert_eq!(plain.content_type, "text/plain; version=0.0.4; charset=utf-8");
        assert_eq!(topo.host.run(|| http_get(addr, "/other", None)).unwrap().status, 404);

        // Scrape load: 8 clients at once, 25 scrapes each, all answered, and quickly.
        let mut times: Vec<Duration> = std::thread::scope(|s| {
            let clients: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        topo.host.run(|| {
                            (0..25)
                                .map(|_| {
                                    let r = http_get(addr, "/metrics", None).expect("scrape under load");
                                    assert_eq!(r.status, 200);
                                    assert!(r.body.contains("bindtrace_build_info"));
                                    r.elapsed
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                })
                .collect();
            clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
        });
        times.sort();
        eprintln!(
            "scrape load: {} scrapes by 8 clients at once: p50 {:?}, max {:?}",
            times.len(),
            times[times.len() / 2],
            times.last().unwrap()
        );
        assert!(*times.last().unwrap() < Duration::from_secs(2), "{times:?}");
        drop(bt);
    }

    pub fn prometheus_counts_exactly_n() {
        const N: u64 = 23;
        let mut topo = Topology::new();
        let c = topo.container();
        let server = Listener::start(&c.ns.name, "127.0.0.1", 8000, &[]);
        let bt = Bindtrace::start(&topo.host, Hook::KfreeSkb, &[]);
        let prom = Prometheus::start(&topo.host, &[repo().join("deploy/prometheus/alerts.yml")]);
        let container = format!("netns:{}", c.ns.inode());
        let series = format!(
            "{REFUSED}{{job=\"bindtrace\",container=\"{container}\",container_port=\"8000\",verdict=\"loopback_only\"}}"
        );
        // Bursts across fold windows: the first refusal of each burst gets a line at once, the
        // rest are folded.
        let mut made = 0;
        for burst in [1u64, 7, 5, 10] {
            refuse(&topo, c.ipv4, 8000, burst as usize);
            made += burst;
            std::thread::sleep(Duration::from_millis(700));
        }
        assert_eq!(made, N);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            let v = prom.value(&series);
            seen.push(v);
            if v == Some(N as f64) {
                break;
            }
            assert!(v.is_none_or(|v| v < N as f64), "overshoot: {seen:?}");
            assert!(Instant::now() < deadline, "Prometheus never saw {N}: {seen:?}\n{}", prom.stderr());
            std::thread::sleep(Duration::from_millis(250));
        }
        // It stays exact (two more scrapes), and equals the total over all series.
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(prom.value(&series), Some(N as f64));
        assert_eq!(prom.value(&format!("sum({REFUSED}{{job=\"bindtrace\"}})")), Some(N as f64));
        assert_eq!(
            prom.value(&format!(
                "{LOOPBACK}{{container=\"{container}\",address=\"127.0.0.1\",port=\"8000\"}}"
            )),
            Some(1.0)
        );
        assert_eq!(prom.value("up{job=\"bindtrace\"}"), Some(1.0));
        let max_scrape = prom.value("max_over_time(scrape_duration_seconds{job=\"bindtrace\"}[1m])").unwrap();
        let samples = prom.value("count_over_time(scrape_duration_seconds{job=\"bindtrace\"}[1m])").unwrap();
        eprintln!("prometheus: {samples} scrapes of bindtrace, longest {:.2} ms", max_scrape * 1000.0);

        // Every query of the dashboard runs on a real Prometheus.
        let dashboard: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(repo().join("deploy/grafana/bindtrace.json")).unwrap(),
        )
        .unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "5m")
                    .replace("$instance", ".*");
                prom.query(&expr).unwrap_or_else(|e| panic!("panel {}: {e}", panel["title"]));
            }
        }

        // The service stops: the loopback-only listener leaves the gauge at the next recheck.
        drop(server);
        scrape_until(&topo.host, Duration::from_secs(12), |s| {
            s.series(LOOPBACK, &[("container", &container)]).is_empty()
        });
        drop(prom);
        drop(bt);
    }

    fn flood_is_counted_exactly(hook: Hook) {
        const SYNS: u64 = 200_000;
        let mut topo = Topology::new();
        let c = topo.container();
        let _server = Listener::start(&c.ns.name, "127.0.0.1", 20000, &[]);
        // A 4 KiB ring buffer (56 samples) and 200 ports: far more first-of-key samples than fit.
        let mut bt = Bindtrace::start(&topo.host, hook, &["--ringbuf-size", "4096"]);
        let ports: Vec<u16> = (20000..20200).collect();
        let before = snmp_out_rsts(&c.ns);

        // Scrape every 50 ms while the flood runs, timing each answer.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let addr: SocketAddr = METRICS_ADDR.parse().unwrap();
        let (flood, mut latencies) = std::thread::scope(|s| {
            let scraper = s.spawn(|| {
                topo.host.run(|| {
                    let mut times = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = http_get(addr, "/metrics", None).expect("scrape during the flood");
                        assert_eq!(r.status, 200);
                        times.push(r.elapsed);
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    times
                })
            });
            let flood = syn_flood(&topo.host, c.ipv4, &ports, SYNS, 4, Duration::from_secs(60));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            (flood, scraper.join().unwrap())
        });
        // The resets the container sent are the truth (the generator's own count can differ).
        std::thread::sleep(Duration::from_millis(300));
        let rsts = snmp_out_rsts(&c.ns) - before;
        let (s, converged) = wait_for_total(&topo.host, rsts);
        let total = s.sum(REFUSED, &[]);
        latencies.sort();
        let pct = |p: usize| latencies[(latencies.len() - 1) * p / 100];
        eprintln!(
            "flood ({}): {} SYNs in {:.2} s ({:.0}/s); container OutRsts +{rsts}; bindtrace total {total}; \
             reached {converged:.1?} after the flood; lost kernel_ringbuf {} fold_window {} \
             counts_map_full {}; {} scrapes during the flood: p50 {:?} p99 {:?} max {:?}",
            hook.arg(),
            flood.sent,
            flood.elapsed.as_secs_f64(),
            flood.sent as f64 / flood.elapsed.as_secs_f64(),
            s.sum(LOST, &[("stage", "kernel_ringbuf")]),
            s.sum(LOST, &[("stage", "fold_window")]),
            s.sum(LOST, &[("stage", "counts_map_full")]),
            latencies.len(),
            pct(50),
            pct(99),
            latencies.last().unwrap(),
        );
        assert!(flood.sent >= SYNS * 9 / 10, "the flood sent {} of {SYNS}", flood.sent);
        assert!(flood.elapsed < Duration::from_secs(60));
        assert_eq!(total, rsts, "bindtrace's total equals the resets the container sent");

        // Lines and metrics agree: lines + refusals folded into them + those without a key = total;
        // the samples the ring buffer dropped are counted and reported as `lost` lines.
        std::thread::sleep(Duration::from_millis(1500));
        let s = scrape(&topo.host);
        assert_eq!(s.sum(REFUSED, &[]), rsts, "no more after the flood");
        assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
        let lines = bt.lines();
        let refused: Vec<_> = lines.iter().filter(|l| l["event"] == "refused").collect();
        let counted: u64 = refused.iter().map(|l| l["count"].as_u64().unwrap()).sum();
        let lost_lines: u64 =
            lines.iter().filter(|l| l["event"] == "lost").map(|l| l["count"].as_u64().unwrap()).sum();
        assert_eq!(counted, rsts, "the lines add up too");
        assert_eq!(
            refused.len() as u64
                + s.sum(LOST, &[("stage", "fold_window")])
                + s.sum(LOST, &[("stage", "counts_map_full")]),
            total
        );
        let ringbuf = s.sum(LOST, &[("stage", "kernel_ringbuf")]);
        assert!(ringbuf > 0, "a 4 KiB ring buffer drops samples in such a flood");
        assert_eq!(ringbuf, lost_lines, "the metric and the `lost` lines say the same");
        assert!(*latencies.last().unwrap() < Duration::from_secs(1), "scrapes stay fast: {latencies:?}");
    }

    pub fn flood_is_counted_exactly_tcp_send_reset() {
        flood_is_counted_exactly(Hook::TcpSendReset)
    }

    pub fn flood_is_counted_exactly_kfree_skb() {
        flood_is_counted_exactly(Hook::KfreeSkb)
    }

    pub fn cardinality_is_capped_and_exact() {
        const CAP: usize = 12;
        const PORTS_CAP: usize = 4;
        let mut topo = Topology::new();
        // One container refused on more ports than the cap plus 1 000, then more containers than the cap.
        let a = topo.container();
        let others: Vec<_> = (0..CAP + 3).map(|_| topo.container()).collect();
        let bt = Bindtrace::start(
            &topo.host,
            Hook::KfreeSkb,
            &["--metrics-max-series", &CAP.to_string(), "--metrics-max-ports", &PORTS_CAP.to_string()],
        );
        let before: Vec<u64> = std::iter::once(&a).chain(&others).map(|c| snmp_out_rsts(&c.ns)).collect();
        let ports: Vec<u16> = (30000..30000 + CAP as u16 + 1000 + 1).collect();
        let flood = syn_flood(&topo.host, a.ipv4, &ports, ports.len() as u64 * 2, 2, Duration::from_secs(30));
        for c in &others {
            refuse(&topo, c.ipv4, 80, 2);
        }
        std::thread::sleep(Duration::from_millis(300));
        let rsts: u64 =
            std::iter::once(&a).chain(&others).zip(&before).map(|(c, b)| snmp_out_rsts(&c.ns) - b).sum();
        let (s, converged) = wait_for_total(&topo.host, rsts);
        let series = s.series(REFUSED, &[]);
        eprintln!(
            "cardinality: {} SYNs to {} ports of one container, {} more containers: {rsts} refusals \
             (total reached {converged:.1?} after the last one), {} series",
            flood.sent,
            ports.len(),
            others.len(),
            series.len()
        );
        assert_eq!(s.sum(REFUSED, &[]), rsts, "the sum is exact");
        assert!(series.len() <= CAP + 1, "{} series:\n{}", series.len(), s.text);
        let container_a = format!("netns:{}", a.ns.inode());
        let a_own: Vec<_> = s
            .series(REFUSED, &[("container", &container_a)])
            .into_iter()
            .filter(|x| x.labels["container_port"] != "other")
            .collect();
        assert_eq!(a_own.len(), PORTS_CAP, "{}", s.text);
        let a_other = s.sum(REFUSED, &[("container", &container_a), ("container_port", "other")]);
        assert!(a_other > 1000, "{}", s.text);
        assert_eq!(s.sum(FOLDED, &[("cap", "container_ports")]), a_other);
        let all_other = s.sum(REFUSED, &[("container", "other")]);
        assert!(all_other > 0, "containers beyond the cap fold into `other`:\n{}", s.text);
        assert_eq!(
            s.sum(FOLDED, &[("cap", "series")]) + s.sum(LOST, &[("stage", "counts_map_full")]),
            all_other
        );
        drop(bt);
    }

    pub fn endpoint_is_loopback_only_by_default() {
        let mut topo = Topology::new();
        let c = topo.container();
        let gateway = topo.gateway_v4();
        let port = 19462;
        {
            let _bt = Bindtrace::start(&topo.host, Hook::KfreeSkb, &[]);
            let local: SocketAddr = METRICS_ADDR.parse().unwrap();
            assert_eq!(topo.host.run(|| http_get(local, "/metrics", None)).unwrap().status, 200);
            let err = connect(&c.ns, gateway, port)
                .expect_err("the default must not be reachable from a container");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        // The same check sees it when it is opened on purpose.
        {
            let _bt = Bindtrace::start(&topo.host, Hook::KfreeSkb, &["--metrics-addr", "0.0.0.0:19463"]);
            let open: SocketAddr = SocketAddr::new(gateway, 19463);
            assert_eq!(c.ns.run(|| http_get(open, "/metrics", None)).unwrap().status, 200);
        }
        // --no-metrics: nothing listens.
        let _bt = Bindtrace::start(&topo.host, Hook::KfreeSkb, &["--no-metrics"]);
        let err =
            connect(&topo.host, "127.0.0.1".parse().unwrap(), port).expect_err("--no-metrics serves nothing");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    pub fn busy_port_is_named() {
        let topo = Topology::new();
        let _squatter = Listener::start(&topo.host.name, "127.0.0.1", 19462, &[]);
        let mut bt = Bindtrace::spawn(&topo.host, Hook::KfreeSkb, &[]);
        let (code, stderr) = bt.wait_exit(Duration::from_secs(20));
        assert_eq!(code, Some(1), "{stderr}");
        for says in ["127.0.0.1:19462", "port 19462 is already in use", "--metrics-addr", "--no-metrics"] {
            assert!(stderr.contains(says), "missing {says:?} in: {stderr}");
        }
        let mut bt = Bindtrace::spawn(&topo.host, Hook::KfreeSkb, &["--metrics-addr", "192.0.2.1:19462"]);
        let (code, stderr) = bt.wait_exit(Duration::from_secs(20));
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("192.0.2.1 is not an address of this host"), "{stderr}");
        // --no-metrics runs regardless.
        let _bt = Bindtrace::start(&topo.host, Hook::KfreeSkb, &["--no-metrics"]);
    }

    /// 1 000 idle connections and a slowloris client (request headers a byte per second): a
    /// scrape by the test, curl and a real Prometheus still succeed, the slow client is closed
    /// by the header timeout (5 s) or the cap, and bindtrace's descriptors stay within the
    /// connection cap (64) plus a margin of 8 over what it held before.
    pub fn server_survives_idle_connections_and_slowloris() {
        use std::{
            io::Read,
            net::TcpStream,
            sync::atomic::{AtomicBool, AtomicUsize, Ordering},
        };
        const IDLE: usize = 1000;
        const CAP: usize = 64;
        const MARGIN: usize = 8;
        raise_nofile();
        let topo = Topology::new();
        let bt = Bindtrace::start(&topo.host, Hook::KfreeSkb, &[]);
        let fds = || std::fs::read_dir(format!("/proc/{}/fd", bt.pid())).unwrap().count();
        let baseline = fds();
        let prom = Prometheus::start(&topo.host, &[]);
        let up = "up{job=\"bindtrace\"}";
        let deadline = Instant::now() + Duration::from_secs(20);
        while prom.value(up) != Some(1.0) {
            assert!(Instant::now() < deadline, "Prometheus never scraped bindtrace:\n{}", prom.stderr());
            std::thread::sleep(Duration::from_millis(200));
        }
        let addr: SocketAddr = METRICS_ADDR.parse().unwrap();
        let done = AtomicBool::new(false);
        let max_fds = AtomicUsize::new(0);
        let (idle, slow_closed_after, scrapes) = std::thread::scope(|s| {
            // bindtrace's descriptors, sampled every 20 ms while the clients run.
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    max_fds.fetch_max(fds(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            let idle = topo.host.run(|| {
                (0..IDLE)
                    .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
                    .collect::<Vec<_>>()
            });
            let slow = s.spawn(|| {
                topo.host.run(|| {
                    let start = Instant::now();
                    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
                    c.set_read_timeout(Some(Duration::from_millis(900))).unwrap();
                    for b in
                        b"GET /metrics HTTP/1.1\r\nHost: bindtrace\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa".iter()
                    {
                        if c.write_all(&[*b]).is_err() {
                            break;
                        }
                        let mut buf = [0u8; 512];
                        // EOF (or a reset, or a 408) means the server let go.
                        match c.read(&mut buf) {
                            Ok(_) => break,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => break,
                        }
                        assert!(start.elapsed() < Duration::from_secs(30), "slowloris never closed");
                    }
                    start.elapsed()
                })
            });
            // Scrapes during the slowloris: by the test's client and by curl.
            std::thread::sleep(Duration::from_millis(1500));
            let mut scrapes = Vec::new();
            for _ in 0..5 {
                let r = topo.host.run(|| http_get(addr, "/metrics", None)).expect("scrape under the flood");
                assert_eq!(r.status, 200);
                assert!(r.body.contains("bindtrace_build_info"));
                scrapes.push(r.elapsed);
                std::thread::sleep(Duration::from_millis(200));
            }
            let curl = Command::new("ip")
                .args(["netns", "exec", &topo.host.name, "curl", "-sS", "--max-time", "5"])
                .arg(format!("http://{METRICS_ADDR}/metrics"))
                .output()
                .expect("run curl");
            assert!(curl.status.success(), "curl: {}", String::from_utf8_lossy(&curl.stderr));
            // Prometheus scrapes after the flood began, and they succeed.
            let flooded_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let at = prom.value(&format!("timestamp({up})")).unwrap_or(0.0);
                if at > flooded_at.as_secs_f64() && prom.value(up) == Some(1.0) {
                    break;
                }
                assert!(Instant::now() < deadline, "no Prometheus scrape succeeded under the flood");
                std::thread::sleep(Duration::from_millis(200));
            }
            let slow = slow.join().unwrap();
            done.store(true, Ordering::Relaxed);
            (idle, slow, scrapes)
        });
        let max_fds = max_fds.load(Ordering::Relaxed);
        eprintln!(
            "{} idle connections + slowloris: bindtrace fds {baseline} before, at most {max_fds} during \
             (cap {CAP}, margin {MARGIN}); slowloris closed after {slow_closed_after:?}; scrapes took {scrapes:?}",
            idle.len()
        );
        assert!(idle.len() >= IDLE * 9 / 10, "only {} of {IDLE} idle connections opened", idle.len());
        assert!(max_fds <= baseline + CAP + MARGIN, "bindtrace held {max_fds} fds, {baseline} before");
        assert!(slow_closed_after < Duration::from_secs(7), "slowloris held on for {slow_closed_after:?}");
        assert!(scrapes.iter().all(|t| *t < Duration::from_secs(1)), "{scrapes:?}");
        drop(idle);
        drop(bt);
    }

    /// The test holds 1 000 sockets at once: the soft descriptor limit up to the hard one.
    fn raise_nofile() {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: plain syscalls on a valid struct.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
            lim.rlim_cur = lim.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

#[test]
fn bad_metrics_addr_is_explained() {
    for (bad, says) in [
        ("localhost:19462", "not an IP address"),
        ("19462", "is not ADDR:PORT"),
        ("127.0.0.1:0", "port 0"),
        ("127.0.0.1:70000", "not a port number"),
    ] {
        let out = Command::new(binary()).args(["--metrics-addr", bad]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--metrics-addr") && stderr.contains(says), "{bad}: {stderr}");
    }
}
