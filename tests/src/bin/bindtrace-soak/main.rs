//! bindtrace-soak: bindtrace under churn for N minutes, checked for lost counts and leaks.
//!
//! bindtrace runs in the host's namespace, watching only a bridge of the soak's own and a Docker
//! network of its own (never the machine's other containers). Each round: namespaces come, get
//! refused once on a loopback-bound port and go; a container does the same; a namespace is
//! port-scanned (more ports than the count map holds); another is flooded; a client namespace
//! makes a burst of DNAT'd connections to a published port (conntrack); the Docker socket
//! (a relay in front of it) goes away while a container comes and gets refused, then comes back.
//! Every minute, once the count keys have gone idle, it prints bindtrace's RSS, descriptors,
//! threads, count keys, lines, refusals made and errors. It fails on a lost count, a refusal
//! without a line, descriptors, threads or count keys above their warm-up maximum, or RSS
//! beyond the warm-up maximum plus the margin below. Run it through `sudo ./x soak`.
mod load;
mod sample;
mod world;

use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use bindtrace_tests::{
    Bindtrace, Listener,
    docker::{DOCKER_SOCK, HostLink, Relay, free_port},
    is_root,
    proc::monotonic_ns,
};
use sample::Sample;
use world::{Bridge, Ctr, Docker, Ns};

const USAGE: &str = "usage: bindtrace-soak [--minutes N] [--warmup M]

  --minutes N  how long to run (default 60)
  --warmup M   minutes whose maxima are the steady values (default: a sixth of N, at least 1)";

