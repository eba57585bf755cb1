//! Pieces of the harness that need nothing but this process: a listener served from a thread
//! (no python, so it also runs in the kernel matrix's initramfs), and what the kernel has
//! attached or loaded, to check that bindtrace leaves nothing behind.
use std::{
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    process::Command,
    thread::JoinHandle,
};

use crate::net::Netns;

/// A TCP listener in a namespace, created by a thread that joined it (the socket stays in that
/// namespace) and served by another, which answers every connection with an HTTP 200. Closed on
/// drop. The process holding it is this one.
pub struct NativeListener {
    fd: i32,
    server: Option<JoinHandle<()>>,
}

impl NativeListener {
    pub fn start(ns: &Netns, addr: SocketAddr) -> NativeListener {
        let listener = ns
            .run(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("listen on {addr} in {}: {e}", ns.name));
        let fd = listener.as_raw_fd();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            // accept fails once the socket is shut down: that ends the thread.
            while let Ok((mut conn, _)) = listener.accept() {
                let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nok\n");
            }
        });
        NativeListener { fd, server: Some(server) }
    }
}

impl Drop for NativeListener {
    fn drop(&mut self) {
        // Wakes the blocked accept (EINVAL); the thread then drops and closes the listener.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }
}

/// Ids of the BPF programs a process holds, from /proc/PID/fdinfo (program and link fds both
/// name their program). Precise even when other bindtrace instances run at the same time.
pub fn programs_held_by(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        ids.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|v| v.trim().parse::<u32>().ok()),
        );
    }
    ids.sort();
    ids.dedup();
    ids
}

/// Which of `ids` are still loaded in the kernel.
pub fn still_loaded(ids: &[u32]) -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .filter(|id| ids.contains(id))
        .collect()
}

/// Waits (up to 2 s: program teardown after the last fd closes is asynchronous) until none of
/// `ids` is loaded; returns those still loaded.
pub fn wait_unloaded(ids: &[u32]) -> Vec<u32> {
    let mut left = still_loaded(ids);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        left = still_loaded(ids);
    }
    left
}

/// Ids of the programs attached to `ifname`'s ingress in `ns`: tcx links (Linux 6.6+) and
/// cls_bpf filters under clsact (`tc filter show`).
pub fn ingress_programs(ns: &Netns, ifname: &str) -> Vec<u32> {
    use aya::programs::{SchedClassifier, TcAttachType};
    // Kernels without tcx reject the query: nothing attached that way.
    let mut ids: Vec<u32> = ns
        .run(|| SchedClassifier::query_tcx(ifname, TcAttachType::Ingress))
        .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    let out = Command::new("tc")
        .args(["-n", &ns.name, "filter", "show", "dev", ifname, "ingress"])
        .output()
        .expect("run tc");
    ids.extend(filter_program_ids(&String::from_utf8_lossy(&out.stdout)));
    ids.sort();
    ids.dedup();
    ids
}

/// `ingress_programs` for the network namespace process `pid` runs in (a rootless container's,
/// RootlessKit's), which has no name under /run/netns.
pub fn ingress_programs_of_pid(pid: u32, ifname: &str) -> Vec<u32> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let file = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("the process's namespace");
    let mut ids: Vec<u32> = std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
                .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
                .unwrap_or_default()
        })
        .join()
        .unwrap()
    });
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "tc", "filter", "show", "dev", ifname, "ingress"])
        .output()
        .expect("run nsenter tc");
    ids.extend(filter_program_ids(&String::from_utf8_lossy(&out.stdout)));
    ids.sort();
    ids.dedup();
    ids
}

/// The program ids `tc filter show` names (`... id N ...`).
fn filter_program_ids(text: &str) -> impl Iterator<Item = u32> + '_ {
    let words: Vec<&str> = text.split_whitespace().collect();
    let ids: Vec<u32> = words.windows(2).filter(|w| w[0] == "id").filter_map(|w| w[1].parse().ok()).collect();
    ids.into_iter()
}
