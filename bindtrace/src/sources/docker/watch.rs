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

/// First and longest pause before reading again the containers whose inspect timed out
/// ([`Inventory::unread`]): doubled after each read that still leaves some unread.
const UNREAD_RETRY_FIRST: Duration = Duration::from_secs(1);
const UNREAD_RETRY_MAX: Duration = Duration::from_secs(30);

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
    let mut unread = UnreadRetry::default();
    loop {
        unread.arm(&inv);
        // `next` is cancel-safe (its only wait is for the next body frame), so a retry that
        // fires first loses no part of an event.
        let next = tokio::select! {
            next = events.next() => next,
            () = unread.due() => {
                if let Err(e) = unread.read_again(client, &mut inv).await {
                    return e;
                }
                publish(tx, last, &inv);
                continue;
            }
        };
        let event: EventJson = match next {
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

/// The backoff over [`Inventory::unread`]: a container stuck in an inspect (dockerd waits for
/// its lock) would otherwise stay unnamed until its next event, which a steadily running
/// container never has.
#[derive(Default)]
struct UnreadRetry {
    at: Option<tokio::time::Instant>,
    pause: Option<Duration>,
    warned: bool,
}

impl UnreadRetry {
    /// Starts the clock when containers became unread; forgets the backoff when none are.
    fn arm(&mut self, inv: &Inventory) {
        if inv.unread.is_empty() {
            *self = UnreadRetry { warned: self.warned, ..Default::default() };
        } else if self.at.is_none() {
            let pause = self.pause.unwrap_or(UNREAD_RETRY_FIRST);
            self.at = Some(tokio::time::Instant::now() + pause);
            self.pause = Some(pause);
            if !self.warned {
                log::warn!(
                    "Docker did not describe container {} within {}s (busy with it, e.g. a stop in \
                     progress); naming it by namespace and address meanwhile, reading it again with \
                     backoff up to {}s",
                    short(inv.unread.iter().next().map_or("", String::as_str)),
                    super::http::REQUEST_TIMEOUT.as_secs(),
                    UNREAD_RETRY_MAX.as_secs()
                );
                self.warned = true;
            }
        }
    }

    /// When the next read is due; never while nothing is unread.
    async fn due(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Reads each unread container again; the next pause doubles while some stay unread.
    async fn read_again(&mut self, client: &Client, inv: &mut Inventory) -> Result<(), DockerError> {
        let ids: Vec<String> = inv.unread.iter().cloned().collect();
        for id in &ids {
            refresh_container(client, inv, id).await?;
            if !inv.unread.contains(id) {
                log::info!("Docker described container {} now: it is named again", short(id));
            }
        }
        self.at = None;
        self.pause = self.pause.map(|p| (p * 2).min(UNREAD_RETRY_MAX));
        Ok(())
    }
}

/// A container id as `docker ps` shows it, escaped (it is the daemon's data).
fn short(id: &str) -> std::borrow::Cow<'_, str> {
    crate::sinks::escape::escaped(id.get(..12).unwrap_or(id))
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

    /// A daemon that answers everything at once except the first inspect of container `abc`,
    /// which it holds unanswered: the container is named once the backoff reads it again,
    /// with no event for it. (dockerd cannot be made to hold an inspect on demand.)
    #[test]
    fn a_container_whose_inspect_timed_out_is_read_again_without_an_event() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = std::env::temp_dir().join(format!("bindtrace-unread-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("docker.sock");
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async {
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            tokio::spawn(async move {
                let mut held = Vec::new();
                let mut inspects = 0;
                while let Ok((mut s, _)) = listener.accept().await {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&req).lines().next().unwrap_or("").to_string();
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    let body = if path.starts_with("/events") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                            .await;
                        held.push(s);
                        continue;
                    } else if path == "/version" {
                        r#"{"Version":"20.10.24","ApiVersion":"1.41"}"#.to_string()
                    } else if path == "/networks" {
                        "[]".to_string()
                    } else if path == "/containers/json" {
                        r#"[{"Id":"abc"}]"#.to_string()
                    } else if path == "/containers/abc/json" {
                        inspects += 1;
                        if inspects == 1 {
                            held.push(s);
                            continue;
                        }
                        r#"{"Id":"abc","Name":"/stuck","State":{"Status":"running","Running":true,"Pid":0},"Config":{},"NetworkSettings":{}}"#.to_string()
                    } else {
                        String::new()
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                }
            });
            let mut rx = spawn(Client::new(&path));
            // Virtual time: ten minutes pass at once when nothing else can happen.
            let named = tokio::time::timeout(
                Duration::from_secs(600),
                rx.wait_for(|st| st.inventory().is_some_and(|inv| inv.containers.contains_key("abc"))),
            )
            .await
            .expect("named within ten minutes of its inspect timing out, with no event for it")
            .expect("the watcher keeps running");
            let inv = named.inventory().unwrap().clone();
            assert!(inv.unread.is_empty(), "{:?}", inv.unread);
            assert_eq!(inv.containers["abc"].name, "stuck");
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

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
