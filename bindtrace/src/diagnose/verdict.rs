//! Why a connection attempt was refused, decided from the listeners of the namespace it hit.
use std::{collections::HashSet, net::IpAddr};

use serde::Serialize;

use crate::diagnose::listeners::Listener;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Verdict {
    /// Something listens on the port, bound only to 127.0.0.0/8, ::1 or ::ffff:127.x: the
    /// container's own loopback, which forwarded traffic never reaches.
    LoopbackOnly,
    /// A listener on the port exists for the other address family only.
    WrongFamily,
    /// A listener on the port is bound to another specific address.
    OtherAddress,
    /// Nothing listens on the port.
    NoListener,
    /// A listener accepts this address now: it was not there yet when the SYN came (a service
    /// starting or restarting).
    ListeningNow,
    /// The namespace was gone before it could be inspected.
    Unknown,
}

impl Verdict {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Verdict::LoopbackOnly => "loopback_only",
            Verdict::WrongFamily => "wrong_family",
            Verdict::OtherAddress => "other_address",
            Verdict::NoListener => "no_listener",
            Verdict::ListeningNow => "listening_now",
            Verdict::Unknown => "unknown",
        }
    }
}

/// The verdict and the listeners that explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) verdict: Verdict,
    /// Listeners on the refused port (for `no_listener`: every listener of the namespace, to show
    /// what does listen there).
    pub(crate) listeners: Vec<Listener>,
}

pub(crate) fn is_loopback(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|m| m.is_loopback()),
    }
}

fn is_unspecified_v4(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V4(a) if a.is_unspecified())
}

fn is_unspecified_v6(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V6(a) if a.is_unspecified())
}

/// Would `l` accept a connection to `target`? `[::]` takes IPv4 too unless the socket has
/// IPV6_V6ONLY; `v6only` says whether it is taken to have it.
pub(crate) fn accepts(l: &Listener, target: IpAddr, v6only: bool) -> bool {
    match (l.addr, target) {
        (IpAddr::V4(b), IpAddr::V4(t)) => b.is_unspecified() || b == t,
        (IpAddr::V6(b), IpAddr::V4(t)) => (b.is_unspecified() && !v6only) || b.to_ipv4_mapped() == Some(t),
        (IpAddr::V6(b), IpAddr::V6(t)) => b.is_unspecified() || b == t,
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    }
}

/// Decides why a SYN to `target:port` was refused, given the namespace's listeners now and
/// which of them have IPV6_V6ONLY (`v6only`, socket inodes, from the sock_diag dump). A `[::]`
/// listener without the flag takes IPv4 too: when it listens now, it was not there yet when the
/// SYN came (a restart), which is `listening_now`, not `wrong_family`.
pub(crate) fn decide(target: IpAddr, port: u16, listeners: &[Listener], v6only: &HashSet<u64>) -> Decision {
    let on_port: Vec<Listener> = listeners.iter().filter(|l| l.port == port).cloned().collect();
    let verdict = if on_port.is_empty() {
        Verdict::NoListener
    } else if on_port.iter().any(|l| accepts(l, target, v6only.contains(&l.inode))) {
        Verdict::ListeningNow
    } else if on_port.iter().any(|l| is_loopback(l.addr)) {
        Verdict::LoopbackOnly
    } else if on_port.iter().any(|l| {
        (target.is_ipv4() && is_unspecified_v6(l.addr)) || (target.is_ipv6() && is_unspecified_v4(l.addr))
    }) {
        Verdict::WrongFamily
    } else {
        Verdict::OtherAddress
    };
    let listeners = if verdict == Verdict::NoListener { listeners.to_vec() } else { on_port };
    Decision { verdict, listeners }
}

