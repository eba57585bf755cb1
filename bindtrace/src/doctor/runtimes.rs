//! The runtime sockets: Docker's and podman's Engine API (`GET /version`, then the running
//! containers), containerd's gRPC endpoint (the HTTP/2 preface, answered by the server's
//! SETTINGS frame). Every step has a short timeout of its own: a socket that accepts and
//! never answers costs doctor a few seconds, never a hang.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};

use crate::{doctor::report::Check, sources::docker::Client};

/// Each connect, request or reply gets this long.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) const PODMAN_SOCKETS: [&str; 1] = ["/run/podman/podman.sock"];
/// System containerd, then the one dockerd starts for itself when there is none.
pub(crate) const CONTAINERD_SOCKETS: [&str; 2] =
    ["/run/containerd/containerd.sock", "/var/run/docker/containerd/containerd.sock"];

/// `/version`: the fields doctor shows (Docker's and podman's compatible API alike).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct Version {
    pub(crate) version: String,
    pub(crate) api_version: String,
    pub(crate) kernel_version: String,
    pub(crate) platform: Platform,
    pub(crate) components: Vec<Component>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct Platform {
    pub(crate) name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct Component {
    pub(crate) name: String,
}

/// `/containers/json`: a running container and its ports.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct Summary {
    pub(crate) names: Vec<String>,
    pub(crate) ports: Vec<SummaryPort>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub(crate) struct SummaryPort {
    pub(crate) public_port: Option<u16>,
    #[serde(rename = "Type")]
    pub(crate) proto: String,
}

/// What an Engine API socket did.
#[derive(Debug, Clone)]
pub(crate) enum ApiOutcome {
    /// No file at the path.
    Absent,
    /// The path is there, but connecting or the request failed.
    Unreachable(String),
    /// Connected, but no reply within [`PROBE_TIMEOUT`].
    Silent,
    Answered {
        /// SO_PEERCRED's pid: 0 when the daemon is outside our pid namespace.
        peer_pid: Option<u32>,
        version: Version,
        /// None when the list did not come in time.
        containers: Option<Vec<Summary>>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct ApiProbe {
    pub(crate) socket: PathBuf,
    pub(crate) outcome: ApiOutcome,
}

impl ApiProbe {
    pub(crate) fn answered(&self) -> bool {
        matches!(self.outcome, ApiOutcome::Answered { .. })
    }
    /// The daemon's pid as SO_PEERCRED gave it (Some(0): outside our pid namespace).
    pub(crate) fn peer_pid(&self) -> Option<u32> {
        match &self.outcome {
            ApiOutcome::Answered { peer_pid, .. } => *peer_pid,
            _ => None,
        }
    }
    pub(crate) fn version(&self) -> Option<&Version> {
        match &self.outcome {
            ApiOutcome::Answered { version, .. } => Some(version),
            _ => None,
        }
    }
    pub(crate) fn containers(&self) -> Option<&[Summary]> {
        match &self.outcome {
            ApiOutcome::Answered { containers, .. } => containers.as_deref(),
            _ => None,
        }
    }
}

/// Connects (reading the peer's credentials), asks `/version`, then `/containers/json`.
pub(crate) async fn probe_api(socket: &Path, timeout: Duration) -> ApiProbe {
    let outcome = api_outcome(socket, timeout).await;
    ApiProbe { socket: socket.to_owned(), outcome }
}

async fn api_outcome(socket: &Path, timeout: Duration) -> ApiOutcome {
    if let Err(e) = std::fs::symlink_metadata(socket) {
        return match e.kind() {
            std::io::ErrorKind::PermissionDenied => ApiOutcome::Unreachable(format!("cannot look: {e}")),
            _ => ApiOutcome::Absent,
        };
    }
    let stream = match tokio::time::timeout(timeout, UnixStream::connect(socket)).await {
        Err(_) => return ApiOutcome::Silent,
        Ok(Err(e)) => return ApiOutcome::Unreachable(format!("cannot connect: {e}")),
        Ok(Ok(s)) => s,
    };
    // The pid may be unknown for other reasons than a pid namespace (no SO_PEERCRED): only a
    // reported 0 means "outside".
    let peer_pid = stream.peer_cred().ok().and_then(|c| c.pid()).map(|p| p.max(0) as u32);
    drop(stream);
    let client = Client::new(socket);
    let version = match tokio::time::timeout(timeout, client.get_json::<Version>("/version")).await {
        Err(_) => return ApiOutcome::Silent,
        Ok(Err(e)) => return ApiOutcome::Unreachable(e.to_string()),
        Ok(Ok(v)) => v,
    };
    let containers = tokio::time::timeout(timeout, client.get_json::<Vec<Summary>>("/containers/json"))
        .await
        .ok()
        .and_then(Result::ok);
    ApiOutcome::Answered { peer_pid, version, containers }
}

/// Whether an HTTP/2 server (containerd's gRPC) answers on `socket`: the client preface and an
/// empty SETTINGS frame out, the server's first frame, which must be SETTINGS, back. Nothing
/// more of HTTP/2 is needed to know it is alive, so no gRPC stack is pulled in for it.
pub(crate) async fn probe_http2(socket: &Path, timeout: Duration) -> Result<(), String> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // length 0, type 4 (SETTINGS), flags 0, stream 0.
    const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    let exchange = async {
        let mut s = UnixStream::connect(socket).await.map_err(|e| format!("cannot connect: {e}"))?;
        s.write_all(PREFACE).await.map_err(|e| e.to_string())?;
        s.write_all(&EMPTY_SETTINGS).await.map_err(|e| e.to_string())?;
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.map_err(|e| format!("no HTTP/2 reply: {e}"))?;
        if head[3] == 4 {
            Ok(())
        } else {
            Err(format!("the first frame is of type {}, not SETTINGS", head[3]))
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", timeout.as_secs_f32())))
}

/// The first of `paths` that exists or cannot be looked at (a directory we may not enter:
/// probing it then says so), else the first.
pub(crate) fn first_present(paths: &[PathBuf]) -> PathBuf {
    let there = |p: &&PathBuf| match std::fs::symlink_metadata(p) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
    };
    paths.iter().find(there).unwrap_or(&paths[0]).clone()
}

/// Podman's sockets: rootful, then this user's.
pub(crate) fn podman_sockets() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = PODMAN_SOCKETS.iter().map(PathBuf::from).collect();
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        v.push(Path::new(&dir).join("podman/podman.sock"));
    }
    v
}

/// Which engine serves a user's socket under `RUN/user/UID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UserEngine {
    /// `docker.sock`: `dockerd-rootless.sh` (RootlessKit).
    Docker,
    /// `podman/podman.sock`: the user's `podman system service`.
    Podman,
}

