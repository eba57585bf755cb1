//! Ordinary traffic: HTTP requests that succeed, the traffic a container host carries all day.
//! nginx (Debian's nginx-light) listens on 0.0.0.0:8080 in the container namespace, so nothing
//! is refused; wrk drives it from the host namespace, directly (172.17.0.2:8080) and through a
//! published port (172.17.0.1:18080, DNAT'd by an iptables rule in the harness's host namespace
//! as Docker does without its userland proxy), each with keep-alive and with one connection per
//! request. What this prices is the connect tracker, which runs on every state change of every
//! TCP socket, and the hooks' cost on traffic that is not theirs.
use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bindtrace_tests::{Hook, Netns, snmp_out_rsts};

use crate::{
    Lab, Options, bpfstats,
    procfs::Sched,
    report::{OrdinaryBpf, OrdinaryRun, OrdinarySession, Report},
    tracer::{BPFTRACE_COUNT, Config, Running},
};

/// nginx's port in the container namespace (on every address).
pub const HTTP_PORT: u16 = 8080;
/// The published port on the host namespace's own addresses, DNAT'd to the container.
pub const PUBLISHED_PORT: u16 = 18080;
/// wrk's connections (one thread).
pub const CONNECTIONS: u32 = 32;

pub const ORDINARY_CONFIGS: [Config; 5] = [
    Config::NoTracer,
    Config::Bindtrace(Hook::TcpSendReset),
    Config::Bindtrace(Hook::KfreeSkb),
    Config::Bindtrace(Hook::Tc),
    Config::Bpftrace(BPFTRACE_COUNT),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The container's own address.
    Direct,
    /// The host's address, DNAT'd to the container.
    Published,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    pub target: Target,
    /// One connection per request (`Connection: close`) rather than keep-alive.
    pub per_request: bool,
}

pub const SCENARIOS: [Scenario; 4] = [
    Scenario { target: Target::Direct, per_request: false },
    Scenario { target: Target::Direct, per_request: true },
    Scenario { target: Target::Published, per_request: false },
    Scenario { target: Target::Published, per_request: true },
];

impl Scenario {
    pub fn label(self) -> String {
        let to = match self.target {
            Target::Direct => format!("direct (172.17.0.2:{HTTP_PORT})"),
            Target::Published => format!("published port (172.17.0.1:{PUBLISHED_PORT}, DNAT)"),
        };
        let how = if self.per_request { "one connection per request" } else { "keep-alive" };
        format!("{to}, {how}")
    }

    fn url(self, lab: &Lab) -> String {
        match self.target {
            Target::Direct => format!("http://{}:{HTTP_PORT}/", lab.ctr.ipv4),
            Target::Published => format!("http://{}:{PUBLISHED_PORT}/", lab.topo.gateway_v4()),
        }
    }
}

/// What wrk reported for one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wrk {
    pub requests: u64,
    pub seconds: f64,
    pub per_sec: f64,
    pub non_2xx: u64,
    /// connect, read, write, timeout.
    pub errors: [u64; 4],
}

impl Wrk {
    fn parse(text: &str) -> anyhow::Result<Wrk> {
        let mut w = Wrk::default();
        for line in text.lines().map(str::trim) {
            if let Some((n, rest)) = line.split_once(" requests in ") {
                w.requests = n.trim().parse()?;
                let t = rest.split(',').next().unwrap_or("");
                w.seconds = match t.strip_suffix("ms") {
                    Some(ms) => ms.parse::<f64>()? / 1e3,
                    None => t.trim_end_matches('s').parse()?,
                };
            } else if let Some(v) = line.strip_prefix("Requests/sec:") {
                w.per_sec = v.trim().parse()?;
            } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
                w.non_2xx = v.trim().parse()?;
            } else if let Some(v) = line.strip_prefix("Socket errors:") {
                for (i, part) in v.split(',').enumerate().take(4) {
                    w.errors[i] = part.split_whitespace().last().unwrap_or("0").parse()?;
                }
            }
        }
        if w.seconds <= 0.0 {
            anyhow::bail!("no summary in wrk's output:\n{text}");
        }
        Ok(w)
    }
}