/// Count keys each of the kernel's maps holds: small, so each round's scan overflows it.
const COUNTS_SIZE: u32 = 1024;
/// 1.5 times the map: every scan overflows it.
const SCANNED_PORTS: u16 = 1536;
/// Rounds are paced (the machine is shared, and a scan's lines add up): at most this many a
/// minute, a scan every second one.
const ROUNDS_PER_MINUTE: u32 = 4;
const FLOOD_SYNS: u64 = 10_000;
const DNAT_SYNS: u64 = 300;
const NAMESPACES_PER_ROUND: usize = 3;
/// How much RSS may exceed its warm-up maximum: allocator slack and buffers that grow to a
/// workload's peak once. A leak of one namespace's state per round exceeds it within the hour.
pub const RSS_MARGIN_PERCENT: u64 = 25;
const WAIT: Duration = Duration::from_secs(30);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn main() -> std::process::ExitCode {
    let mut minutes = 60u64;
    let mut warmup = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> u64 {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("bindtrace-soak: {what} needs a whole number\n{USAGE}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--minutes" => minutes = num("--minutes"),
            "--warmup" => warmup = Some(num("--warmup")),
            _ => {
                eprintln!("{USAGE}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let warmup = warmup.unwrap_or((minutes / 6).max(1));
    if minutes <= warmup {
        eprintln!(
            "bindtrace-soak: --minutes ({minutes}) must exceed --warmup ({warmup}): nothing would be checked"
        );
        return std::process::ExitCode::from(2);
    }
    if !is_root() {
        eprintln!("bindtrace-soak: needs root (eBPF, namespaces, Docker): run `sudo ./x soak`");
        return std::process::ExitCode::from(2);
    }
    // Ctrl-C and SIGTERM end the run at the next step, so every guard cleans up.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let failures = Soak::new().run(minutes, warmup);
    if interrupted() {
        eprintln!("bindtrace-soak: interrupted; everything it made is removed");
        return std::process::ExitCode::from(130);
    }
    if failures.is_empty() {
        println!("soak: ok");
        std::process::ExitCode::SUCCESS
    } else {
        for f in &failures {
            println!("soak: FAILED: {f}");
        }
        std::process::ExitCode::FAILURE
    }
}

/// Everything the soak made. Fields drop in order: bindtrace first, then what it watches.
struct Soak {
    bt: Bindtrace,
    metrics: std::net::SocketAddr,
    scanned: Ns,
    flooded: Ns,
    published: Ctr,
    published_port: u16,
    client: HostLink,
    /// Refusals made by namespaces and containers already gone (their `OutRsts` at the end).
    made_by_gone: u64,
    /// Refusals each of which must have a line (one per churned namespace or container).
    expected_lines: u64,
    /// Failures that do not end the run (bindtrace missing a Docker outage or its end).
    soft_failures: Vec<String>,
    /// Refused lines taken so far, and the sum of their counts.
    lines: u64,
    counted: u64,
    relay: Relay,
    docker: Docker,
    bridge: Bridge,
}

impl Soak {
    fn new() -> Soak {
        let mut bridge = Bridge::new();
        let docker = Docker::new();
        let relay = Relay::start(DOCKER_SOCK);
        let scanned = bridge.namespace();
        let flooded = bridge.namespace();
        let published_port = free_port();
        let published = docker.container(Some(published_port));
        let client = HostLink::new();
        let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(bindtrace_tests::bindtrace::binary());
        let (counts, addr) = (COUNTS_SIZE.to_string(), metrics.to_string());
        cmd.args(["--format", "json", "--docker-host", relay.path().to_str().unwrap()])
            .args(["--metrics-addr", &addr, "--counts-size", &counts])
            .args(["-i", &bridge.name, "-i", &docker.network.bridge()])
            .args(["--idle-key-after", "2s", "--fold-window", "200ms"])
            // The watcher's retries and events are said, so a slow return after an outage
            // shows why (the soak's failure message quotes them).
            .env("RUST_LOG", "info,bindtrace::app::scope_sync=debug,bindtrace::sources::docker::watch=debug");
        let mut bt = Bindtrace::spawn_cmd(cmd);
        assert!(bt.wait_ready(Duration::from_secs(30)), "bindtrace did not become ready:\n{}", bt.stderr());
        for veth in [&scanned.host_veth, &flooded.host_veth, &published.host_veth] {
            assert!(
                bt.wait_stderr(&format!("watching {veth} ("), WAIT),
                "never watched {veth}:\n{}",
                bt.stderr()
            );
        }
        Soak {
            bt,
            metrics,
            scanned,
            flooded,
            published,
            published_port,
            client,
            made_by_gone: 0,
            expected_lines: 0,
            soft_failures: Vec::new(),
            lines: 0,
            counted: 0,
            relay,
            docker,
            bridge,
        }
    }

    fn run(mut self, minutes: u64, warmup: u64) -> Vec<String> {
        let mut failures = Vec::new();
        let mut samples: Vec<Sample> = Vec::new();
        let start = Instant::now();
        println!("{}", Sample::HEADER);
        'minutes: for minute in 1..=minutes {
            let end = start + Duration::from_secs(60 * minute);
            let mut rounds = 0;
            while rounds == 0 || (rounds < ROUNDS_PER_MINUTE && Instant::now() < end) {
                if interrupted() {
                    break 'minutes;
                }
                if let Err(e) = self.round(rounds % 2 == 0) {
                    failures.push(format!("minute {minute}: {e}"));
                    break 'minutes;
                }
                rounds += 1;
            }
            // Pacing, not synchronisation: the rest of the minute is idle.
            while Instant::now() < end && !interrupted() {
                std::thread::sleep(Duration::from_millis(200));
            }
            let s = self.sample(minute, rounds);
            println!("{}", s.row());
            for f in self.soft_failures.drain(..) {
                println!("soak: minute {minute}: {f}");
                failures.push(format!("minute {minute}: {f}"));
            }
            if minute > warmup {
                failures.extend(s.above_steady(&samples[..warmup as usize]));
            }
            // A value above its steady one fails the run, but the run goes on: the table shows
            // whether it keeps growing.
            samples.push(s);
        }
        if interrupted() {
            return failures;
        }
        failures.extend(self.finish());
        failures
    }

    /// One round of every kind of churn.
    fn round(&mut self, scan: bool) -> Result<(), String> {
        for _ in 0..NAMESPACES_PER_ROUND {
            self.namespace_comes_and_goes()?;
        }
        let c = self.docker.container(None);
        self.refuse_container(&c)?;
        self.made_by_gone += c.out_rsts();
        drop(c);

        if scan {
            let ports: Vec<u16> = (1..=SCANNED_PORTS).collect();
            load::syns(self.scanned.addr, &ports, ports.len() as u64, Duration::from_secs(30));
        }
        let ports: Vec<u16> = (20_000..20_064).collect();
        load::syns(self.flooded.addr, &ports, FLOOD_SYNS, Duration::from_secs(30));
        let (host_ip, port) = (self.client.host_ip, self.published_port);
        self.client.ns.run(|| load::syns(host_ip, &[port], DNAT_SYNS, Duration::from_secs(10)));

        // The runtime goes away (bindtrace says so once its event stream is cut, unless it
        // already thinks it is down); a container started meanwhile is still watched and
        // reported; the runtime comes back. bindtrace not noticing either is a failure of the
        // run, but not the end of it: the table goes on.
        let stopped = self.stderr_len();
        let stopped_ns = monotonic_ns();
        self.relay.stop();
        // Its last word, said since the stop or (already down) before it, is "unavailable".
        if !self.bt.wait_until_stderr(WAIT, |s| docker_up(s) == Some(false)) {
            self.soft_failures.push(format!(
                "the Docker outage went unnoticed for {WAIT:?}:\n{}",
                self.outage(stopped, stopped_ns)
            ));
        }
        let c = self.docker.container(None);
        let refused = self.refuse_container(&c);
        let resumed = self.stderr_len();
        self.relay.resume();
        refused?;
        self.made_by_gone += c.out_rsts();
        drop(c);
        // "is back" said after the resume: one said before it would be about an earlier outage.
        if !self.bt.wait_until_stderr(WAIT, |s| docker_up(&s[resumed..]) == Some(true)) {
            self.soft_failures.push(format!(
                "Docker was not back {WAIT:?} after the relay was:\n{}",
                self.outage(stopped, stopped_ns)
            ));
        }
        Ok(())
    }

    fn stderr_len(&self) -> usize {
        let mut n = 0;
        self.bt.wait_until_stderr(Duration::ZERO, |s| {
            n = s.len();
            true
        });
        n
    }

    /// What bindtrace said about the Docker API since the relay stopped (seconds after the
    /// stop, as the soak read each line), and the relay's own account: enough to tell a relay
    /// that failed from a bindtrace that did not retry.
    fn outage(&self, from: usize, stopped_ns: u64) -> String {
        let said: Vec<String> = self.bt.stamped_stderr()[from..]
            .iter()
            .filter(|(_, l)| l.contains("Docker API") || l.contains("Docker event"))
            .map(|(ns, l)| format!("  +{:.2}s {l}", ns.saturating_sub(stopped_ns) as f64 / 1e9))
            .collect();
        format!("{}\nbindtrace since the stop:\n{}", self.relay.stats(), said.join("\n"))
    }

    fn namespace_comes_and_goes(&mut self) -> Result<(), String> {
        let n = self.bridge.namespace();
        self.watched(&n.host_veth, n.inode())?;
        let _server = Listener::start(&n.ns.name, "127.0.0.1", 8080, &[]);
        load::refused_once(n.addr, 8080);
        self.expected_lines += 1;
        self.line_of(n.inode(), 8080)?;
        self.made_by_gone += n.out_rsts();
        Ok(())
    }

    fn refuse_container(&mut self, c: &Ctr) -> Result<(), String> {
        self.watched(&c.host_veth, c.inode)?;
        load::refused_once(c.ip, 8000);
        self.expected_lines += 1;
        self.line_of(c.inode, 8000)
    }

    /// Refusals count from the moment bindtrace watches the port's interface in its namespace.
    /// The namespace is part of the line waited for: while the peer is being moved, the veth is
    /// briefly watched with its peer still in the root namespace, and a refusal made then would
    /// be outside the scope that follows.
    fn watched(&self, veth: &str, inode: u64) -> Result<(), String> {
        if self.bt.wait_stderr(&format!("watching {veth} (netns {inode}, "), WAIT) {
            Ok(())
        } else {
            Err(format!("{veth} was never watched:\n{}", tail(&self.bt.stderr())))
        }
    }

    fn line_of(&self, inode: u64, port: u16) -> Result<(), String> {
        if self.bt.has_line_within(WAIT, |l| {
            l["event"] == "refused" && l["netns"] == inode && l["target_port"] == port
        }) {
            Ok(())
        } else {
            Err(format!("a new key (netns {inode}, port {port}) got no line within {WAIT:?}"))
        }
    }

    /// Refusals made so far: the gone ones' and the live namespaces' resets.
    fn made(&self) -> u64 {
        self.made_by_gone + self.scanned.out_rsts() + self.flooded.out_rsts() + self.published.out_rsts()
    }

    /// Waits (at most a minute) for the count keys to go idle and leave both the kernel and
    /// userspace, then reads everything: the figures of one minute.
    fn sample(&mut self, minute: u64, rounds: u32) -> Sample {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut scrape = sample::scrape(self.metrics);
        while Instant::now() < deadline && (scrape.keys_kernel > 0 || scrape.keys_userspace > 0) {
            std::thread::sleep(Duration::from_millis(250));
            scrape = sample::scrape(self.metrics);
        }
        self.take_lines();
        Sample::read(minute, rounds, self.bt.pid(), scrape, (self.lines, self.counted), self.made())
    }

    /// Tallies the lines read so far and lets them go (an hour's lines would not fit).
    fn take_lines(&mut self) {
        let lines = self.bt.take_lines();
        self.lines += lines.iter().filter(|l| l["event"] == "refused").count() as u64;
        self.counted += sample::counted(&lines);
    }

    /// Stops bindtrace and compares its exit summary and lines with the refusals made.
    fn finish(&mut self) -> Vec<String> {
        let made = self.made();
        let mut failures = Vec::new();
        let code = self.bt.stop();
        let stderr = self.bt.stderr();
        // The whole log, for what a failure's excerpt leaves out (the current directory is
        // the repository's root; target/ is ignored by git).
        let log = std::path::Path::new("target/soak-bindtrace-stderr.log");
        match std::fs::write(log, &stderr) {
            Ok(()) => println!("soak: bindtrace's stderr is in {}", log.display()),
            Err(e) => println!("soak: could not keep bindtrace's stderr in {}: {e}", log.display()),
        }
        if code != Some(0) {
            failures.push(format!("bindtrace exited with {code:?}:\n{}", tail(&stderr)));
        }
        self.take_lines();
        let keyed = self.counted;
        let overflow = sample::summary_overflow(&stderr);
        println!(
            "soak: {made} refusals made; lines count {keyed}, overflow {overflow}; {} churned keys each had a line",
            self.expected_lines
        );
        if let Some(summary) = stderr.lines().find(|l| l.contains("refusals counted since start")) {
            println!("soak: exit summary: {}", summary.trim());
        }
        if keyed + overflow != made {
            failures
                .push(format!("lost count: {made} refusals made, lines count {keyed} + overflow {overflow}"));
        }
        if !stderr.contains(&format!("{made} refusals counted since start")) {
            failures.push(format!("the exit summary does not say {made} refusals:\n{}", tail(&stderr)));
        }
        failures
    }
}

/// Whether bindtrace's last word on the Docker API was that it is up (`is back`) or down
/// (`unavailable`); None before either.
fn docker_up(stderr: &[String]) -> Option<bool> {
    // The two lines of `sources/docker/watch.rs` (its debug lines quote errors that name the
    // API too, and are not a change of state).
    stderr.iter().rev().find_map(|l| {
        if l.contains(" is back: container details resume") {
            Some(true)
        } else if l.contains("reporting containers by namespace and address") {
            Some(false)
        } else {
            None
        }
    })
}

/// The last lines of a long stderr (enough to see what went wrong).
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
