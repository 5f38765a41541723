//! How the CLI prints: aligned tables and key/value blocks for people,
//! JSON for scripts (`--output json`). Data goes to stdout only.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// `--output` of every listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Prints a value as pretty JSON.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Text from the server as it may be shown on a terminal: control
/// characters (a newline, an escape sequence an agent slipped into its
/// `os` field) become visible `\u{..}` escapes instead of acting.
pub fn clean(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Prints a `key: value` line of a detail view, the value cleaned.
pub fn row(width: usize, key: &str, value: &str) {
    println!("{:<width$} {}", format!("{key}:"), clean(value));
}

/// Prints one event of a follow (`--follow -o json`) as one line of JSON
/// (NDJSON), flushed at once so that a reader sees it as it happens.
pub fn event(value: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// Prints rows under headers, each column as wide as its widest cell
/// (cells cleaned of control characters).
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", format_table(headers, rows));
}

/// [`table`] as text, for a table that goes elsewhere than stdout.
pub fn format_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
    text
}

/// "12s ago", "3m ago", "2h ago", "4d ago" or "never".
pub fn ago(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(t) = t else {
        return "never".to_owned();
    };
    let secs = (now - t).num_seconds().max(0);
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// Bytes in binary units, e.g. "1.5 GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn relative_times() {
        let now = Utc::now();
        let cases = [
            (None, "never"),
            (Some(now), "0s ago"),
            (Some(now - Duration::seconds(59)), "59s ago"),
            (Some(now - Duration::seconds(61)), "1m ago"),
            (Some(now - Duration::hours(5)), "5h ago"),
            (Some(now - Duration::days(3)), "3d ago"),
        ];
        for (t, want) in cases {
            assert_eq!(ago(t, now), want);
        }
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(clean("Debian 12"), "Debian 12");
        assert_eq!(clean("a\u{1b}[2Jb\nc"), "a\\u{1b}[2Jb\\u{a}c");
    }
}