/// `wrk -t1 -c32 -dSs URL` in `ns` on `cpu`.
fn wrk(ns: &Netns, cpu: usize, url: &str, per_request: bool, seconds: u32) -> anyhow::Result<Wrk> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string(), "ip", "netns", "exec", &ns.name, "wrk", "-t1"])
        .args([format!("-c{CONNECTIONS}"), format!("-d{seconds}s")]);
    if per_request {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output().map_err(|e| anyhow::anyhow!("running wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        anyhow::bail!(
            "wrk failed ({}): {}{text}\n(install it with `sudo ./x setup`: Debian package wrk)",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Wrk::parse(&text)
}

/// nginx in the container namespace on the server CPU, one worker, its files in a temporary
/// directory; stopped (and the directory removed) on drop.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    pub fn start(lab: &Lab, cpu: usize) -> anyhow::Result<Nginx> {
        let dir = std::env::temp_dir().join(format!("bindtrace-bench-nginx-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("tmp"))?;
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 60s;\n\
               client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;\n\
               uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
               server {{ listen 0.0.0.0:{HTTP_PORT} backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = Command::new("taskset")
            .args(["-c", &cpu.to_string(), "ip", "netns", "exec", &lab.ctr.ns.name, "nginx", "-p"])
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-e", "stderr", "-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!(
                    "starting nginx ({e}): install it with `sudo ./x setup` (Debian package nginx-light)"
                )
            })?;
        let mut nginx = Nginx { child, dir };
        // Up once it accepts a connection on the container's address.
        let addr = SocketAddr::new(lab.ctr.ipv4, HTTP_PORT);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if lab.topo.host.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1))).is_ok() {
                return Ok(nginx);
            }
            if let Ok(Some(status)) = nginx.child.try_wait() {
                anyhow::bail!("nginx exited with {status} before accepting connections");
            }
            if Instant::now() > deadline {
                anyhow::bail!("nginx did not accept connections on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The published port: a DNAT rule in the host namespace's nat OUTPUT chain for connections to
/// any of its own addresses (Docker's rule for local clients without the userland proxy).
/// Deleted on drop (and gone with the namespace anyway).
pub struct Published {
    ns: String,
    rule: Vec<String>,
}

impl Published {
    pub fn add(lab: &Lab) -> anyhow::Result<Published> {
        let rule: Vec<String> = [
            "OUTPUT",
            "-m",
            "addrtype",
            "--dst-type",
            "LOCAL",
            "-p",
            "tcp",
            "--dport",
            &PUBLISHED_PORT.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &SocketAddr::new(lab.ctr.ipv4, HTTP_PORT).to_string(),
        ]
        .map(str::to_owned)
        .into();
        let ns = lab.topo.host.name.clone();
        let iptables = |op: &str| {
            Command::new("ip")
                .args(["netns", "exec", &ns, "iptables", "-w", "-t", "nat", op])
                .args(&rule)
                .output()
        };
        let out = iptables("-A").map_err(|e| anyhow::anyhow!("running iptables: {e}"))?;
        if !out.status.success() {
            anyhow::bail!("adding the DNAT rule: {}", String::from_utf8_lossy(&out.stderr));
        }
        // Conntrack now runs in the host namespace, as on a Docker host. Its TIME_WAIT entries
        // (120 s by default) would fill the table over the one-connection-per-request rounds:
        // a second is plenty for a client that never reuses a closed tuple that fast.
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-q",
                "-w",
                "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
            ])
            .status();
        Ok(Published { ns, rule })
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "iptables", "-w", "-t", "nat", "-D"])
            .args(&self.rule)
            .output();
    }
}

/// Seconds per wrk run.
fn seconds(o: &Options) -> u32 {
    if o.short { 1 } else { 3 }
}

/// One tracer (or none) started once, with one wrk run per scenario, then stopped.
fn session(
    lab: &Lab,
    o: &Options,
    config: Config,
    scenarios: &[Scenario],
) -> anyhow::Result<OrdinarySession> {
    let rsts_before = snmp_out_rsts(&lab.ctr.ns);
    let tracer = Running::start(config, &lab.topo.host, o.tracer_cpu, &[])?;
    let pid = tracer.pid();
    let mut runs = Vec::new();
    for &scenario in scenarios {
        let before = pid.map(Sched::read);
        let w = wrk(&lab.topo.host, o.gen_cpu, &scenario.url(lab), scenario.per_request, seconds(o))?;
        let cpu = pid.zip(before).map(|(p, b)| Sched::read(p).since(b));
        runs.push(OrdinaryRun { scenario, config, wrk: w, cpu, ratio: None });
    }
    let stopped = tracer.stop()?;
    Ok(OrdinarySession {
        config,
        runs,
        counted: stopped.counted,
        refused_lines: stopped.lines.len(),
        out_rsts: snmp_out_rsts(&lab.ctr.ns) - rsts_before,
    })
}