/// [`decide`] for a refusal whose address is not known (a line without a sample): judged
/// against each address the namespace has on the interface the SYN came in on, `own`. The port
/// is reachable only when it is for all of them; else the first address it is not reachable
/// at decides. Without any known address, the family's wildcard stands in.
pub(crate) fn decide_among(
    own: &[IpAddr],
    fallback: IpAddr,
    port: u16,
    listeners: &[Listener],
    v6only: &HashSet<u64>,
) -> Decision {
    let mut first = None;
    for &target in own {
        let d = decide(target, port, listeners, v6only);
        if d.verdict != Verdict::ListeningNow {
            return d;
        }
        first.get_or_insert(d);
    }
    first.unwrap_or_else(|| decide(fallback, port, listeners, v6only))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(addr: &str, port: u16) -> Listener {
        Listener { addr: addr.parse().unwrap(), port, inode: 1 }
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn none() -> HashSet<u64> {
        HashSet::new()
    }

    #[test]
    fn loopback_v4_v6_and_mapped() {
        for bound in ["127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1"] {
            let d = decide(ip("172.17.0.2"), 8000, &[l(bound, 8000), l("0.0.0.0", 22)], &none());
            assert_eq!(d.verdict, Verdict::LoopbackOnly, "{bound}");
            assert_eq!(d.listeners, vec![l(bound, 8000)]);
        }
        let d = decide(ip("fd00::2"), 8000, &[l("::1", 8000)], &none());
        assert_eq!(d.verdict, Verdict::LoopbackOnly);
    }

    #[test]
    fn no_listener_lists_what_does_listen() {
        let all = [l("0.0.0.0", 3000), l("127.0.0.11", 41000)];
        let d = decide(ip("172.17.0.2"), 8000, &all, &none());
        assert_eq!(d.verdict, Verdict::NoListener);
        assert_eq!(d.listeners, all.to_vec());
        assert_eq!(decide(ip("172.17.0.2"), 8000, &[], &none()).verdict, Verdict::NoListener);
    }

    #[test]
    fn wrong_family_both_ways() {
        assert_eq!(decide(ip("fd00::2"), 80, &[l("0.0.0.0", 80)], &none()).verdict, Verdict::WrongFamily);
        // [::] with IPV6_V6ONLY (inode 1 in the dump's set) does not take an IPv4 SYN.
        let v6only = HashSet::from([1]);
        assert_eq!(decide(ip("172.17.0.2"), 80, &[l("::", 80)], &v6only).verdict, Verdict::WrongFamily);
    }

    /// A refusal during a restart, then a dual-stack `[::]` listener (no IPV6_V6ONLY in the
    /// dump): it takes IPv4, so the service was late, and nothing claims the flag.
    #[test]
    fn a_dual_stack_listener_is_not_the_wrong_family() {
        let d = decide(ip("172.17.0.2"), 80, &[l("::", 80)], &none());
        assert_eq!(d.verdict, Verdict::ListeningNow);
    }

    /// A line without a sample: a listener on the namespace's own address is reachable there,
    /// not `other_address` (which judging against 0.0.0.0 said).
    #[test]
    fn without_a_sample_the_namespace_addresses_are_the_target() {
        let any = ip("0.0.0.0");
        let own = [ip("172.17.0.2")];
        let d = decide_among(&own, any, 80, &[l("172.17.0.2", 80)], &none());
        assert_eq!(d.verdict, Verdict::ListeningNow);
        let d = decide_among(&own, any, 80, &[l("10.9.0.1", 80)], &none());
        assert_eq!(d.verdict, Verdict::OtherAddress);
        let d = decide_among(&own, any, 80, &[l("127.0.0.1", 80)], &none());
        assert_eq!(d.verdict, Verdict::LoopbackOnly);
        // Two addresses on the interface, the listener on one: the other one decides.
        let two = [ip("172.17.0.2"), ip("172.18.0.2")];
        let d = decide_among(&two, any, 80, &[l("172.17.0.2", 80)], &none());
        assert_eq!(d.verdict, Verdict::OtherAddress);
        // No address known: the wildcard, as before.
        assert_eq!(decide_among(&[], any, 80, &[l("0.0.0.0", 80)], &none()).verdict, Verdict::ListeningNow);
    }

    #[test]
    fn other_specific_address() {
        let d = decide(ip("172.17.0.2"), 80, &[l("172.18.0.5", 80)], &none());
        assert_eq!(d.verdict, Verdict::OtherAddress);
        let d = decide(ip("fd00::2"), 80, &[l("fd00::9", 80)], &none());
        assert_eq!(d.verdict, Verdict::OtherAddress);
    }

    #[test]
    fn a_listener_that_accepts_now_means_it_came_late() {
        for bound in ["0.0.0.0", "172.17.0.2", "::ffff:172.17.0.2"] {
            assert_eq!(decide(ip("172.17.0.2"), 80, &[l(bound, 80)], &none()).verdict, Verdict::ListeningNow);
        }
        assert_eq!(decide(ip("fd00::2"), 80, &[l("::", 80)], &none()).verdict, Verdict::ListeningNow);
    }

    #[test]
    fn loopback_wins_over_other_address() {
        let d = decide(ip("172.17.0.2"), 80, &[l("10.0.0.1", 80), l("127.0.0.1", 80)], &none());
        assert_eq!(d.verdict, Verdict::LoopbackOnly);
    }
}
