//! Which kernel hook to attach, decided from the running kernel's BTF (never its version string).
use std::fmt;

use crate::kernel::layout::KernelLayout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum HookChoice {
    /// `tcp-send-reset` where the kernel has it, else `kfree-skb`, else `tc`.
    Auto,
    /// tp_btf on tcp:tcp_send_reset, reason NO_SOCKET (kernels from about 6.10).
    TcpSendReset,
    /// tp_btf on skb:kfree_skb, drop reason NO_SOCKET (kernels from 5.17).
    KfreeSkb,
    /// tc classifier on each port's host-side veth, seeing the reset leave the container (any
    /// kernel; the fallback before 5.17).
    Tc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    TcpSendReset,
    KfreeSkb,
    Tc,
}

impl Hook {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Hook::TcpSendReset => "tcp-send-reset",
            Hook::KfreeSkb => "kfree-skb",
            Hook::Tc => "tc",
        }
    }
    /// The eBPF program in our object.
    pub(crate) fn program(self) -> &'static str {
        match self {
            Hook::TcpSendReset => "bt_send_reset",
            Hook::KfreeSkb => "bt_kfree_skb",
            Hook::Tc => "bt_tc",
        }
    }
    /// The BTF tracepoint it attaches to; None for tc, which attaches to each port instead.
    pub(crate) fn tracepoint(self) -> Option<&'static str> {
        match self {
            Hook::TcpSendReset => Some("tcp_send_reset"),
            Hook::KfreeSkb => Some("kfree_skb"),
            Hook::Tc => None,
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HookError {
    #[error(
        "this kernel's tcp:tcp_send_reset has no reset reason (it appeared around Linux 6.10), so it \
         cannot tell a refused connection from other resets; use --hook auto (or kfree-skb from \
         Linux 5.17, or tc)"
    )]
    NoSendResetReason,
    #[error(
        "this kernel's skb:kfree_skb carries no drop reason (drop reasons appeared in Linux 5.17); \
         use --hook tc or --hook auto"
    )]
    NoDropReason,
}

/// The hook to attach and a sentence saying why, for the start-up message.
pub(crate) fn choose(choice: HookChoice, layout: &KernelLayout) -> Result<(Hook, String), HookError> {
    let send_reset = layout.rst_reason_no_socket.is_some();
    let kfree = layout.drop_reason_no_socket.is_some();
    match choice {
        HookChoice::TcpSendReset if send_reset => Ok((Hook::TcpSendReset, "chosen with --hook".into())),
        HookChoice::TcpSendReset => Err(HookError::NoSendResetReason),
        HookChoice::KfreeSkb if kfree => Ok((Hook::KfreeSkb, "chosen with --hook".into())),
        HookChoice::KfreeSkb => Err(HookError::NoDropReason),
        HookChoice::Auto if send_reset => {
            Ok((Hook::TcpSendReset, "BTF: tcp_send_reset carries enum sk_rst_reason".into()))
        }
        HookChoice::Auto if kfree => Ok((
            Hook::KfreeSkb,
            "BTF: tcp_send_reset has no reset reason here; kfree_skb carries enum skb_drop_reason".into(),
        )),
        HookChoice::Tc => Ok((Hook::Tc, "chosen with --hook".into())),
        HookChoice::Auto => Ok((
            Hook::Tc,
            "BTF: neither tcp_send_reset nor kfree_skb carries a reason here (before Linux 5.17); \
             tc on each port sees the reset leave the container"
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::btf::BitField;

    fn layout(rst: Option<u32>, drop: Option<u32>) -> KernelLayout {
        KernelLayout {
            skb_dev: 16,
            skb_head: 192,
            skb_network_header: 180,
            skb_transport_header: 178,
            dev_ifindex: 224,
            dev_nd_net: 264,
            net_cookie: 4160,
            net_ns_inum: 176,
            rst_reason_no_socket: rst,
            drop_reason_no_socket: drop,
            prog_info_recursion_misses: Some(208),
            skb_csum_complete_sw: BitField { byte: 131, bit: 6, bits: 1 },
            skb_csum_valid: BitField { byte: 130, bit: 4, bits: 1 },
        }
    }

    #[test]
    fn auto_prefers_send_reset_then_kfree_skb() {
        assert_eq!(choose(HookChoice::Auto, &layout(Some(1), Some(3))).unwrap().0, Hook::TcpSendReset);
        assert_eq!(choose(HookChoice::Auto, &layout(None, Some(2))).unwrap().0, Hook::KfreeSkb);
        assert_eq!(choose(HookChoice::Auto, &layout(None, None)).unwrap().0, Hook::Tc);
    }

    #[test]
    fn explicit_choice_is_checked_against_the_kernel() {
        assert_eq!(
            choose(HookChoice::TcpSendReset, &layout(None, Some(2))),
            Err(HookError::NoSendResetReason)
        );
        assert_eq!(choose(HookChoice::KfreeSkb, &layout(Some(1), None)), Err(HookError::NoDropReason));
        assert!(HookError::NoDropReason.to_string().contains("5.17"));
        // tc needs nothing from BTF: it is there on every kernel.
        assert_eq!(choose(HookChoice::Tc, &layout(None, None)).unwrap().0, Hook::Tc);
        assert_eq!(choose(HookChoice::Tc, &layout(Some(1), Some(3))).unwrap().0, Hook::Tc);
    }
}
