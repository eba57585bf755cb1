//! Command-line interface.
use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    app::check::CheckArgs, app::generate::GenerateArgs, diagnose::audit, doctor::DoctorArgs,
    kernel::hook::HookChoice, sinks::metrics, sinks::output::StreamFormat,
};

/// Shown after the options of `bindtrace --help` and in the man page (`generate man`).
const EXAMPLES: &str = "\
Examples:
  sudo bindtrace                       watch Docker's containers: each refused connection, with the fix
  sudo bindtrace --format json         one JSON object per event, for scripts and log shippers
  sudo bindtrace -i br0 --no-docker    plain network namespaces on bridge br0, without Docker
  sudo bindtrace check                 audit every published port once; exit 1 on a loopback-only one
  sudo bindtrace doctor                say whether bindtrace can work here, and what is missing
  curl -s 127.0.0.1:19462/metrics      the Prometheus metrics while it runs

Docs: the README and docs/ in the source repository; `man bindtrace` when installed from the package.";

/// Reports, as it happens, every connection to a container that was refused because the service
/// inside listens on loopback (or on the wrong address, family or port), and how to fix it.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "bindtrace",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true,
    after_help = EXAMPLES
)]
pub(crate) struct Args {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,

    /// Bridge to watch, in bindtrace's own network namespace (repeatable). Default: docker0 and
    /// the bridge of every Docker network, followed as networks come and go.
    #[arg(short = 'i', long = "iface", value_name = "NAME")]
    pub(crate) ifaces: Vec<String>,

    /// Docker API socket, or podman's compatible one (unix:///path or a path; repeatable, to
    /// follow several engines; default: $DOCKER_HOST, else each of /var/run/docker.sock and
    /// /run/podman/podman.sock that exists).
    #[arg(long, value_name = "SOCKET")]
    pub(crate) docker_host: Vec<String>,

    /// Where podman's sockets appear after start, followed then without a restart:
    /// DIR/podman/podman.sock (rootful) and DIR/user/UID/podman/podman.sock and
    /// DIR/user/UID/docker.sock (each user's podman and rootless Docker, once DIR/user/UID is
    /// mounted at login). Default: /run, watched unless --docker-host or
    /// $DOCKER_HOST names the sockets.
    #[arg(long, value_name = "DIR", conflicts_with = "no_docker")]
    pub(crate) run_dir: Option<std::path::PathBuf>,

    /// Do not talk to Docker: no container names, published ports, audit or network following.
    #[arg(long, conflicts_with = "docker_host")]
    pub(crate) no_docker: bool,

    /// containerd's task state directory, read for nerdctl containers and Kubernetes pods
    /// (followed with inotify; absent is fine). Not read with --no-docker.
    #[arg(long, value_name = "DIR", default_value = crate::sources::containerd::DEFAULT_STATE_DIR)]
    pub(crate) containerd_state: std::path::PathBuf,

    /// How long a started container may have nothing listening on a published port before the
    /// audit reports it (loopback-only and other misbindings are reported at once).
    #[arg(long, value_name = "DURATION", default_value = audit::DEFAULT_GRACE, value_parser = humantime::parse_duration)]
    pub(crate) audit_grace: Duration,

    /// Kernel hook: `auto` picks tcp-send-reset when this kernel's BTF shows the reset reason,
    /// else kfree-skb when it shows drop reasons, else tc.
    #[arg(long, value_enum, default_value_t = HookChoice::Auto)]
    pub(crate) hook: HookChoice,

    /// Output format (see docs/output.md). `auto`: `terminal` when stdout is a terminal, else
    /// `text`.
    #[arg(long, value_enum, default_value_t = StreamFormat::Auto)]
    pub(crate) format: StreamFormat,

    /// The terminal form folds more than 10 new ports of one workload within this window into
    /// one SCAN line, written once the window passes without a line for it (or at exit).
    /// Default: 2s. Tests lengthen it so that a scan ends only at exit, whatever the load.
    #[arg(long, value_name = "DURATION", value_parser = parse_window, hide = true)]
    pub(crate) scan_window: Option<Duration>,

