//! The `struct sock` offsets the connect tracker (`bindtrace-ebpf/src/connect.rs`) reads, from
//! the running kernel's BTF: the same resolver as [`crate::kernel::layout`], kept apart because
//! this program is optional (without it bindtrace still detects, only `via` is less precise).
use crate::kernel::btf::{Btf, BtfError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SockLayout {
    pub(crate) family: u32,
    /// `sock.__sk_common.skc_state` (one byte).
    pub(crate) state: u32,
    pub(crate) daddr: u32,
    pub(crate) rcv_saddr: u32,
    pub(crate) dport: u32,
    /// None on kernels built without IPv6 (the members do not exist there).
    pub(crate) v6_daddr: Option<u32>,
    pub(crate) v6_rcv_saddr: Option<u32>,
    /// `sock.__sk_common.skc_net.net`.
    pub(crate) net: u32,
    /// `inet_sock.inet_sport`.
    pub(crate) inet_sport: u32,
    /// `sock.sk_lock.owned`: whether a task holds the socket.
    pub(crate) lock_owned: u32,
}

fn optional(r: Result<u32, BtfError>) -> Result<Option<u32>, BtfError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

impl SockLayout {
    pub(crate) fn resolve(btf: &Btf) -> Result<SockLayout, BtfError> {
        let common = "sock.__sk_common";
        Ok(SockLayout {
            family: btf.member_offset(&format!("{common}.skc_family"), 2)?,
            state: btf.member_offset(&format!("{common}.skc_state"), 1)?,
            daddr: btf.member_offset(&format!("{common}.skc_daddr"), 4)?,
            rcv_saddr: btf.member_offset(&format!("{common}.skc_rcv_saddr"), 4)?,
            dport: btf.member_offset(&format!("{common}.skc_dport"), 2)?,
            v6_daddr: optional(btf.member_offset(&format!("{common}.skc_v6_daddr"), 16))?,
            v6_rcv_saddr: optional(btf.member_offset(&format!("{common}.skc_v6_rcv_saddr"), 16))?,
            net: btf.member_offset(&format!("{common}.skc_net.net"), 8)?,
            inet_sport: btf.member_offset("inet_sock.inet_sport", 2)?,
            lock_owned: btf.member_offset("sock.sk_lock.owned", 4)?,
        })
    }

    /// The eBPF globals (`connect.rs`) these offsets fill, with the namespace offsets shared
    /// with the refusal hooks (`KernelLayout::net_cookie`, `net_ns_inum`).
    pub(crate) fn globals(&self, net_cookie: u32, net_ns_inum: u32) -> Vec<(&'static str, u32)> {
        let v6 = self.v6_daddr.is_some() && self.v6_rcv_saddr.is_some();
        vec![
            ("OFF_SK_FAMILY", self.family),
            ("OFF_SK_STATE", self.state),
            ("OFF_SK_DADDR", self.daddr),
            ("OFF_SK_RCV_SADDR", self.rcv_saddr),
            ("OFF_SK_DPORT", self.dport),
            ("OFF_SK_V6_DADDR", self.v6_daddr.unwrap_or(0)),
            ("OFF_SK_V6_RCV_SADDR", self.v6_rcv_saddr.unwrap_or(0)),
            ("OFF_SK_NET", self.net),
            ("OFF_INET_SPORT", self.inet_sport),
            ("OFF_SK_LOCK_OWNED", self.lock_owned),
            ("OFF_CONN_NET_COOKIE", net_cookie),
            ("OFF_CONN_NET_NS_INUM", net_ns_inum),
            ("CONNECT_V6", u32::from(v6)),
        ]
    }

    /// Zeroes for every global, for when the layout could not be resolved: the program is
    /// then not attached, but the object still needs its globals set.
    pub(crate) fn unresolved_globals() -> Vec<(&'static str, u32)> {
        let zero = SockLayout {
            family: 0,
            state: 0,
            daddr: 0,
            rcv_saddr: 0,
            dport: 0,
            v6_daddr: None,
            v6_rcv_saddr: None,
            net: 0,
            inet_sport: 0,
            lock_owned: 0,
        };
        zero.globals(0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        kernel::btf::tests::{V5_10, V6_1, V6_18, fixture},
        kernel::layout::KernelLayout,
    };

    /// Expected values are pahole's on each fixture (`pahole -F btf -C sock_common`, `-C
    /// inet_sock`, `-C sock` plus `-C socket_lock_t`).
    fn expect(inet_sport: u32, lock_owned: u32) -> SockLayout {
        SockLayout {
            family: 16,
            state: 18,
            daddr: 0,
            rcv_saddr: 4,
            dport: 12,
            v6_daddr: Some(56),
            v6_rcv_saddr: Some(72),
            net: 48,
            inet_sport,
            lock_owned,
        }
    }

    #[test]
    fn layouts_match_pahole() {
        assert_eq!(SockLayout::resolve(fixture(V6_18)).unwrap(), expect(814, 324));
        assert_eq!(SockLayout::resolve(fixture(V6_1)).unwrap(), expect(804, 156));
        assert_eq!(SockLayout::resolve(fixture(V5_10)).unwrap(), expect(784, 140));
    }

    #[test]
    fn globals_cover_every_offset() {
        let l = expect(814, 324);
        let k = KernelLayout::resolve(fixture(V6_18)).unwrap();
        let g = l.globals(k.net_cookie, k.net_ns_inum);
        assert!(g.contains(&("OFF_INET_SPORT", 814)));
        assert!(g.contains(&("CONNECT_V6", 1)));
        assert!(g.contains(&("OFF_CONN_NET_COOKIE", 4160)));
        assert_eq!(g.len(), SockLayout::unresolved_globals().len());
    }
}
