//! Kernel-side aya-log messages, forwarded to this process's logger.
use tokio::io::unix::AsyncFd;

/// Kernel-side aya-log messages, forwarded to this process's logger. Optional: an object built
/// without log statements has no log buffer, and then this never becomes readable.
pub(crate) struct KernelLog {
    fd: Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>,
}

impl KernelLog {
    pub(crate) fn new(ebpf: &mut aya::Ebpf) -> KernelLog {
        let fd = match aya_log::EbpfLogger::init(ebpf) {
            // SAFETY: the logger owns its ring buffer fd and the AsyncFd owns the logger.
            Ok(logger) => {
                unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }.ok()
            }
            Err(e) => {
                log::debug!("no kernel-side log buffer: {e}");
                None
            }
        };
        KernelLog { fd }
    }

    pub(crate) async fn readable(&mut self) {
        match &mut self.fd {
            Some(fd) => match fd.readable_mut().await {
                Ok(mut guard) => guard.clear_ready(),
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    pub(crate) fn flush(&mut self) {
        if let Some(fd) = &mut self.fd {
            fd.get_mut().flush();
        }
    }
}
