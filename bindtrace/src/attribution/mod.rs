//! Who connected and how the connection got to the container: the connect tracker's records,
//! conntrack's NAT flows and Docker's published ports, combined into `via`.
pub(crate) mod connect;
pub(crate) mod rootlessport;
pub(crate) mod udp_proxy;
pub(crate) mod via;
