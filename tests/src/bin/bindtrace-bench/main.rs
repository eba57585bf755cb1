//! bindtrace-bench: what bindtrace costs on the reset path, next to no tracer and bpftrace.
//!
//! Builds its own topology (a "host" namespace with a bridge named docker0, a container
//! namespace on a veth with a server bound to 127.0.0.1:8000), hammers the container's
//! 172.17.0.2:8000 with refused connection attempts from the host namespace, and prints
//! markdown tables. Its last phase prices ordinary traffic instead: HTTP requests that succeed,
//! to nginx on 0.0.0.0:8080 in the same container namespace (see `ordinary`). Every run is
//! bounded in time; all traffic stays in these namespaces.
//! Run it through `sudo ./x bench` (or `cargo xtask bench`), which builds what it needs.
mod bpfstats;
mod load;
mod ordinary;
mod phases;
mod procfs;
mod report;
mod stats;
mod tracer;

use std::{net::SocketAddr, path::PathBuf};

use bindtrace_tests::{Container, NativeListener, Topology, is_root};

const USAGE: &str = "usage: bindtrace-bench [--short] [--rounds N] [--seconds S] [--out FILE]

  --short      a smoke run: every phase once, briefly (checks the harness works; the figures mean little)
  --rounds N   interleaved rounds per configuration (default 5, at least 5 for a real run)
  --seconds S  length of each flood (default 5)
  --out FILE   also write the tables (markdown) to FILE
  --only LIST  only these phases, comma-separated: throughput, latency, bpf, idle, ordinary (default: all)";

pub const PHASES: [&str; 5] = ["throughput", "latency", "bpf", "idle", "ordinary"];

pub struct Options {
    pub short: bool,
    pub rounds: usize,
    pub seconds: f64,
    pub out: Option<PathBuf>,
    pub phases: Vec<String>,
    /// CPU of the load generator (and so of the kernel's reset path, which runs in the
    /// sender's softirq on a veth), and CPU of the tracer, the server and this harness.
    pub gen_cpu: usize,
    pub tracer_cpu: usize,
}

impl Options {
    pub fn runs(&self, phase: &str) -> bool {
        self.phases.is_empty() || self.phases.iter().any(|p| p == phase)
    }
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        short: false,
        rounds: 5,
        seconds: 5.0,
        out: None,
        phases: Vec::new(),
        gen_cpu: 0,
        tracer_cpu: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| args.next().ok_or(format!("{a} needs {what}"));
        match a.as_str() {
            "--short" => o.short = true,
            "--rounds" => o.rounds = value("a count")?.parse().map_err(|_| "--rounds: a count")?,
            "--seconds" => o.seconds = value("seconds")?.parse().map_err(|_| "--seconds: a number")?,
            "--out" => o.out = Some(PathBuf::from(value("a file")?)),
            "--only" => {
                o.phases = value("a list")?.split(',').map(str::to_owned).collect();
                if let Some(bad) = o.phases.iter().find(|p| !PHASES.contains(&p.as_str())) {
                    return Err(format!("--only: unknown phase {bad} (phases: {})", PHASES.join(", ")));
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    if o.short {
        o.rounds = 1;
        o.seconds = 1.0;
    }
    if o.rounds == 0 || !(o.seconds > 0.0 && o.seconds <= 60.0) {
        return Err("--rounds must be at least 1 and --seconds in (0, 60]".into());
    }
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if cpus < 2 {
        o.tracer_cpu = 0;
    }
    Ok(o)
}

/// The namespaces and the loopback-bound server every phase uses.
pub struct Lab {
    pub topo: Topology,
    pub ctr: Container,
    _server: NativeListener,
}

pub const SERVER_PORT: u16 = 8000;

fn main() -> std::process::ExitCode {
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bindtrace-bench: {e}\n\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    if !is_root() {
        eprintln!("bindtrace-bench: needs root (namespaces, eBPF): run `sudo ./x bench`");
        return std::process::ExitCode::from(2);
    }
    if std::env::var_os("BINDTRACE_BIN").is_none() {
        eprintln!(
            "bindtrace-bench: BINDTRACE_BIN is not set: run `sudo ./x bench`, which builds and sets it"
        );
        return std::process::ExitCode::from(2);
    }
    match run(&opts) {
        Ok(report) => {
            let text = report.markdown(&opts);
            println!("{text}");
            if let Some(path) = &opts.out
                && let Err(e) = std::fs::write(path, &text)
            {
                eprintln!("bindtrace-bench: writing {}: {e}", path.display());
                return std::process::ExitCode::FAILURE;
            }
            let failures = report.failures();
            for f in &failures {
                eprintln!("bindtrace-bench: FAILED: {f}");
            }
            if failures.is_empty() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("bindtrace-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> anyhow::Result<report::Report> {
    setup_process(opts)?;
    let _tracefs = phases::TracefsMount::ensure()?;
    let mut topo = Topology::new();
    let ctr = topo.container();
    let addr: SocketAddr = format!("127.0.0.1:{SERVER_PORT}").parse()?;
    let server = NativeListener::start(&ctr.ns, addr);
    let lab = Lab { topo, ctr, _server: server };
    phases::run_all(&lab, opts)
}

/// Pins this harness (and so the server's thread) to the tracer CPU, and lifts the locked-memory
/// limit for bpftrace, which inherits it.
fn setup_process(opts: &Options) -> anyhow::Result<()> {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(opts.tracer_cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!("pinning to CPU {}: {}", opts.tracer_cpu, std::io::Error::last_os_error());
        }
        let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited);
    }
    Ok(())
}
