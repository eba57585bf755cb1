//! One entry per fuzz target (`fuzz/`), each feeding outside bytes to the real parser and
//! checking what can be checked of its answer: no panic, output bounded, printed text clean.
//! The corpus replay test (`fuzzing::tests`) calls the same entries, so CI replays every input
//! the fuzzer kept without the fuzz toolchain. Not an API: hidden from the docs.
use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixListener,
    path::PathBuf,
    sync::OnceLock,
};

use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_sock_diag::SockDiagMessage;

use crate::{
    bounds,
    diagnose::{framework, listeners, procfs},
    kernel::{btf::Btf, layout::KernelLayout, sock_layout::SockLayout},
    netlink::Messages,
    netns::links,
    sinks::escape,
    sources::{
        conntrack,
        docker::{
            self,
            api::{ContainerJson, EventJson, NetworkJson},
            http::{Client, EventLines, Line},
        },
    },
};

/// A fuzz target's entry.
pub type Entry = fn(&[u8]);

/// The targets, by the name `./x fuzz` and `fuzz/corpus/<name>` use.
pub const TARGETS: &[(&str, Entry)] = &[
    ("btf", btf),
    ("sanitiser", sanitiser),
    ("docker_events", docker_events),
    ("docker_http", docker_http),
    ("docker_json", docker_json),
    ("netlink_route", netlink_route),
    ("conntrack", conntrack),
    ("sock_diag", sock_diag),
    ("proc_files", proc_files),
    ("hint_argv", hint_argv),
];

/// A BTF blob (what /sys/kernel/btf/vmlinux holds): parse it, then resolve everything the
/// loader resolves and the lookups that walk typedefs, prototypes and enums.
pub fn btf(data: &[u8]) {
    let Ok(btf) = Btf::from_bytes(data) else { return };
    let _ = KernelLayout::resolve(&btf);
    let _ = SockLayout::resolve(&btf);
    // Names the seed blobs use, so mutations of their types reach these lookups.
    for path in ["outer.in.c", "outer.y", "looped.m", "has_fp.fp", "a.b", "a.b.c"] {
        let _ = btf.member(path);
    }
    for (e, v) in [("color", "RED"), ("big", "HUGE"), ("a", "b")] {
        let _ = btf.enum_value(e, v);
    }
    for typedef in ["btf_trace_x", "loop_a", "a"] {
        if let Ok(params) = btf.func_proto_params(typedef) {
            let bytes: usize = params.iter().map(String::len).sum();
            // Rendering visits a bounded number of types, each named by at most the blob.
            assert!(
                bytes <= 4096 * (data.len() + 32),
                "{bytes} bytes of parameters from {} bytes",
                data.len()
            );
        }
    }
}

/// Text a tenant controls, as the text sink prints it: one line, nothing a terminal acts on
/// or hides, and a field that cannot pass for two.
pub fn sanitiser(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    for out in [escape::escaped(&s), escape::field(&s)] {
        assert!(!out.chars().any(|c| escape::needs_escape(c) || c == '\n'), "unescaped character in {out:?}");
        // Each character grows to `\u{10ffff}` at most.
        assert!(out.len() <= 12 * s.len() + 2);
    }
    let f = escape::field(&s);
    let splits_on_space = f.chars().any(char::is_whitespace);
    assert!(
        !splits_on_space || (f.starts_with('"') && f.ends_with('"') && f.len() >= 2),
        "field with white space not quoted: {f:?}"
    );
}

/// A Docker `/events` stream body, in chunks split at NUL bytes, through the line splitter
/// of the real client and the event decoder. Every line taken in is within the event bound.
pub fn docker_events(data: &[u8]) {
    let mut lines = EventLines::default();
    for chunk in data.split(|&b| b == 0) {
        lines.push(chunk);
        while let Some(line) = lines.next_line() {
            if let Line::Value(line) = line {
                assert!(line.len() <= bounds::EVENT_BYTES + 1, "a {}-byte event was taken in", line.len());
                if let Ok(e) = serde_json::from_slice::<EventJson>(line.trim_ascii()) {
                    let _ = e.attribute("container");
                }
            }
        }
    }
}

/// A whole HTTP response from the Docker socket, to a JSON request and to the event stream.
pub fn docker_http(data: &[u8]) {
    with_reply(data, |client| async move {
        let _ = client.get_json::<ContainerJson>("/containers/x/json").await;
    });
    with_reply(data, |client| async move {
        if let Ok(mut stream) = client.stream("/events").await {
            while let Ok(Some(_)) = stream.next::<EventJson>().await {}
        }
    });
}

