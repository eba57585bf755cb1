//! `bindtrace check`'s table: one row per published port, columns lined up.
use super::escape::{escaped, field};
use crate::diagnose::{hint::endpoint, report::AuditReport};

/// `CONTAINER  PORT  PUBLISHED  LISTENING  VERDICT`, then one hint per problem and a summary.
pub(crate) fn table(rows: &[AuditReport], containers: usize) -> String {
    if rows.is_empty() {
        return "no running container publishes a TCP port\n".into();
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
            format!("{}/tcp", r.target_port),
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
                "{} {}/tcp: {}: {}\n",
                field(&r.container.name),
                r.target_port,
                r.verdict,
                escaped(&r.hint)
            ));
        }
    }
    s.push_str(&format!(
        "\n{} published port{} in {containers} container{}: {} reachable, {} not\n",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        if containers == 1 { "" } else { "s" },
        rows.len() - problems.len(),
        problems.len()
    ));
    s
}
