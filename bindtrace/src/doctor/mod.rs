//! `bindtrace doctor`: whether bindtrace can work here and, where not, why and what to do, one
//! line per check. It loads nothing and changes nothing; it reuses the code set-up runs
//! (capabilities, BTF, the hook choice, the metrics bind) so that its verdict is set-up's.
//! It never resolves a host name: every address is an IP or a unix socket.
//!
//! Exit status: 0 when no check failed (bindtrace can run), 1 otherwise.
mod host;
mod kernel;
mod namespaces;
pub(crate) mod report;
mod runtimes;

use std::{io::Write, net::SocketAddr, path::PathBuf};

use crate::{
    kernel::{btf::Btf, privileges},
    netns::links,
    sinks::{metrics, output::Format},
    sources::docker,
};
use report::Check;

/// Said with every set-up error, so the way to the whole picture is in the message.
pub(crate) const HINT: &str = "`bindtrace doctor` checks everything bindtrace needs here";

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DoctorArgs {
    /// Output format: a line per check, or one JSON object with every check.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub(crate) format: Format,

    /// Docker API socket, or podman's compatible one (unix:///path or a path; default:
    /// $DOCKER_HOST, else /var/run/docker.sock, else /run/podman/podman.sock when only it exists).
    #[arg(long, value_name = "SOCKET")]
    pub(crate) docker_host: Option<String>,

    /// The metrics address bindtrace would bind, checked to be free.
    #[arg(long, value_name = "ADDR:PORT", default_value = metrics::DEFAULT_ADDR, value_parser = crate::app::cli::parse_metrics_addr)]
    pub(crate) metrics_addr: SocketAddr,

    /// bindtrace would run with --no-metrics: the port is not checked.
    #[arg(long, conflicts_with = "metrics_addr")]
    pub(crate) no_metrics: bool,

    /// containerd's task state directory bindtrace would read.
    #[arg(long, value_name = "DIR", default_value = crate::sources::containerd::DEFAULT_STATE_DIR)]
    pub(crate) containerd_state: PathBuf,

    /// Where each user's sockets are looked for: DIR/user/UID/docker.sock (rootless Docker)
    /// and DIR/user/UID/podman/podman.sock, a line each.
    #[arg(long, value_name = "DIR", default_value = docker::appear::DEFAULT_RUN_DIR)]
    pub(crate) run_dir: PathBuf,
}

/// Runs every check, writes the report to `out`, and returns the exit status.
pub(crate) async fn run<W: Write>(args: &DoctorArgs, out: &mut W) -> u8 {
    let checks = checks(args).await;
    let written = match args.format {
        Format::Json => report::write_json(&checks, out),
        Format::Text => report::write_text(&checks, out),
    };
    if let Err(e) = written.and_then(|()| out.flush()) {
        eprintln!("bindtrace doctor: writing the report: {e}");
        return report::EXIT_NOT_READY;
    }
    report::exit_code(&checks)
}