    /// Size of the kernel-to-userspace ring buffer in bytes (a power of two, at least 4096).
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024, value_parser = parse_ringbuf_size)]
    pub(crate) ringbuf_size: u32,

    /// Keys (namespace, interface, port) each of the kernel's two count maps holds. Keys leave
    /// the kernel when idle or when their port leaves scope; refusals that find the map full
    /// still get a line, of unknown count, and are counted as overflow.
    #[arg(
        long,
        value_name = "N",
        default_value_t = bindtrace_common::COUNTS_MAX_ENTRIES,
        value_parser = clap::value_parser!(u32).range(16..=4_194_304)
    )]
    pub(crate) counts_size: u32,

    /// Ports (a container's interface on a watched bridge) the kernel's scope map holds. Ports
    /// beyond it are not watched until others leave; that is logged and counted in
    /// bindtrace_errors_total{stage="scope"}.
    #[arg(
        long,
        value_name = "N",
        default_value_t = bindtrace_common::SCOPE_MAX_ENTRIES,
        value_parser = clap::value_parser!(u32).range(1..=1_048_576)
    )]
    pub(crate) scope_size: u32,

    /// Lines waiting for their diagnosis (reading the namespace's listeners and who holds
    /// them, on a worker). Lines beyond it are written at once without one (verdict unknown,
    /// counts exact), counted in bindtrace_errors_total{stage="enrich"}.
    #[arg(
        long,
        value_name = "LINES",
        default_value_t = crate::app::enrichment::DEFAULT_QUEUE_LINES,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_048_576)
    )]
    pub(crate) enrich_queue: usize,

    /// SO_RCVBUF of the link-notification socket; tests make it tiny to force overruns.
    #[arg(long, value_name = "BYTES", default_value_t = crate::sources::link_events::WATCH_RCVBUF, hide = true)]
    pub(crate) link_events_rcvbuf: u32,

    /// The tc hook attaches clsact filters even where tcx exists (tests of the clsact path,
    /// such as the recovery after a SIGKILL, on any kernel).
    #[arg(long, hide = true)]
    pub(crate) tc_clsact: bool,

    /// How long a key may go unrefused before the kernel map lets it go (its count stays
    /// exact: userspace keeps it until its lines are written). Tests and the soak shorten it.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration, hide = true)]
    pub(crate) idle_key_after: Duration,

    /// Repeated refusals of one namespace and port within this window fold into one line with a
    /// count (e.g. 500ms, 1s, 2s).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_window)]
    pub(crate) fold_window: Duration,

    /// Stop by itself after this long (e.g. 30s); runs until SIGINT or SIGTERM otherwise.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub(crate) duration: Option<Duration>,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics. The default stays on this host's
    /// loopback; an address such as 0.0.0.0:PORT opens the port to the network.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        default_value = metrics::DEFAULT_ADDR,
        value_parser = parse_metrics_addr,
        help_heading = "Metrics"
    )]
    pub(crate) metrics_addr: SocketAddr,

    /// Serve no metrics.
    #[arg(long, conflicts_with = "metrics_addr", help_heading = "Metrics")]
    pub(crate) no_metrics: bool,

    /// At most this many label sets in bindtrace_refused_connections_total; refusals that would
    /// need more count under the series whose labels are all "other".
    #[arg(
        long,
        value_name = "N",
        default_value_t = metrics::DEFAULT_MAX_SERIES,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000),
        help_heading = "Metrics"
    )]
    pub(crate) metrics_max_series: u32,

    /// At most this many container_port values per container; refusals on further ports count
    /// under container_port="other".
    #[arg(
        long,
        value_name = "N",
        default_value_t = metrics::DEFAULT_MAX_PORTS,
        value_parser = clap::value_parser!(u32).range(1..=65_535),
        help_heading = "Metrics"
    )]
    pub(crate) metrics_max_ports: u32,

    /// More log detail on stderr (-v debug, -vv trace, including kernel-side messages).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
}

#[derive(Debug, Clone, Subcommand)]
pub(crate) enum Command {
    /// Audit every running container's published ports once, in every runtime, and exit: 0 all
    /// reachable, 1 any loopback-only, 2 other misbindings, 3 the check could not run, 4 a
    /// named container or pod is not running.
    Check(CheckArgs),
    /// Say whether bindtrace can work here and, where not, what to do: one line per check
    /// (kernel, BTF, hooks, capabilities, lockdown, namespaces, runtimes, bridges, metrics
    /// port, platform). Exit 0 when ready, 1 otherwise.
    Doctor(DoctorArgs),
    /// Print the man page or a shell's completions (for packagers).
    #[command(hide = true)]
    Generate(GenerateArgs),
}

fn parse_ringbuf_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{s:?} is not a byte count: {e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!(
            "{n} must be a power of two of at least 4096 (the page size), e.g. 4096 or 262144"
        ));
    }
    Ok(n)
}

