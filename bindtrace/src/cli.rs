//! Command-line interface.
use std::time::Duration;

use clap::Parser;

use crate::{hook::HookChoice, output::Format};

/// Reports, as it happens, every connection to a container that was refused because the service
/// inside listens on loopback (or on the wrong address, family or port), and how to fix it.
#[derive(Debug, Clone, Parser)]
#[command(name = "bindtrace", version, about, long_about = None)]
pub struct Args {
    /// Bridge to watch, in bindtrace's own network namespace (repeatable).
    #[arg(short = 'i', long = "iface", value_name = "NAME", default_value = "docker0")]
    pub ifaces: Vec<String>,

    /// Kernel hook: `auto` picks tcp-send-reset when this kernel's BTF shows the reset reason,
    /// else kfree-skb when it shows drop reasons, else tc.
    #[arg(long, value_enum, default_value_t = HookChoice::Auto)]
    pub hook: HookChoice,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Size of the kernel-to-userspace ring buffer in bytes (a power of two, at least 4096).
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024, value_parser = parse_ringbuf_size)]
    pub ringbuf_size: u32,

    /// Repeated refusals of one namespace and port within this window fold into one line with a
    /// count (e.g. 500ms, 1s, 2s).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_window)]
    pub fold_window: Duration,

    /// Stop by itself after this long (e.g. 30s); runs until SIGINT or SIGTERM otherwise.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// More log detail on stderr (-v debug, -vv trace, including kernel-side messages).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

fn parse_ringbuf_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{s:?} is not a byte count: {e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!(
            "{n} must be a power of two of at least 4096 (the page size), e.g. 4096 or 262144"
        ));
    }
    Ok(n)
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err("the fold window must be longer than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_watch_docker0() {
        let a = Args::try_parse_from(["bindtrace"]).unwrap();
        assert_eq!(a.ifaces, vec!["docker0"]);
        assert_eq!(a.hook, HookChoice::Auto);
        assert_eq!(a.format, Format::Text);
        assert_eq!(a.fold_window, Duration::from_secs(1));
    }

    #[test]
    fn repeated_ifaces_and_hooks() {
        let a = Args::try_parse_from([
            "bindtrace",
            "-i",
            "docker0",
            "--iface",
            "br-1",
            "--hook",
            "kfree-skb",
            "--format",
            "json",
        ])
        .unwrap();
        assert_eq!(a.ifaces, vec!["docker0", "br-1"]);
        assert_eq!(a.hook, HookChoice::KfreeSkb);
        assert_eq!(a.format, Format::Json);
    }

    #[test]
    fn bad_values_are_explained() {
        let e = Args::try_parse_from(["bindtrace", "--ringbuf-size", "5000"]).unwrap_err().to_string();
        assert!(e.contains("power of two"), "{e}");
        assert!(Args::try_parse_from(["bindtrace", "--hook", "kprobe"]).is_err());
        assert!(Args::try_parse_from(["bindtrace", "--fold-window", "0s"]).is_err());
    }
}
