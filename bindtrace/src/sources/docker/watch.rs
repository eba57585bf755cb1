//! Following the daemon: a task that keeps an [`Inventory`] current from `/events` and
//! publishes it on a `watch` channel.
//!
//! The event stream is opened *before* the full read, so nothing that happens in between is
//! missed (an event for something the read already saw is harmless: it is re-read). When the
//! daemon goes away (the socket closes, a request fails) the task warns once, publishes
//! [`DockerState::Down`] with the last inventory, and retries until the daemon is back.
use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};

use super::{Client, DockerError, Inventory, api::EventJson, refresh_container, refresh_networks, snapshot};
use crate::bounds;

/// Pause between attempts while the daemon is unreachable.
pub(crate) const RETRY: Duration = Duration::from_secs(1);

/// Container and network events that change what bindtrace knows.
const EVENT_FILTER: &str = r#"{"type":["container","network"],"event":["start","die","destroy","rename","create","connect","disconnect","remove","unpause"]}"#;

#[derive(Debug, Clone)]
pub(crate) enum DockerState {
    /// Not known yet (the first attempt is under way).
    Connecting,
    Up(Arc<Inventory>),
    /// The daemon cannot be reached; `last` is what it said before (None if never reached).
    Down {
        last: Option<Arc<Inventory>>,
        error: String,
    },
}