/// A user's runtime socket found under `RUN/user/UID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserSocket {
    pub(crate) uid: u32,
    pub(crate) engine: UserEngine,
    pub(crate) path: PathBuf,
}

/// Every user's rootless Docker and podman socket under `run_dir/user/UID` (each numeric
/// directory), those that are there, in uid order. A directory we may not look into is left
/// out: doctor then says it lacks privileges on the capability lines.
pub(crate) fn user_sockets(run_dir: &Path) -> Vec<UserSocket> {
    let Ok(entries) = std::fs::read_dir(run_dir.join("user")) else { return Vec::new() };
    let mut uids: Vec<u32> =
        entries.filter_map(Result::ok).filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    uids.sort_unstable();
    let mut found = Vec::new();
    for uid in uids {
        let dir = run_dir.join("user").join(uid.to_string());
        for (engine, path) in [
            (UserEngine::Docker, dir.join("docker.sock")),
            (UserEngine::Podman, dir.join("podman/podman.sock")),
        ] {
            if std::fs::symlink_metadata(&path).is_ok() {
                found.push(UserSocket { uid, engine, path });
            }
        }
    }
    found
}

/// A user's name from /etc/passwd (the uid's own name, as `id -nu` says), for the lines.
pub(crate) fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// The line of one user's socket: rootless Docker (`docker_rootless`) or podman
/// (`podman_rootless`), each with what to do when it does not answer.
pub(crate) fn user_check(socket: &UserSocket, probe: &ApiProbe) -> Check {
    let sock = probe.socket.display();
    let who = match user_name(socket.uid) {
        Some(name) => format!("user {name} (uid {})", socket.uid),
        None => format!("uid {}", socket.uid),
    };
    let (name, engine, start, restart) = match socket.engine {
        UserEngine::Docker => (
            "docker_rootless",
            "rootless Docker",
            "start it as that user (systemctl --user start docker, or dockerd-rootless.sh)",
            "restart that user's rootless dockerd (systemctl --user restart docker)",
        ),
        UserEngine::Podman => (
            "podman_rootless",
            "rootless podman",
            "start it as that user (podman system service --time=0, or systemctl --user start podman.socket)",
            "restart that user's podman API service",
        ),
    };
    let stale = "; or remove the socket if the session ended";
    match &probe.outcome {
        ApiOutcome::Absent => Check::skip(name, format!("{who}: no socket at {sock}")),
        ApiOutcome::Unreachable(e) if e.contains("ermission denied") => {
            Check::warn(name, format!("{who}, {engine}: {sock}: {e}"), "run bindtrace as root (sudo)")
        }
        ApiOutcome::Unreachable(e) => {
            Check::warn(name, format!("{who}, {engine}: {sock}: {e}"), format!("{start}{stale}"))
        }
        ApiOutcome::Silent => Check::warn(
            name,
            format!(
                "{who}, {engine}: {sock} accepts connections but sends no reply within {} s",
                PROBE_TIMEOUT.as_secs()
            ),
            restart,
        ),
        ApiOutcome::Answered { version, containers, .. } => {
            let running = match containers {
                Some(c) => format!(", {} running containers", c.len()),
                None => String::new(),
            };
            Check::ok(
                name,
                format!(
                    "{who}, {engine}: {sock}: {} (API {}){running}",
                    version.version, version.api_version
                ),
            )
        }
    }
}