pub fn run(lab: &Lab, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let _nginx = Nginx::start(lab, o.tracer_cpu)?;
    let _published = Published::add(lab)?;
    // Warm-up (not in a smoke run): nginx's first requests, the conntrack table, wrk's pages.
    for s in SCENARIOS.into_iter().filter(|_| !o.short) {
        wrk(&lab.topo.host, o.gen_cpu, &s.url(lab), s.per_request, 1)?;
    }
    let tracers: Vec<Config> = ORDINARY_CONFIGS.into_iter().filter(|c| *c != Config::NoTracer).collect();
    let sessions = &mut report.ordinary;
    if o.short {
        // Behaviour only: each configuration started once, each scenario once under it.
        for config in ORDINARY_CONFIGS {
            eprintln!("bindtrace-bench: ordinary traffic, {}", config.label());
            sessions.push(session(lab, o, config, &SCENARIOS)?);
        }
    } else {
        // As the throughput phase: none, A, none, B, ... per scenario, one tracer start per run.
        for scenario in SCENARIOS {
            sessions.push(session(lab, o, Config::NoTracer, &[scenario])?);
            for round in 1..=o.rounds {
                for &config in &tracers {
                    eprintln!(
                        "bindtrace-bench: ordinary traffic, {}, round {round}/{}: {}",
                        scenario.label(),
                        o.rounds,
                        config.label()
                    );
                    sessions.push(session(lab, o, config, &[scenario])?);
                    sessions.push(session(lab, o, Config::NoTracer, &[scenario])?);
                }
            }
        }
    }
    set_ratios(sessions);

    // The connect tracker on connections to a healthy server (one per request: the most state
    // changes per request), with BPF run-time accounting on.
    let _stats = bpfstats::StatsEnabled::on()?;
    let hooks: &[Hook] =
        if o.short { &[Hook::TcpSendReset] } else { &[Hook::TcpSendReset, Hook::KfreeSkb, Hook::Tc] };
    let targets: &[Target] = if o.short { &[Target::Direct] } else { &[Target::Direct, Target::Published] };
    for &hook in hooks {
        for &target in targets {
            let scenario = Scenario { target, per_request: true };
            eprintln!(
                "bindtrace-bench: ordinary traffic, kernel time (bpf_stats), {}, {}",
                hook.arg(),
                scenario.label()
            );
            let tracer = Running::start(Config::Bindtrace(hook), &lab.topo.host, o.tracer_cpu, &[])?;
            let pid = tracer.pid().expect("bindtrace");
            let before = bpfstats::of_process(pid);
            let w = wrk(&lab.topo.host, o.gen_cpu, &scenario.url(lab), true, seconds(o))?;
            let after = bpfstats::of_process(pid);
            let stopped = tracer.stop()?;
            report.ordinary_bpf.push(OrdinaryBpf {
                hook,
                scenario,
                wrk: w,
                progs: bpfstats::delta(&before, &after),
                counted: stopped.counted,
            });
        }
    }
    Ok(())
}

/// Each tracer run's requests/s over the mean of the no-tracer runs of the same scenario just
/// before and just after it (the one there is, at either end).
fn set_ratios(sessions: &mut [OrdinarySession]) {
    let seq: Vec<(Scenario, Config, f64)> =
        sessions.iter().flat_map(|s| s.runs.iter()).map(|r| (r.scenario, r.config, r.wrk.per_sec)).collect();
    let runs = sessions.iter_mut().flat_map(|s| s.runs.iter_mut());
    for (i, run) in runs.enumerate() {
        if run.config == Config::NoTracer {
            continue;
        }
        let same = |r: &&(Scenario, Config, f64)| r.0 == run.scenario && r.1 == Config::NoTracer;
        let before = seq[..i].iter().rev().find(same).map(|r| r.2);
        let after = seq[i + 1..].iter().find(same).map(|r| r.2);
        let around: Vec<f64> = before.into_iter().chain(after).collect();
        if !around.is_empty() {
            let mean = around.iter().sum::<f64>() / around.len() as f64;
            run.ratio = Some(run.wrk.per_sec / mean);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_summaries() {
        let ok = "Running 1s test @ http://172.17.0.2:8080/\n  1 threads and 32 connections\n  \
                  18725 requests in 1.01s, 2.68MB read\nRequests/sec:  18575.49\nTransfer/sec:      2.66MB\n";
        let w = Wrk::parse(ok).unwrap();
        assert_eq!((w.requests, w.non_2xx, w.errors), (18725, 0, [0; 4]));
        assert!((w.seconds - 1.01).abs() < 1e-9 && (w.per_sec - 18575.49).abs() < 1e-9);
        let bad = "  3 requests in 999.00ms, 1KB read\n  Socket errors: connect 5, read 1, write 0, timeout 2\n  \
                   Non-2xx or 3xx responses: 3\nRequests/sec:      3.00\n";
        let w = Wrk::parse(bad).unwrap();
        assert_eq!((w.requests, w.non_2xx, w.errors), (3, 3, [5, 1, 0, 2]));
        assert!((w.seconds - 0.999).abs() < 1e-9);
        assert!(Wrk::parse("unable to connect").is_err());
    }

    #[test]
    fn ratios_use_the_no_tracer_runs_around_each() {
        let s = Scenario { target: Target::Direct, per_request: true };
        let other = Scenario { target: Target::Published, per_request: true };
        let run = |config, scenario, per_sec| OrdinaryRun {
            scenario,
            config,
            wrk: Wrk { per_sec, ..Wrk::default() },
            cpu: None,
            ratio: None,
        };
        let session = |runs| OrdinarySession {
            config: Config::NoTracer,
            runs,
            counted: None,
            refused_lines: 0,
            out_rsts: 0,
        };
        let bt = Config::Bindtrace(Hook::Tc);
        let mut sessions = vec![
            session(vec![run(Config::NoTracer, s, 100.0)]),
            session(vec![run(bt, s, 99.0), run(Config::NoTracer, other, 1.0)]),
            session(vec![run(Config::NoTracer, s, 98.0)]),
            session(vec![run(bt, s, 49.0)]),
        ];
        set_ratios(&mut sessions);
        assert_eq!(sessions[1].runs[0].ratio, Some(1.0));
        assert_eq!(sessions[3].runs[0].ratio, Some(0.5));
        assert_eq!(sessions[0].runs[0].ratio, None);
    }
}
