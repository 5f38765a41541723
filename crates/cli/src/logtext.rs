//! Untrusted text in the server's human-readable log: a user name, a host
//! name or a path sent by a client is printed as given by the log format,
//! so a newline in it could forge a log line and an escape sequence could
//! drive the terminal that shows it. [`Escaping`] writes each event as one
//! line: control characters inside it become `\n`, `\r`, `\x1b`, …
//! (the ANSI colours of a terminal are kept when they are on). The JSON
//! format escapes them itself.

use std::io::Write;

/// A `MakeWriter` for tracing-subscriber that escapes control characters
/// inside each event.
#[derive(Debug, Clone, Copy)]
pub struct Escaping {
    /// Whether the log's own ANSI colours are on (then ESC is kept).
    pub ansi: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Escaping {
    type Writer = EscapingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter { ansi: self.ansi }
    }
}

/// Writes one formatted event to stderr, escaped.
#[derive(Debug)]
pub struct EscapingWriter {
    ansi: bool,
}

impl Write for EscapingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let escaped = escape(buf, self.ansi);
        std::io::stderr().lock().write_all(&escaped)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Escapes every control character of `buf` but a final newline (and tabs,
/// and ESC when `ansi`).
pub fn escape(buf: &[u8], ansi: bool) -> Vec<u8> {
    let (body, end) = match buf.split_last() {
        Some((b'\n', body)) => (body, &b"\n"[..]),
        _ => (buf, &b""[..]),
    };
    let mut out = Vec::with_capacity(buf.len() + 8);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.push(b),
            0x1b if ansi => out.push(b),
            0x00..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.extend_from_slice(end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_line_stays_inside_its_event() {
        let event = b"INFO login failed user=admin\nINFO login ok user=admin\x1b[2J\n";
        let out = String::from_utf8(escape(event, false)).unwrap_or_default();
        assert_eq!(
            out,
            "INFO login failed user=admin\\nINFO login ok user=admin\\x1b[2J\n"
        );
        assert_eq!(out.matches('\n').count(), 1);
        // The log's own colours survive when they are on.
        let coloured = escape(b"\x1b[32mINFO\x1b[0m x\n", true);
        assert_eq!(coloured, b"\x1b[32mINFO\x1b[0m x\n");
    }
}
