//! Docker's embedded DNS server: on a user-defined network (Compose's default) the daemon opens
//! a TCP listener on 127.0.0.11, on a random port, inside each container's namespace. The
//! daemon holds it from outside, so no process of the namespace does. It is never what a
//! published port should reach, and must not be offered as the port "the service uses".
use std::net::{IpAddr, Ipv4Addr};

use crate::diagnose::{listeners::Listener, procfs::Holder};

/// The address libnetwork's resolver listens on in every container of a user-defined network.
pub(crate) const RESOLVER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11));

/// Whether `l`, held by `holders` among the namespace's own processes, is the daemon's
/// resolver: on [`RESOLVER`] and held by no process of the namespace. A service of the
/// container's own that binds 127.0.0.11 has a holder there and is kept.
pub(crate) fn is_daemon_resolver(l: &Listener, holders: Option<&Vec<Holder>>) -> bool {
    l.addr == RESOLVER && holders.is_none_or(Vec::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_daemons_socket_on_the_resolver_address() {
        let dns = Listener { addr: RESOLVER, port: 43839, inode: 9 };
        assert!(is_daemon_resolver(&dns, None));
        assert!(is_daemon_resolver(&dns, Some(&Vec::new())));
        assert!(!is_daemon_resolver(&dns, Some(&vec![Holder::new(7, "dnsmasq")])));
        let other = Listener { addr: "127.0.0.1".parse().unwrap(), port: 43839, inode: 9 };
        assert!(!is_daemon_resolver(&other, None));
    }
}
