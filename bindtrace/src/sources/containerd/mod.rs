//! containerd: nerdctl containers, Kubernetes pods and bare `ctr` tasks, read from the runtime
//! v2 shim's state directory (no API: the CRI gRPC API would need a client and a socket
//! bindtrace does not otherwise speak, and `ctr`/nerdctl tasks are not in it).
//!
//! Each running task has `<state dir>/<namespace>/<id>/` with the OCI spec (`config.json`,
//! whose annotations say what the task is) and `init.pid`. The directory is followed with
//! inotify ([`inotify`]); each change re-reads it whole ([`state`]) and groups the tasks into
//! one workload per network namespace ([`workloads`]), published on the same channel as an
//! engine's inventory, so that the rest of bindtrace names them like containers.
pub(crate) mod inotify;
pub(crate) mod state;
pub(crate) mod workloads;

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::sources::docker::{Inventory, Runtime, watch::DockerState};

/// Where containerd 1.x and 2.x keep the runtime v2 shims' task bundles.
pub(crate) const DEFAULT_STATE_DIR: &str = "/run/containerd/io.containerd.runtime.v2.task";

/// Changes come in bursts (a task's directory, then its spec, then its pid file): wait this
/// long after the first before reading.
const SETTLE: Duration = Duration::from_millis(20);

/// Follows `dir` on the current tokio runtime. The state is up from the first read on (an
/// absent directory is no containerd yet, not an error: it is followed until it appears).
pub(crate) fn spawn(dir: PathBuf) -> watch::Receiver<DockerState> {
    let (tx, rx) = watch::channel(DockerState::Connecting);
    tokio::spawn(follow(dir, tx));
    rx
}

async fn follow(dir: PathBuf, tx: watch::Sender<DockerState>) {
    let mut watcher = match inotify::Watcher::new("containerd") {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!("containerd: no inotify ({e}): its tasks are read once, at start");
            None
        }
    };
    let mut last: Option<Inventory> = None;
    loop {
        let read_dir = dir.clone();
        let scan = tokio::task::spawn_blocking(move || state::read(&read_dir)).await;
        let tasks = match scan {
            Ok(t) => t,
            Err(e) => {
                log::warn!("containerd: reading {}: {e}", dir.display());
                Default::default()
            }
        };
        if let Some(w) = watcher.as_mut() {
            w.watch_tree(&dir, &tasks.dirs);
        }
        let inv = Inventory {
            runtime: Runtime::Containerd,
            containers: workloads::group(&tasks.tasks)
                .into_iter()
                .map(|c| (c.id.clone(), Arc::new(c)))
                .collect(),
            ..Default::default()
        };
        if last.as_ref() != Some(&inv) {
            let before = last.as_ref().map(|l| l.containers.len());
            if before != Some(inv.containers.len()) {
                // None at start and none since is every Docker-only host: not for the summary.
                if inv.containers.is_empty() && before.unwrap_or(0) == 0 {
                    log::debug!("containerd: no workloads in {}", dir.display());
                } else {
                    log::info!("containerd: {} workloads in {}", inv.containers.len(), dir.display());
                }
            }
            tx.send_replace(DockerState::Up(Arc::new(inv.clone())));
            last = Some(inv);
        }
        let Some(w) = watcher.as_mut() else { return };
        tokio::select! {
            r = w.changed() => if let Err(e) = r {
                log::warn!("containerd: inotify failed ({e}): its tasks are no longer followed");
                watcher = None;
                continue;
            },
            () = tx.closed() => return,
        }
        tokio::time::sleep(SETTLE).await;
        w.drain();
    }
}