impl DockerState {
    pub(crate) fn inventory(&self) -> Option<&Arc<Inventory>> {
        match self {
            DockerState::Up(inv) => Some(inv),
            DockerState::Down { last, .. } => last.as_ref(),
            DockerState::Connecting => None,
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        matches!(self, DockerState::Up(_))
    }

    /// Every engine has answered or failed at least once (what start-up waits for, within a
    /// bound, so that the first audits and the ready line include a slower engine's containers).
    pub(crate) fn settled(&self) -> bool {
        match self {
            DockerState::Connecting => false,
            DockerState::Up(inv) => !inv.pending,
            DockerState::Down { .. } => true,
        }
    }
}

/// Publishes the merged state of `parts`, the followers (each engine's, containerd's state
/// directory), each on its own channel (at least one; the one channel itself when there is
/// one and no `appearing`): up while any is up (one that is down contributes its last
/// inventory, marked stale), down when all are, connecting until one has answered or failed.
/// Each follower warns and retries on its own, so one that hangs or dies does not hold up the
/// others.
///
/// `appearing` sends sockets that appear after start ([`super::appear`]): each gets a follower
/// of its own, merged with the others from then on.
pub(crate) fn merge_all(
    mut parts: Vec<watch::Receiver<DockerState>>,
    appearing: Option<mpsc::UnboundedReceiver<PathBuf>>,
) -> watch::Receiver<DockerState> {
    if parts.len() == 1 && appearing.is_none() {
        return parts.remove(0);
    }
    let (tx, rx) = watch::channel(DockerState::Connecting);
    tokio::spawn(merge(parts, tx, appearing));
    rx
}

async fn merge(
    mut parts: Vec<watch::Receiver<DockerState>>,
    tx: watch::Sender<DockerState>,
    mut appearing: Option<mpsc::UnboundedReceiver<PathBuf>>,
) {
    loop {
        let states: Vec<DockerState> = parts.iter_mut().map(|r| r.borrow_and_update().clone()).collect();
        tx.send_replace(merged(&states));
        // Whichever engine changes next, or a new socket; a follower never ends while `tx` has
        // receivers.
        tokio::select! {
            changed = first_changed(&mut parts) => if !changed {
                return;
            },
            socket = next_socket(&mut appearing) => match socket {
                Some(path) => {
                    log::info!("{} appeared: following it", path.display());
                    parts.push(spawn(Client::new(path)));
                }
                // The watcher is gone (it said why): the engines followed so far go on.
                None => appearing = None,
            },
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// The next socket that appeared; pending for ever without a watcher.
async fn next_socket(appearing: &mut Option<mpsc::UnboundedReceiver<PathBuf>>) -> Option<PathBuf> {
    match appearing {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits until one of `parts` changes; false when its sender is gone.
async fn first_changed(parts: &mut [watch::Receiver<DockerState>]) -> bool {
    use std::task::Poll;
    let mut changes: Vec<_> = parts.iter_mut().map(|r| Box::pin(r.changed())).collect();
    std::future::poll_fn(|cx| {
        for c in changes.iter_mut() {
            if let Poll::Ready(r) = c.as_mut().poll(cx) {
                return Poll::Ready(r.is_ok());
            }
        }
        Poll::Pending
    })
    .await
}

fn merged(states: &[DockerState]) -> DockerState {
    let any_up = states.iter().any(DockerState::is_up);
    let inventories: Vec<Inventory> = states
        .iter()
        .filter_map(|s| match s {
            DockerState::Up(inv) => Some((**inv).clone()),
            DockerState::Down { last: Some(inv), .. } => Some(inv.as_stale()),
            _ => None,
        })
        .collect();
    if any_up {
        let mut inv = Inventory::merged(&inventories);
        inv.pending = states.iter().any(|s| matches!(s, DockerState::Connecting));
        return DockerState::Up(Arc::new(inv));
    }
    if states.iter().all(|s| matches!(s, DockerState::Connecting)) {
        return DockerState::Connecting;
    }
    if states.iter().any(|s| matches!(s, DockerState::Connecting)) && inventories.is_empty() {
        // One engine still connecting, the others down with nothing to say: wait for it.
        return DockerState::Connecting;
    }
    let error = states
        .iter()
        .filter_map(|s| match s {
            DockerState::Down { error, .. } => Some(error.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("; ");
    let last = (!inventories.is_empty()).then(|| Arc::new(Inventory::merged(&inventories)));
    DockerState::Down { last, error }
}

/// Starts following the daemon at `client` on the current tokio runtime.
pub(crate) fn spawn(client: Client) -> watch::Receiver<DockerState> {
    let (tx, rx) = watch::channel(DockerState::Connecting);
    tokio::spawn(follow(client, tx));
    rx
}

async fn follow(client: Client, tx: watch::Sender<DockerState>) {
    let mut warned = false;
    let mut last: Option<Arc<Inventory>> = None;
    loop {
        let error = session(&client, &tx, &mut warned, &mut last).await;
        if tx.is_closed() {
            return;
        }
        if !warned {
            log::warn!(
                "Docker API at {} unavailable ({error}); reporting containers by namespace and address \
                 until it answers again (retrying every {}s)",
                client.socket().display(),
                RETRY.as_secs()
            );
            warned = true;
        } else {
            log::debug!("Docker API still unavailable: {error}");
        }
        tx.send_replace(DockerState::Down { last: last.clone(), error: error.to_string() });
        tokio::time::sleep(RETRY).await;
    }
}

/// One connected period: returns why it ended.
async fn session(
    client: &Client,
    tx: &watch::Sender<DockerState>,
    warned: &mut bool,
    last: &mut Option<Arc<Inventory>>,
) -> DockerError {
    let path = format!("/events?filters={}", super::http::encode_query(EVENT_FILTER));
    let mut events = match client.stream(&path).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let mut inv = match snapshot(client).await {
        Ok(inv) => inv,
        Err(e) => return e,
    };
    if *warned {
        log::info!("Docker API at {} is back: container details resume", client.socket().display());
        *warned = false;
    }
    log::info!(
        "{}: {} running containers, bridges {}",
        inv.runtime.title(),
        inv.containers.len(),
        inv.bridges().join(", ")
    );
    publish(tx, last, &inv);
    let mut skipped = 0u64;
    loop {
        let event: EventJson = match events.next().await {
            Ok(Some(e)) => e,
            Ok(None) => {
                // Too large to take in: whatever it changed is read afresh instead.
                skipped += 1;
                if skipped.is_power_of_two() {
                    log::warn!(
                        "skipped {skipped} Docker events over {} KiB since connecting (huge image labels?); \
                         re-reading the containers instead",
                        bounds::EVENT_BYTES / 1024
                    );
                }
                match snapshot(client).await {
                    Ok(fresh) => inv = fresh,
                    Err(e) => return e,
                }
                publish(tx, last, &inv);
                continue;
            }
            Err(e) => return e,
        };
        if let Err(e) = apply(client, &mut inv, &event).await {
            return e;
        }
        publish(tx, last, &inv);
    }
}

fn publish(tx: &watch::Sender<DockerState>, last: &mut Option<Arc<Inventory>>, inv: &Inventory) {
    if last.as_deref() == Some(inv) && tx.borrow().is_up() {
        return;
    }
    let inv = Arc::new(inv.clone());
    *last = Some(inv.clone());
    tx.send_replace(DockerState::Up(inv));
}

async fn apply(client: &Client, inv: &mut Inventory, ev: &EventJson) -> Result<(), DockerError> {
    log::debug!("Docker event: {} {} {}", ev.kind, ev.action, ev.actor.id);
    match (ev.kind.as_str(), ev.action.as_str()) {
        ("container", "destroy") => {
            inv.containers.remove(&ev.actor.id);
        }
        ("container", _) => refresh_container(client, inv, &ev.actor.id).await?,
        ("network", "connect" | "disconnect") => {
            refresh_networks(client, inv).await?;
            if let Some(c) = ev.attribute("container") {
                refresh_container(client, inv, c).await?;
            }
        }
        ("network", _) => refresh_networks(client, inv).await?,
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(id: &str) -> Arc<Inventory> {
        let mut inv = Inventory::default();
        inv.networks
            .insert(id.into(), super::super::Network { id: id.into(), bridge: Some(format!("br-{id}")) });
        Arc::new(inv)
    }

    #[test]
    fn merged_states() {
        let down = |last: Option<Arc<Inventory>>| DockerState::Down { last, error: "gone".into() };
        let up = merged(&[DockerState::Up(inv("a")), down(Some(inv("b")))]);
        let DockerState::Up(m) = &up else { panic!("{up:?}") };
        assert_eq!(m.bridges(), vec!["br-a", "br-b"]);
        assert!(m.stale, "a part that is down is its last word");
        let up = merged(&[DockerState::Up(inv("a")), DockerState::Connecting]);
        assert!(matches!(&up, DockerState::Up(m) if !m.stale));
        assert!(!up.settled(), "one engine has not answered yet");
        assert!(merged(&[DockerState::Up(inv("a")), down(None)]).settled());
        assert!(matches!(merged(&[DockerState::Connecting, down(None)]), DockerState::Connecting));
        let all_down = merged(&[down(None), down(Some(inv("b")))]);
        assert!(matches!(&all_down, DockerState::Down { last: Some(m), .. } if m.stale), "{all_down:?}");
        assert!(matches!(merged(&[down(None), down(None)]), DockerState::Down { last: None, .. }));
    }
}