/// The Docker line. `other_runtime` says whether podman or containerd answered, which makes a
/// missing Docker nothing to fix.
pub(crate) fn docker_check(probe: &ApiProbe, other_runtime: bool) -> Check {
    const NAME: &str = "docker";
    let sock = probe.socket.display();
    let remedy = format!(
        "start Docker, or point --docker-host at its socket; in a container mount it: -v {sock}:{sock}:ro"
    );
    match &probe.outcome {
        ApiOutcome::Absent if other_runtime => Check::skip(NAME, format!("no socket at {sock}")),
        ApiOutcome::Absent => Check::warn(
            NAME,
            format!(
                "no socket at {sock}: lines will lack container names and published ports, and no audit runs"
            ),
            remedy,
        ),
        ApiOutcome::Unreachable(e) => Check::warn(
            NAME,
            format!("{sock}: {e}"),
            if e.contains("ermission denied") { "run bindtrace as root (sudo)".to_owned() } else { remedy },
        ),
        ApiOutcome::Silent => Check::warn(
            NAME,
            format!("{sock} accepts connections but sends no reply within {} s", PROBE_TIMEOUT.as_secs()),
            "the daemon is stuck or the socket is not Docker's: restart dockerd, or check --docker-host",
        ),
        ApiOutcome::Answered { version, .. } => {
            Check::ok(NAME, format!("{sock}: Docker {} (API {})", version.version, version.api_version))
        }
    }
}

