//! Text from peers made safe for a terminal, and wrapped to a width.
//!
//! Everything a peer controls (message text, reasons, announcements) goes through
//! [`sanitize`] before it reaches a cell: an escape character in a cell would be written to
//! the terminal as it is, and could move the cursor, change the title or worse.

use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

/// Columns a tab becomes.
const TAB_COLUMNS: usize = 4;

/// Replaces control characters (ESC, BEL, C1 controls...) by a visible `�`, tabs by spaces.
/// Newlines are kept when `keep_newlines`, else shown as `↵`.
pub fn sanitize(text: &str, keep_newlines: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' if keep_newlines => out.push('\n'),
            '\n' => out.push('↵'),
            '\r' => {}
            '\t' => out.extend(std::iter::repeat_n(' ', TAB_COLUMNS)),
            c if c.is_control() => out.push('\u{fffd}'),
            // Bidirectional overrides can make text read differently from what it is.
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// Display columns of `text`.
pub fn width(text: &str) -> usize {
    UnicodeWidthStr::width(text)
}

fn char_width(c: char) -> usize {
    UnicodeWidthChar::width(c).unwrap_or(0)
}

/// Splits `text` (already sanitized; may hold newlines) into rows of at most `columns`
/// display columns, breaking at spaces when it can and inside words when it must. Always at
/// least one row.
pub fn wrap(text: &str, columns: usize) -> Vec<String> {
    let columns = columns.max(1);
    let mut rows = Vec::new();
    for line in text.split('\n') {
        wrap_line(line, columns, &mut rows);
    }
    if rows.is_empty() {
        rows.push(String::new());
    }
    rows
}

fn wrap_line(line: &str, columns: usize, rows: &mut Vec<String>) {
    let mut row = String::new();
    let mut row_width = 0;
    for word in line.split_inclusive(' ') {
        let w = width(word);
        let w_trimmed = width(word.trim_end_matches(' '));
        if row_width + w_trimmed > columns && row_width > 0 {
            rows.push(std::mem::take(&mut row).trim_end().to_string());
            row_width = 0;
        }
        if w_trimmed > columns {
            // A word longer than a row: cut it.
            for c in word.chars() {
                let cw = char_width(c);
                if row_width + cw > columns && row_width > 0 {
                    rows.push(std::mem::take(&mut row));
                    row_width = 0;
                }
                row.push(c);
                row_width += cw;
            }
        } else {
            row.push_str(word);
            row_width += w;
        }
    }
    rows.push(row.trim_end().to_string());
}

/// The longest suffix of `text` that fits in `columns`, for showing the end of a long line.
pub fn tail_fitting(text: &str, columns: usize) -> (&str, usize) {
    let mut used = 0;
    let mut start = text.len();
    for (i, c) in text.char_indices().rev() {
        let cw = char_width(c);
        if used + cw > columns {
            break;
        }
        used += cw;
        start = i;
    }
    (&text[start..], used)
}

/// `text` cut to at most `columns` display columns, with `…` when cut.
pub fn truncate(text: &str, columns: usize) -> String {
    if width(text) <= columns {
        return text.to_string();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let cw = char_width(c);
        if used + cw + 1 > columns {
            break;
        }
        out.push(c);
        used += cw;
    }
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_never_reach_the_terminal() {
        let evil = "hi\x1b]0;pwned\x07 \x1b[2J\u{202e}txt.exe\tx\r";
        let clean = sanitize(evil, false);
        assert!(!clean.chars().any(|c| c.is_control()), "{clean:?}");
        assert!(!clean.contains('\u{202e}'));
        assert!(clean.contains("    x"));
        assert_eq!(sanitize("a\nb", true), "a\nb");
        assert_eq!(sanitize("a\nb", false), "a↵b");
    }

    #[test]
    fn wraps_at_spaces_and_cuts_long_words() {
        assert_eq!(wrap("hello big world", 9), vec!["hello big", "world"]);
        assert_eq!(wrap("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
        assert_eq!(wrap("a\n\nb", 10), vec!["a", "", "b"]);
        assert_eq!(wrap("", 10), vec![""]);
        // Wide characters count two columns.
        assert_eq!(wrap("日本語です", 4), vec!["日本", "語で", "す"]);
        for row in wrap(&"word ".repeat(500), 17) {
            assert!(width(&row) <= 17, "{row:?}");
        }
    }

    #[test]
    fn truncation_and_tails_respect_widths() {
        assert_eq!(truncate("general", 10), "general");
        assert_eq!(truncate("a-very-long-room-name", 8), "a-very-…");
        assert_eq!(tail_fitting("hello world", 5), ("world", 5));
        assert_eq!(tail_fitting("日本語", 5), ("本語", 4));
    }
}