/// Docker API documents: a container inspect, a network and an event, and the inventory
/// entry made of the first. Names, images and labels stay within their bound.
pub fn docker_json(data: &[u8]) {
    if let Ok(c) = serde_json::from_slice::<ContainerJson>(data) {
        let c = c.into_container(crate::sources::docker::Runtime::Docker);
        for label in [Some(&c.name), Some(&c.image), c.compose_project.as_ref(), c.compose_service.as_ref()]
            .into_iter()
            .flatten()
        {
            assert!(label.len() <= bounds::LABEL_BYTES, "{}-byte label kept", label.len());
        }
        let _ = c.short_id();
        let _ = c.address();
    }
    if let Ok(n) = serde_json::from_slice::<NetworkJson>(data) {
        let _ = docker::api::bridge_name(&n);
    }
    if let Ok(e) = serde_json::from_slice::<EventJson>(data) {
        let _ = e.attribute("container");
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = docker::socket_path(Some(s));
    }
}

/// An rtnetlink datagram: the links of a dump or a notification.
pub fn netlink_route(data: &[u8]) {
    for msg in Messages::new(data).map_while(Result::ok) {
        assert!(msg.header.length as usize <= data.len());
        if let Some(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l))) =
            msg.decode::<RouteNetlinkMessage>()
            && let Some(link) = links::parse_link(l)
        {
            assert!(link.name.len() <= data.len());
        }
    }
}

/// A ctnetlink event datagram, as the conntrack watcher reads it.
pub fn conntrack(data: &[u8]) {
    for msg in Messages::new(data).map_while(Result::ok) {
        if let Some(flow) = conntrack::destroyed_flow(&msg) {
            let _ = flow.is_dnat();
        }
    }
}

/// A sock_diag dump reply datagram.
pub fn sock_diag(data: &[u8]) {
    for msg in Messages::new(data).map_while(Result::ok) {
        if let Some(NetlinkPayload::InnerMessage(m)) = msg.decode::<SockDiagMessage>() {
            let _ = listeners::sock_diag::parse(&m);
        }
    }
}

/// The /proc files bindtrace reads: the first byte picks net/tcp(6), stat, status or cmdline.
pub fn proc_files(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    match which % 4 {
        0 => {
            let found = listeners::proc_net::parse_tcp(&text);
            assert!(found.len() <= text.lines().count());
        }
        1 => {
            let _ = procfs::parse_start_time(&text);
        }
        2 => {
            let _ = procfs::parse_nspid(&text);
        }
        _ => {
            let argv = procfs::split_cmdline(rest);
            assert!(argv.iter().all(|a| !a.is_empty() && !a.contains('\0')));
        }
    }
}

/// A listener's command line (NUL-separated, as /proc/PID/cmdline; the first word doubles as
/// the executable's name): the server-specific fix and the hint line quoting it.
pub fn hint_argv(data: &[u8]) {
    let argv = procfs::split_cmdline(data);
    let exe = argv.first().map(|a| a.rsplit('/').next().unwrap_or(a)).unwrap_or_default().to_owned();
    for any in ["0.0.0.0", "::"] {
        if let Some(fix) = framework::bind_fix(&argv, &exe, 8000, any) {
            // The advice quotes at most one argument and its flag, twice, around fixed text; each
            // invalid byte may have become U+FFFD, three bytes.
            assert!(fix.advice.len() <= 6 * data.len() + 256, "{}-byte advice", fix.advice.len());
            let printed = escape::escaped(&fix.advice);
            assert!(!printed.contains('\n'));
        }
    }
    if let Some(d) = argv.iter().find_map(|a| docker::daemon::proxy_path_flag(std::slice::from_ref(a))) {
        // Each invalid byte may become U+FFFD, three bytes.
        assert!(d.len() <= 3 * data.len());
    }
}

/// A runtime and a unix socket kept for the whole fuzzing process (one per thread).
struct Server {
    runtime: tokio::runtime::Runtime,
    listener: UnixListener,
    path: PathBuf,
}

/// Runs `request` against a daemon that answers its one request with `reply` and closes.
fn with_reply<F, Fut>(reply: &[u8], request: F)
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    static SERVER: OnceLock<std::sync::Mutex<Server>> = OnceLock::new();
    let server = SERVER.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("bindtrace-fuzz-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind the fuzzing socket");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        std::sync::Mutex::new(Server { runtime, listener, path })
    });
    let server = server.lock().unwrap_or_else(|e| e.into_inner());
    let listener = server.listener.try_clone().expect("clone the listener");
    let reply = reply.to_vec();
    // The daemon side is plain blocking std on its own thread, so the client under test is the
    // only thing on the runtime.
    let daemon = std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else { return };
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(&reply);
    });
    server.runtime.block_on(request(Client::new(&server.path)));
    let _ = daemon.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input the fuzzer kept (fuzz/corpus/<target>/*), replayed through its entry.
    #[test]
    fn fuzz_corpus_replays() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut replayed = 0;
        for (name, entry) in TARGETS {
            let dir = root.join(name);
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            assert!(!files.is_empty(), "no corpus for {name}");
            for f in files {
                let data = std::fs::read(&f).unwrap();
                let outcome = std::panic::catch_unwind(|| entry(&data));
                assert!(outcome.is_ok(), "{name}: {} fails", f.display());
                replayed += 1;
            }
        }
        assert!(replayed >= TARGETS.len());
    }
}