async fn checks(args: &DoctorArgs) -> Vec<Check> {
    let mut checks = Vec::new();
    let release = kernel::release();
    checks.push(kernel::kernel_check(&release));
    let btf = Btf::from_sys_fs().map_err(|e| format!("cannot read /sys/kernel/btf/vmlinux: {e}"));
    checks.push(kernel::btf_check(btf.as_ref().map_err(String::as_str)));
    checks.push(kernel::object_check());
    checks.push(kernel::hooks_check(btf.as_ref().map_err(String::as_str)));
    drop(btf);
    checks.push(kernel::lockdown_check(kernel::read_lockdown()));
    checks.extend(host::capability_checks(privileges::effective()));

    // The runtimes at once: each probe is bounded on its own.
    let podman_socket = runtimes::first_present(&runtimes::podman_sockets());
    // Each user's rootless Docker and podman socket, but the one the podman line probes.
    let user_sockets: Vec<runtimes::UserSocket> =
        runtimes::user_sockets(&args.run_dir).into_iter().filter(|u| u.path != podman_socket).collect();
    let user_probes = probe_users(&user_sockets);
    let containerd_socket =
        runtimes::first_present(&runtimes::CONTAINERD_SOCKETS.iter().map(PathBuf::from).collect::<Vec<_>>());
    // A DOCKER_HOST bindtrace cannot use (tcp://...) is not probed: said on the docker line.
    let (docker_probe, podman_probe, containerd_probe, user_probes) = tokio::join!(
        async {
            match docker::docker_socket_path(args.docker_host.as_deref()) {
                Ok(path) => Ok(runtimes::probe_api(&path, runtimes::PROBE_TIMEOUT).await),
                Err(e) => Err(e),
            }
        },
        runtimes::probe_api(&podman_socket, runtimes::PROBE_TIMEOUT),
        async {
            match std::fs::symlink_metadata(&containerd_socket) {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    Some(Err(format!("cannot look: {e}")))
                }
                Err(_) => None,
                Ok(_) => Some(runtimes::probe_http2(&containerd_socket, runtimes::PROBE_TIMEOUT).await),
            }
        },
        user_probes,
    );

    let links = links::dump_links().map_err(|e| e.to_string());
    let bridge_names: Vec<String> =
        links.as_ref().map(|l| host::bridges(l).into_iter().map(|(n, _)| n).collect()).unwrap_or_default();
    let daemon =
        docker_probe.as_ref().ok().and_then(|p| Some((p.socket.display().to_string(), p.peer_pid()?)));
    let ns = namespaces::Facts::gather(daemon, bridge_names);
    checks.push(namespaces::pid_check(&ns));
    checks.push(namespaces::network_check(&ns));

    let other_runtime = podman_probe.answered()
        || matches!(containerd_probe, Some(Ok(())))
        || user_probes.iter().any(runtimes::ApiProbe::answered);
    checks.push(match &docker_probe {
        Ok(p) => runtimes::docker_check(p, other_runtime),
        Err(e) => Check::warn("docker", e.clone(), "--docker-host unix:///var/run/docker.sock"),
    });
    checks.push(runtimes::podman_check(&podman_probe));
    checks.extend(user_sockets.iter().zip(&user_probes).map(|(u, p)| runtimes::user_check(u, p)));
    let state_dir = args.containerd_state.as_path();
    let state = runtimes::containerd_state(state_dir);
    checks.push(runtimes::containerd_check(&containerd_socket, &containerd_probe, state_dir, state));

    let docker_answered = docker_probe.as_ref().is_ok_and(runtimes::ApiProbe::answered);
    checks.push(host::bridges_check(&links, docker_answered || podman_probe.answered()));
    checks.push(host::workloads_check(
        &[
            ("docker", docker_probe.as_ref().ok().and_then(runtimes::ApiProbe::containers)),
            ("podman", podman_probe.containers()),
        ],
        &links,
    ));
    checks.push(host::metrics_check((!args.no_metrics).then_some(args.metrics_addr)));
    let version = docker_probe.as_ref().ok().and_then(runtimes::ApiProbe::version);
    checks.push(kernel::platform_check(&kernel::PlatformFacts {
        release: &release,
        docker_platform: version.map(|v| v.platform.name.as_str()),
        docker_kernel: version.map(|v| v.kernel_version.as_str()),
    }));
    checks
}

/// Probes every user's socket at once (each bounded by its own timeouts).
async fn probe_users(sockets: &[runtimes::UserSocket]) -> Vec<runtimes::ApiProbe> {
    let tasks: Vec<_> = sockets
        .iter()
        .map(|u| {
            let path = u.path.clone();
            tokio::spawn(async move { runtimes::probe_api(&path, runtimes::PROBE_TIMEOUT).await })
        })
        .collect();
    let mut probes = Vec::with_capacity(tasks.len());
    for (task, u) in tasks.into_iter().zip(sockets) {
        probes.push(task.await.unwrap_or_else(|e| runtimes::ApiProbe {
            socket: u.path.clone(),
            outcome: runtimes::ApiOutcome::Unreachable(format!("probe failed: {e}")),
        }));
    }
    probes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every check runs wherever the unit tests run (no root needed), each exactly once, in a
    /// fixed order, so that the JSON form always has the same names.
    #[tokio::test]
    async fn every_check_has_one_line() {
        let args = DoctorArgs {
            format: Format::Json,
            docker_host: Some("/nonexistent/docker.sock".into()),
            metrics_addr: "127.0.0.1:1".parse().unwrap(),
            no_metrics: true,
            containerd_state: "/nonexistent/containerd-state".into(),
            run_dir: "/nonexistent/run".into(),
        };
        let names: Vec<&str> = checks(&args).await.iter().map(|c| c.name).collect();
        assert_eq!(names, CHECK_NAMES);
    }

    /// A TCP DOCKER_HOST is never dialled (no name resolution, no network): the line says why.
    #[tokio::test]
    async fn a_tcp_docker_host_is_refused_not_dialled() {
        let args = DoctorArgs {
            format: Format::Text,
            docker_host: Some("tcp://docker.example:2375".into()),
            metrics_addr: "127.0.0.1:1".parse().unwrap(),
            no_metrics: true,
            containerd_state: "/nonexistent/containerd-state".into(),
            run_dir: "/nonexistent/run".into(),
        };
        let checks = checks(&args).await;
        let docker = checks.iter().find(|c| c.name == "docker").unwrap();
        assert_eq!(docker.status, report::Status::Warn);
        assert!(docker.detail.contains("unix socket only"), "{}", docker.detail);
    }

    const CHECK_NAMES: [&str; 19] = [
        "kernel",
        "btf",
        "ebpf_object",
        "hooks",
        "lockdown",
        "cap_bpf",
        "cap_perfmon",
        "cap_net_admin",
        "cap_sys_admin",
        "cap_sys_ptrace",
        "pid_namespace",
        "network_namespace",
        "docker",
        "podman",
        "containerd",
        "bridges",
        "workloads",
        "metrics_port",
        "platform",
    ];
}
