//! What goes out: text and JSON lines on stdout, Prometheus metrics on `/metrics`.
pub(crate) mod collapse;
pub(crate) mod escape;
pub(crate) mod metrics;
pub(crate) mod output;
pub(crate) mod style;
pub(crate) mod table;
pub(crate) mod terminal;
pub(crate) mod text;
pub(crate) mod width;
