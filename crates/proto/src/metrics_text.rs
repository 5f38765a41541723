//! The classic Prometheus text format from OpenMetrics text, shared by the
//! server's and the agent's `/metrics` (pure text processing, no deps).

/// Rewrites OpenMetrics text as the classic Prometheus text format (0.0.4),
/// for scrapers and tools (promtool) that do not ask for OpenMetrics. The two
/// differ in naming: OpenMetrics names a counter family `x` with samples
/// `x_total` and `x_created`; the classic format names the family `x_total`
/// and has no `_created` samples nor the closing `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_owned());
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match rewritten {
            Some(l) => out.push_str(&l),
            None => {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                let is_created = name
                    .strip_suffix("_created")
                    .is_some_and(|family| counters.contains(family));
                if is_created {
                    continue;
                }
                out.push_str(line);
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counter_families_with_total() {
        let om = "# HELP drover_x Things.\n# TYPE drover_x counter\ndrover_x_total{a=\"1\"} 3\ndrover_x_created{a=\"1\"} 1.5\n# HELP drover_g Level.\n# TYPE drover_g gauge\ndrover_g 2\n# EOF\n";
        let want = "# HELP drover_x_total Things.\n# TYPE drover_x_total counter\ndrover_x_total{a=\"1\"} 3\n# HELP drover_g Level.\n# TYPE drover_g gauge\ndrover_g 2\n";
        assert_eq!(to_prometheus_text(om), want);
    }
}
