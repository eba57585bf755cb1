//! `bindtrace check`'s table: one row per published port, columns lined up.
use super::escape::{escaped, field};
use crate::diagnose::{hint::endpoint, report::AuditReport};

/// `CONTAINER  PORT  PUBLISHED  LISTENING  VERDICT`, then one hint per problem and a summary.
pub(crate) fn table(rows: &[AuditReport], containers: usize) -> String {
    if rows.is_empty() {
        return "no running container publishes a TCP or UDP port\n".into();
    }
    let header = ["CONTAINER", "PORT", "PUBLISHED", "LISTENING", "VERDICT"].map(String::from);
    let mut cells: Vec<[String; 5]> = vec![header];
    for r in rows {
        let published: Vec<String> = r.bindings.iter().map(|b| endpoint(b.host_ip, b.host_port)).collect();
        let listening: Vec<String> = r
            .listeners
            .iter()
            .map(|l| {
                let who = l.pids.first().map(|p| format!(" ({})", field(&p.comm))).unwrap_or_default();
                format!("{}{who}", endpoint(l.ip, l.port))
            })
            .collect();
        cells.push([
            field(&r.container.name).into_owned(),
            format!("{}/{}", r.target_port, r.proto),
            published.join(", "),
            if listening.is_empty() { "-".into() } else { listening.join(", ") },
            r.verdict.to_owned(),
        ]);
    }
    let widths: Vec<usize> =
        (0..5).map(|i| cells.iter().map(|c| c[i].chars().count()).max().unwrap_or(0)).collect();
    let mut s = String::new();
    for row in &cells {
        let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    let problems: Vec<&AuditReport> = rows.iter().filter(|r| r.verdict != "ok").collect();
    if !problems.is_empty() {
        s.push('\n');
        for r in &problems {
            s.push_str(&format!(
                "{} {}/{}: {}: {}\n",
                field(&r.container.name),
                r.target_port,
                r.proto,
                r.verdict,
                escaped(&r.hint)
            ));
        }
    }
    // A port published over IPv4 and IPv6 is checked (and has a row) once per family.
    let mut ports: Vec<(&str, u16, &str)> =
        rows.iter().map(|r| (r.container.name.as_str(), r.target_port, r.proto)).collect();
    ports.sort_unstable();
    ports.dedup();
    let families =
        if ports.len() == rows.len() { String::new() } else { format!(" ({} address checks)", rows.len()) };
    s.push_str(&format!(
        "\n{} published port{}{families} in {containers} container{}: {} reachable, {} not\n",
        ports.len(),
        if ports.len() == 1 { "" } else { "s" },
        if containers == 1 { "" } else { "s" },
        rows.len() - problems.len(),
        problems.len()
    ));
    s
}
