//! Refused connection attempts, bounded in count and time: each a non-blocking connect closed
//! at once (a closed SYN_SENT socket sends nothing more; the reset that comes back is the
//! target namespace's refusal).
use std::{
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bindtrace_tests::net::connect_nonblocking;

/// Up to `total` SYNs from the calling thread's namespace to `target` on `ports` (round robin),
/// from two threads; stops after `limit` at the latest. Returns the SYNs that went out.
pub fn syns(target: IpAddr, ports: &[u16], total: u64, limit: Duration) -> u64 {
    let next = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let start = Instant::now();
    // Threads start in the namespace of the thread that spawns them.
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total || (i.is_multiple_of(256) && start.elapsed() > limit) {
                        break;
                    }
                    let port = ports[(i % ports.len() as u64) as usize];
                    let (_fd, err) = connect_nonblocking(target, port).expect("socket");
                    if matches!(err, 0 | libc::EINPROGRESS | libc::ECONNREFUSED) {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    sent.load(Ordering::Relaxed)
}

/// One blocking attempt that must be refused (a line is expected for it).
pub fn refused_once(target: IpAddr, port: u16) {
    let err = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::new(target, port),
        Duration::from_secs(5),
    )
    .expect_err("the soak's targets refuse every connection");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{target}:{port}: {err}");
}