pub(crate) fn podman_check(probe: &ApiProbe) -> Check {
    const NAME: &str = "podman";
    let sock = probe.socket.display();
    match &probe.outcome {
        ApiOutcome::Absent => Check::skip(NAME, format!("no socket at {sock}")),
        ApiOutcome::Unreachable(e) => {
            Check::warn(NAME, format!("{sock}: {e}"), "start it: podman system service --time=0")
        }
        ApiOutcome::Silent => Check::warn(
            NAME,
            format!("{sock} sends no reply within {} s", PROBE_TIMEOUT.as_secs()),
            "restart podman's API service",
        ),
        ApiOutcome::Answered { version, .. } => Check::ok(
            NAME,
            format!("{sock}: Podman {} (Docker-compatible API {})", version.version, version.api_version),
        ),
    }
}

/// What bindtrace reads of containerd: its task state directory (`sources::containerd`), as
/// the workloads found there outside Docker's own `moby` namespace, and how many are pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContainerdState {
    pub(crate) workloads: usize,
    pub(crate) pods: usize,
}

/// Reads containerd's state directory as the daemon does; None when it does not exist.
pub(crate) fn containerd_state(dir: &Path) -> Option<ContainerdState> {
    use crate::sources::containerd::{state, workloads};
    if !dir.is_dir() {
        return None;
    }
    let found = workloads::group(&state::read(dir).tasks);
    Some(ContainerdState { workloads: found.len(), pods: found.iter().filter(|c| c.pod.is_some()).count() })
}

