//! The event loop's poll deadline on a timerfd: one kernel timer, one wake-up when it is due.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;

/// The loop's poll deadline, on a timerfd. tokio's timer wheel reaches a deadline a second
/// away in two steps (it wakes at the start of the 64 ms slot that holds it, then again at the
/// deadline), which made two wake-ups per idle second; the kernel's timer wakes once.
pub(crate) struct PollTimer {
    fd: AsyncFd<OwnedFd>,
    /// The deadline set and not read yet.
    armed: Option<Instant>,
}

impl PollTimer {
    pub(crate) fn new() -> io::Result<PollTimer> {
        // SAFETY: plain syscall; the fd is checked and then owned.
        let raw =
            unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nothing else owns; the AsyncFd owns it from here on,
        // so it stays open for as long as it is registered.
        let fd = unsafe {
            AsyncFd::register_with_interest(OwnedFd::from_raw_fd(raw), tokio::io::Interest::READABLE)
        }?;
        Ok(PollTimer { fd, armed: None })
    }

    /// Sets the one deadline (std's Instant is CLOCK_MONOTONIC too), or none: the loop then has
    /// no timer. A no-op when unchanged.
    pub(crate) fn arm(&mut self, at: Option<Instant>) -> io::Result<()> {
        if self.armed == at {
            return Ok(());
        }
        // An all-zero it_value disarms: a deadline already past fires after 1 ns.
        let left = match at {
            Some(at) => at.saturating_duration_since(Instant::now()).max(Duration::from_nanos(1)),
            None => Duration::ZERO,
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: left.as_secs() as _, tv_nsec: left.subsec_nanos() as _ },
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = at;
        Ok(())
    }

    /// Resolves once the deadline has passed. Cancel-safe: nothing is consumed before the
    /// final read, and nothing is awaited after it.
    pub(crate) async fn wait(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = 0u64;
            // SAFETY: reads 8 bytes into a u64.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut expirations).cast(), 8) };
            if n == 8 {
                // One-shot: nothing more to read until re-armed (saves a read per iteration).
                guard.clear_ready();
                self.armed = None;
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            guard.clear_ready();
        }
    }
}
