//! Text from outside (a handler, a broker, a file) made safe to log and
//! to report: control characters escaped so no such text can start a log
//! line or drive a terminal, and cut to a bound on a character boundary
//! with a [`MARKER`].

/// What marks a cut text.
pub const MARKER: &str = "…";

/// Whether `c` must not reach a log or a terminal as it is: C0 and C1
/// controls, DEL, the Unicode line and paragraph separators and the
/// bidirectional overrides that reorder what a reader sees.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every control character escaped (`\n`, `\r`, `\t`, `\0`,
/// else `\u{…}`), cut to at most `max` bytes (the marker included) on a
/// character boundary. Work is bounded by `max`, not by the input.
pub fn text(text: String, max: usize) -> String {
    if text.len() <= max && !text.chars().any(hidden) {
        return text;
    }
    let mut out = String::with_capacity(max.min(text.len()) + 8);
    for c in text.chars() {
        let before = out.len();
        if hidden(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
        if out.len() > max {
            out.truncate(before);
            while out.len() + MARKER.len() > max && out.pop().is_some() {}
            out.push_str(MARKER);
            return out;
        }
    }
    out
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\0' => out.push_str("\\0"),
        other => out.push_str(&format!("\\u{{{:x}}}", u32::from(other))),
    }
}