pub(crate) fn containerd_check(
    socket: &Path,
    probe: &Option<Result<(), String>>,
    state_dir: &Path,
    state: Option<ContainerdState>,
) -> Check {
    const NAME: &str = "containerd";
    let sock = socket.display();
    // The socket says whether containerd runs; the state directory is what bindtrace reads.
    let read = match state {
        Some(s) => format!(
            "; {}: {} outside Docker's own (nerdctl, ctr, Kubernetes), {} of them pods",
            state_dir.display(),
            if s.workloads == 1 { "1 workload".to_string() } else { format!("{} workloads", s.workloads) },
            s.pods
        ),
        None => format!("; no task state directory at {}", state_dir.display()),
    };
    match probe {
        None if state.is_none() => Check::skip(NAME, format!("no socket at {sock}{read}")),
        None => Check::ok(NAME, format!("no socket at {sock}{read}")),
        Some(Ok(())) => Check::ok(NAME, format!("{sock} answers gRPC (HTTP/2){read}")),
        Some(Err(e)) => {
            Check::warn(NAME, format!("{sock}: {e}{read}"), "run as root; check that containerd runs")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::report::Status;

    fn socket_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bindtrace-doctor-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("s.sock")
    }

    /// A socket that accepts and never answers must end in `Silent`, not hang the probe.
    #[tokio::test]
    async fn a_silent_socket_does_not_hang_the_probes() {
        let path = socket_path("silent");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            loop {
                let (c, _) = listener.accept().await.unwrap();
                conns.push(c);
            }
        });
        let short = Duration::from_millis(200);
        let probe = probe_api(&path, short).await;
        assert!(matches!(probe.outcome, ApiOutcome::Silent), "{:?}", probe.outcome);
        assert_eq!(docker_check(&probe, false).status, Status::Warn);
        assert!(probe_http2(&path, short).await.unwrap_err().contains("no answer"));
        held.abort();
    }

    #[tokio::test]
    async fn absent_and_refused_sockets() {
        let path = socket_path("absent");
        let probe = probe_api(&path, PROBE_TIMEOUT).await;
        assert!(matches!(probe.outcome, ApiOutcome::Absent));
        assert_eq!(docker_check(&probe, false).status, Status::Warn);
        assert_eq!(docker_check(&probe, true).status, Status::Skip);
        assert_eq!(podman_check(&probe).status, Status::Skip);
        // A socket file nobody listens on any more refuses the connection.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let probe = probe_api(&path, PROBE_TIMEOUT).await;
        assert!(
            matches!(&probe.outcome, ApiOutcome::Unreachable(e) if e.contains("cannot connect")),
            "{:?}",
            probe.outcome
        );
    }

    /// Each user's sockets under RUN/user/UID, both engines, numeric directories only; a
    /// socket that hangs or whose daemon is gone is a warning naming it and the user's remedy.
    #[tokio::test]
    async fn each_users_sockets_get_a_line() {
        let run = socket_path("users").with_file_name("run");
        std::fs::create_dir_all(run.join("user/4241/podman")).unwrap();
        std::fs::create_dir_all(run.join("user/4242")).unwrap();
        std::fs::create_dir_all(run.join("user/not-a-uid")).unwrap();
        std::fs::write(run.join("user/not-a-uid/docker.sock"), "").unwrap();
        let hung = tokio::net::UnixListener::bind(run.join("user/4242/docker.sock")).unwrap();
        drop(std::os::unix::net::UnixListener::bind(run.join("user/4241/podman/podman.sock")).unwrap());
        let found = user_sockets(&run);
        let got: Vec<(u32, UserEngine)> = found.iter().map(|u| (u.uid, u.engine)).collect();
        assert_eq!(got, [(4241, UserEngine::Podman), (4242, UserEngine::Docker)]);
        let short = Duration::from_millis(200);
        let dead = user_check(&found[0], &probe_api(&found[0].path, short).await);
        assert_eq!((dead.name, dead.status), ("podman_rootless", Status::Warn), "{dead:?}");
        assert!(dead.detail.contains("uid 4241") && dead.detail.contains("cannot connect"), "{dead:?}");
        assert!(dead.remedy.as_deref().unwrap().contains("podman system service"), "{dead:?}");
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            loop {
                conns.push(hung.accept().await.unwrap());
            }
        });
        let silent = user_check(&found[1], &probe_api(&found[1].path, short).await);
        held.abort();
        assert_eq!((silent.name, silent.status), ("docker_rootless", Status::Warn), "{silent:?}");
        assert!(silent.detail.contains("4242/docker.sock accepts connections"), "{silent:?}");
        assert!(silent.remedy.as_deref().unwrap().contains("rootless dockerd"), "{silent:?}");
        let _ = std::fs::remove_dir_all(run.parent().unwrap());
    }

    /// A server that answers HTTP/1.1 to the preface is not taken for containerd.
    #[tokio::test]
    async fn an_http1_server_is_not_http2() {
        let path = socket_path("http1");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = c.read(&mut buf).await;
            c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await.unwrap();
        });
        let err = probe_http2(&path, PROBE_TIMEOUT).await.unwrap_err();
        assert!(err.contains("not SETTINGS"), "{err}");
        server.await.unwrap();
    }

    #[test]
    fn version_fields_of_docker_and_podman() {
        let docker: Version = serde_json::from_str(
            r#"{"Platform":{"Name":""},"Version":"20.10.24+dfsg1","ApiVersion":"1.41","KernelVersion":"6.18.44"}"#,
        )
        .unwrap();
        assert_eq!((docker.version.as_str(), docker.kernel_version.as_str()), ("20.10.24+dfsg1", "6.18.44"));
        let podman: Version =
            serde_json::from_str(r#"{"Components":[{"Name":"Podman Engine"}],"Version":"4.3.1"}"#).unwrap();
        assert_eq!(podman.components[0].name, "Podman Engine");
        let list: Vec<Summary> = serde_json::from_str(
            r#"[{"Names":["/web"],"Ports":[{"PrivatePort":80,"PublicPort":8080,"Type":"tcp"},{"PrivatePort":81,"Type":"tcp"}]}]"#,
        )
        .unwrap();
        assert_eq!(list[0].ports[0].public_port, Some(8080));
        assert_eq!(list[0].ports[1].public_port, None);
    }
}
