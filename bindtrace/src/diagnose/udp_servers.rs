//! The fix for UDP servers bound to loopback (DNS, metrics and log collectors), recognised by
//! their executable name. Kept apart from `framework` (the web servers): these are told where to
//! listen in their configuration more often than on the command line, so the advice names the
//! setting, and the generic "replace the loopback argument" rewrite would be wrong for some
//! (dnsmasq has no wildcard `--listen-address`).
use crate::diagnose::framework::BindFix;

/// The server-specific fix when `argv`/`exe` is one of the UDP servers known here.
pub(crate) fn bind_fix(argv: &[String], exe: &str, port: u16, any: &str) -> Option<BindFix> {
    let argv0 = argv.first().map(|a| a.rsplit('/').next().unwrap_or(a)).unwrap_or("");
    let exe = exe.rsplit('/').next().unwrap_or(exe);
    let is = |name: &str| argv0 == name || exe == name;
    let has = |needle: &str| argv.iter().any(|a| a.contains(needle));
    let (framework, advice) = if is("dnsmasq") {
        let bind = if has("--bind-interfaces") || has("--bind-dynamic") {
            " (with --bind-interfaces it binds exactly those addresses)"
        } else {
            ""
        };
        (
            "dnsmasq",
            format!(
                "dnsmasq answers only on the addresses given by --listen-address{bind}: use \
                 `--interface=eth0` or add the container's address with `--listen-address=`, and \
                 drop `--listen-address=127.0.0.1` if it is the only one"
            ),
        )
    } else if is("coredns") {
        (
            "CoreDNS",
            format!(
                "the Corefile's `bind` plugin limits CoreDNS to loopback: remove `bind 127.0.0.1` (or use `bind {any}`) in the server block for :{port}"
            ),
        )
    } else if is("unbound") {
        (
            "unbound",
            format!(
                "unbound listens on localhost unless told otherwise: set `interface: {any}` in \
                 unbound.conf, and `access-control: 0.0.0.0/0 allow` (or your clients' network): \
                 by default it answers only localhost, and others get REFUSED"
            ),
        )
    } else if is("named") {
        (
            "BIND",
            "BIND's `listen-on { 127.0.0.1; };` limits it to loopback: use `listen-on { any; };` \
             (and `listen-on-v6 { any; };`) in named.conf options"
                .into(),
        )
    } else if is("telegraf") {
        (
            "Telegraf",
            format!(
                "Telegraf's statsd input listens on `service_address = \"localhost:{port}\"`: use \
                 `service_address = \":{port}\"`"
            ),
        )
    } else if has("statsd") && (is("node") || is("nodejs")) {
        ("statsd", format!("statsd's config has `address: \"127.0.0.1\"`: use `address: \"{any}\"`"))
    } else if is("rsyslogd") {
        (
            "rsyslog",
            format!(
                "rsyslog's `input(type=\"imudp\" port=\"{port}\" address=\"127.0.0.1\")` limits it to \
                 loopback: drop `address=` (or set it to {any})"
            ),
        )
    } else if is("syslog-ng") {
        (
            "syslog-ng",
            format!("syslog-ng's source `udp(ip(\"127.0.0.1\") port({port}))`: use `ip(\"{any}\")`"),
        )
    } else {
        return None;
    };
    Some(BindFix { framework, advice })
}

/// The fix for a plain UDP server of the common languages, where no server was recognised.
pub(crate) fn generic(port: u16, any: &str) -> String {
    format!(
        "bind the socket to {any} (Python `sock.bind((\"{any}\", {port}))`, Go \
         `net.ListenPacket(\"udp\", \":{port}\")`, Node `socket.bind({port})`)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fix(cmd: &str) -> Option<BindFix> {
        let argv: Vec<String> = cmd.split(' ').map(str::to_owned).collect();
        bind_fix(&argv, "", 53, "0.0.0.0")
    }

    #[test]
    fn known_udp_servers_name_their_setting() {
        let d = fix("dnsmasq -k --listen-address=127.0.0.1 --bind-interfaces").unwrap();
        assert!(
            d.advice.contains("--bind-interfaces it binds exactly") && d.advice.contains("--interface=eth0")
        );
        assert!(fix("/usr/bin/coredns -conf /etc/Corefile").unwrap().advice.contains("bind 127.0.0.1"));
        let u = fix("unbound -d").unwrap();
        assert!(u.advice.contains("interface: 0.0.0.0") && u.advice.contains("access-control"), "{u:?}");
        assert!(fix("/usr/sbin/named -g").unwrap().advice.contains("listen-on { any; }"));
        assert!(fix("telegraf --config x").unwrap().advice.contains("service_address = \":53\""));
        assert!(fix("node /srv/statsd/stats.js c.js").unwrap().advice.contains("address"));
        assert!(fix("rsyslogd -n").unwrap().advice.contains("imudp"));
        assert!(fix("syslog-ng -F").unwrap().advice.contains("ip(\"0.0.0.0\")"));
        assert_eq!(fix("python3 server.py"), None);
        assert!(generic(53, "0.0.0.0").contains("sock.bind((\"0.0.0.0\", 53))"));
    }
}