/// `IP:PORT` (`[IPv6]:PORT` for IPv6), with a fixed port.
pub(crate) fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    let example = "e.g. 127.0.0.1:19462, [::1]:19462 or 0.0.0.0:19462";
    let addr: SocketAddr = s.parse().map_err(|_| match s.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && host.parse::<std::net::IpAddr>().is_err() => {
            format!("{s:?}: {host:?} is not an IP address (host names are not resolved); {example}")
        }
        Some((_, port)) if port.parse::<u16>().is_err() => {
            format!("{s:?}: {port:?} is not a port number (1-65535); {example}")
        }
        Some(_) => format!("{s:?} is not ADDR:PORT (an IPv6 address goes in brackets); {example}"),
        None => format!("{s:?} is not ADDR:PORT: give an IP address and a port, {example}"),
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "{s:?}: port 0 would be a random port that no scrape config can name; {example}"
        ));
    }
    Ok(addr)
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err("the fold window must be longer than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::output::Format;

    /// The examples `--help` shows are real command lines.
    #[test]
    fn every_example_parses() {
        let examples: Vec<&str> = EXAMPLES.lines().filter_map(|l| l.trim().strip_prefix("sudo ")).collect();
        assert!(examples.len() >= 5, "{EXAMPLES}");
        for e in examples {
            let argv: Vec<&str> = e.split("  ").next().unwrap().split_whitespace().collect();
            Args::try_parse_from(&argv).unwrap_or_else(|err| panic!("{e}: {err}"));
        }
    }

    #[test]
    fn defaults_follow_docker() {
        let a = Args::try_parse_from(["bindtrace"]).unwrap();
        assert!(a.ifaces.is_empty(), "no -i: docker0 and Docker's networks");
        assert!(!a.no_docker);
        assert!(a.command.is_none());
        assert_eq!(a.audit_grace, Duration::from_secs(30));
        assert_eq!(a.hook, HookChoice::Auto);
        assert_eq!(a.format, StreamFormat::Auto);
        assert_eq!(a.fold_window, Duration::from_secs(1));
        assert_eq!(a.scan_window, None);
        assert_eq!(a.metrics_addr, "127.0.0.1:19462".parse().unwrap());
        assert!(!a.no_metrics);
        assert_eq!((a.metrics_max_series, a.metrics_max_ports), (1000, 16));
    }

    #[test]
    fn metrics_flags() {
        let a = Args::try_parse_from(["bindtrace", "--metrics-addr", "[::1]:9999"]).unwrap();
        assert_eq!(a.metrics_addr, "[::1]:9999".parse().unwrap());
        assert!(Args::try_parse_from(["bindtrace", "--no-metrics"]).unwrap().no_metrics);
        let err = |args: &[&str]| {
            let mut all = vec!["bindtrace"];
            all.extend_from_slice(args);
            Args::try_parse_from(all).unwrap_err().to_string()
        };
        for (bad, says) in [
            ("19462", "is not ADDR:PORT"),
            ("localhost:19462", "not an IP address"),
            ("127.0.0.1:99999", "not a port number"),
            ("127.0.0.1:http", "not a port number"),
            ("::1:19462", "brackets"),
            ("127.0.0.1:0", "port 0"),
        ] {
            let e = err(&["--metrics-addr", bad]);
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(err(&["--no-metrics", "--metrics-addr", "127.0.0.1:1"]).contains("cannot be used with"));
        assert!(err(&["--metrics-max-series", "0"]).contains("0"));
    }

    #[test]
    fn repeated_ifaces_and_hooks() {
        let a = Args::try_parse_from([
            "bindtrace",
            "-i",
            "docker0",
            "--iface",
            "br-1",
            "--hook",
            "kfree-skb",
            "--format",
            "json",
        ])
        .unwrap();
        assert_eq!(a.ifaces, vec!["docker0", "br-1"]);
        assert_eq!(a.hook, HookChoice::KfreeSkb);
        assert_eq!(a.format, StreamFormat::Json);
    }

    #[test]
    fn bad_values_are_explained() {
        let e = Args::try_parse_from(["bindtrace", "--ringbuf-size", "5000"]).unwrap_err().to_string();
        assert!(e.contains("power of two"), "{e}");
        assert!(Args::try_parse_from(["bindtrace", "--hook", "kprobe"]).is_err());
        assert!(Args::try_parse_from(["bindtrace", "--fold-window", "0s"]).is_err());
        assert!(Args::try_parse_from(["bindtrace", "--no-docker", "--docker-host", "/x"]).is_err());
    }

    #[test]
    fn check_is_a_subcommand() {
        let a = Args::try_parse_from(["bindtrace", "check", "--format", "json", "web", "db"]).unwrap();
        let Some(Command::Check(c)) = a.command else { panic!("not check") };
        assert_eq!(c.containers, vec!["web", "db"]);
        assert_eq!(c.format, Format::Json);
        assert_eq!(c.audit_grace, Duration::from_secs(30));
        // Detector options belong to the detector.
        assert!(Args::try_parse_from(["bindtrace", "-i", "docker0", "check"]).is_err());
    }
}
