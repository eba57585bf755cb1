//! Why a connection was refused and what to change: the namespace's listeners and who holds
//! them, the verdict, the framework-specific fix, the proactive audit, and the report record
//! all of it produces (the sinks only render it).
pub(crate) mod audit;
pub(crate) mod docker_dns;
pub(crate) mod enrich;
pub(crate) mod framework;
pub(crate) mod hint;
pub(crate) mod listeners;
pub(crate) mod namespace_reads;
pub(crate) mod procfs;
pub(crate) mod report;
pub(crate) mod udp_servers;
pub(crate) mod verdict;
