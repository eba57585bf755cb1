//! bindtrace-loadgen: refused TCP connection attempts, as fast as the machine allows or at a
//! set rate, against one address and a range of ports. Run it in the namespace the connections
//! should come from (`ip netns exec NS bindtrace-loadgen ...`).
//!
//! Each attempt is a non-blocking connect() to a port with no listener, kept in flight (up to
//! `--inflight` per thread, watched with epoll) until the reset arrives: `refused` counts the
//! attempts the client saw refused (ECONNREFUSED), which is what a user's curl sees. Attempts
//! that end otherwise (a timeout, a listener that accepted) are `other`. Every run stops by
//! itself: at `--seconds`, or after `--max` attempts.
//!
//! Prints one JSON object: {"attempts", "refused", "other", "seconds", "refused_per_sec"}.
use std::{
    net::IpAddr,
    os::fd::{AsRawFd as _, IntoRawFd as _, RawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bindtrace_tests::net::connect_nonblocking;

const USAGE: &str = "usage: bindtrace-loadgen --target IP --ports LO-HI [--seconds S] [--max N] \
[--rate PER_SEC] [--threads T] [--inflight K]

  --target IP      address to connect to (a namespace or container of your own)
  --ports LO-HI    ports, used round robin (each first visit is a new key for bindtrace)
  --seconds S      stop after S seconds (default 5; at most 600)
  --max N          stop after N attempts
  --rate R         attempts per second over all threads (default: as fast as possible)
  --threads T      sending threads (default 1)
  --inflight K     attempts in flight per thread (default 64)";

struct Options {
    target: IpAddr,
    ports: (u16, u16),
    seconds: f64,
    max: u64,
    rate: Option<f64>,
    threads: usize,
    inflight: usize,
}

fn parse() -> Result<Options, String> {
    let mut target = None;
    let mut ports = None;
    let mut o = Options {
        target: IpAddr::from([0, 0, 0, 0]),
        ports: (0, 0),
        seconds: 5.0,
        max: u64::MAX,
        rate: None,
        threads: 1,
        inflight: 64,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |what: &str| format!("{flag} {value}: expected {what}");
        match flag.as_str() {
            "--target" => target = Some(value.parse().map_err(|_| bad("an IP address"))?),
            "--ports" => {
                let (lo, hi) = value.split_once('-').unwrap_or((&value, &value));
                let lo: u16 = lo.parse().map_err(|_| bad("LO-HI"))?;
                let hi: u16 = hi.parse().map_err(|_| bad("LO-HI"))?;
                if lo == 0 || hi < lo {
                    return Err(bad("1 <= LO <= HI"));
                }
                ports = Some((lo, hi));
            }
            "--seconds" => {
                o.seconds = value.parse().map_err(|_| bad("seconds"))?;
                if !(o.seconds > 0.0 && o.seconds <= 600.0) {
                    return Err(bad("0 < S <= 600"));
                }
            }
            "--max" => o.max = value.parse().map_err(|_| bad("a count"))?,
            "--rate" => {
                o.rate = Some(value.parse().ok().filter(|r: &f64| *r > 0.0).ok_or_else(|| bad("a rate > 0"))?)
            }
            "--threads" => {
                o.threads = value.parse().ok().filter(|t| (1..=64).contains(t)).ok_or_else(|| bad("1..64"))?
            }
            "--inflight" => {
                o.inflight =
                    value.parse().ok().filter(|k| (1..=4096).contains(k)).ok_or_else(|| bad("1..4096"))?
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    o.target = target.ok_or("--target is required")?;
    o.ports = ports.ok_or("--ports is required")?;
    Ok(o)
}

/// Shared between the sending threads.
struct Run {
    next: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
    stop: AtomicBool,
    start: Instant,
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bindtrace-loadgen: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let run = Run {
        next: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        other: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        start: Instant::now(),
    };
    let deadline = Duration::from_secs_f64(o.seconds);
    std::thread::scope(|s| {
        for _ in 0..o.threads {
            s.spawn(|| sender(&o, &run, deadline));
        }
    });
    let elapsed = run.start.elapsed().as_secs_f64();
    let (refused, other) = (run.refused.load(Ordering::Relaxed), run.other.load(Ordering::Relaxed));
    println!(
        "{{\"attempts\":{},\"refused\":{refused},\"other\":{other},\"seconds\":{elapsed:.6},\"refused_per_sec\":{:.1}}}",
        refused + other,
        refused as f64 / elapsed
    );
}

/// One thread: keeps up to `inflight` attempts open, opens the next as each one ends.
fn sender(o: &Options, run: &Run, deadline: Duration) {
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epoll >= 0, "epoll_create1: {}", std::io::Error::last_os_error());
    let span = (o.ports.1 - o.ports.0) as u64 + 1;
    let mut open = 0usize;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; o.inflight];
    loop {
        let stopping = run.stop.load(Ordering::Relaxed) || run.start.elapsed() >= deadline;
        if stopping {
            run.stop.store(true, Ordering::Relaxed);
        }
        // Open attempts up to the in-flight limit (paced when a rate is set).
        while !stopping && open < o.inflight {
            let i = run.next.fetch_add(1, Ordering::Relaxed);
            if i >= o.max {
                run.stop.store(true, Ordering::Relaxed);
                break;
            }
            if let Some(rate) = o.rate {
                let due = Duration::from_secs_f64(i as f64 / rate);
                if let Some(wait) = due.checked_sub(run.start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            let port = o.ports.0 + (i % span) as u16;
            match attempt(epoll, o.target, port) {
                Attempt::Pending => open += 1,
                Attempt::Refused => {
                    run.refused.fetch_add(1, Ordering::Relaxed);
                }
                Attempt::Other => {
                    run.other.fetch_add(1, Ordering::Relaxed);
                }
            }
            if o.rate.is_some() {
                break;
            }
        }
        if open == 0 {
            if stopping || run.stop.load(Ordering::Relaxed) {
                break;
            }
            continue;
        }
        // After the deadline, wait at most a second for the attempts still in flight.
        // Paced: only collect what has arrived, the pacing sleep is the wait.
        let timeout = if stopping {
            1000
        } else if o.rate.is_some() && open < o.inflight {
            0
        } else {
            10
        };
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, timeout) };
        if n < 0 {
            assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EINTR), "epoll_wait");
            continue;
        }
        if n == 0 && stopping {
            // What is still open never got an answer: not refusals.
            run.other.fetch_add(open as u64, Ordering::Relaxed);
            break;
        }
        for ev in &events[..n as usize] {
            let fd = ev.u64 as RawFd;
            if socket_error(fd) == libc::ECONNREFUSED {
                run.refused.fetch_add(1, Ordering::Relaxed);
            } else {
                run.other.fetch_add(1, Ordering::Relaxed);
            }
            unsafe { libc::close(fd) };
            open -= 1;
        }
    }
    unsafe { libc::close(epoll) };
}

enum Attempt {
    Pending,
    Refused,
    Other,
}

/// A non-blocking connect; registered with `epoll` while the answer is outstanding.
fn attempt(epoll: RawFd, target: IpAddr, port: u16) -> Attempt {
    let Ok((fd, err)) = connect_nonblocking(target, port) else {
        // Out of descriptors or memory: back off briefly rather than spin.
        std::thread::sleep(Duration::from_millis(1));
        return Attempt::Other;
    };
    if err == libc::EINPROGRESS {
        let raw = fd.as_raw_fd();
        let mut ev = libc::epoll_event { events: (libc::EPOLLOUT | libc::EPOLLERR) as u32, u64: raw as u64 };
        if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, raw, &mut ev) } == 0 {
            // Closed by the sender loop when its answer arrives.
            let _ = fd.into_raw_fd();
            return Attempt::Pending;
        }
    }
    if err == libc::ECONNREFUSED { Attempt::Refused } else { Attempt::Other }
}

fn socket_error(fd: RawFd) -> i32 {
    let mut err: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut i32).cast(), &mut len)
    };
    if rc == 0 { err } else { -1 }
}
