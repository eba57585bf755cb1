//! Following the daemon: a task that keeps an [`Inventory`] current from `/events` and
//! publishes it on a `watch` channel.
//!
//! The event stream is opened *before* the full read, so nothing that happens in between is
//! missed (an event for something the read already saw is harmless: it is re-read). When the
//! daemon goes away (the socket closes, a request fails) the task warns once, publishes
//! [`DockerState::Down`] with the last inventory, and retries until the daemon is back.
use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

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
    log::info!("Docker: {} running containers, bridges {}", inv.containers.len(), inv.bridges().join(", "));
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
