//! The input line: editing, history (Up/Down), pasted text, masked password fields.

use std::collections::VecDeque;

use crate::text::{tail_fitting, truncate, width};

/// Most lines kept in the input history.
pub const MAX_INPUT_HISTORY: usize = 500;
/// Most bytes the input line holds (a message over the server's limit is refused anyway).
pub const MAX_INPUT_BYTES: usize = conclave_proto::DEFAULT_MAX_MESSAGE_BYTES;

/// How a newline in the input is shown.
const NEWLINE_SHOWN: char = '↵';
/// How each character of a masked field is shown.
const MASK: char = '•';

/// A one-line editor. The text may hold newlines (from a paste); they are shown as `↵` and
/// sent as part of the message.
#[derive(Debug, Clone, Default)]
pub struct LineEditor {
    text: String,
    /// Byte offset, always on a character boundary.
    cursor: usize,
    history: VecDeque<String>,
    /// Position while browsing the history (0: the newest).
    browsing: Option<usize>,
    /// What was typed before browsing started.
    draft: String,
    pub masked: bool,
}

impl LineEditor {
    pub fn masked() -> Self {
        LineEditor {
            masked: true,
            ..Default::default()
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn cursor(&self) -> usize {
        self.cursor
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    pub fn set(&mut self, text: &str) {
        self.text.clear();
        self.insert_str(text);
    }

    pub fn clear(&mut self) {
        self.text.clear();
        self.cursor = 0;
        self.browsing = None;
    }

    /// Takes the text out (Enter), remembering it in the history unless `remember` is false
    /// (a line holding a password).
    pub fn take(&mut self, remember: bool) -> String {
        let text = std::mem::take(&mut self.text);
        self.cursor = 0;
        self.browsing = None;
        if remember && !text.trim().is_empty() && self.history.front() != Some(&text) {
            self.history.push_front(text.clone());
            self.history.truncate(MAX_INPUT_HISTORY);
        }
        text
    }

    /// Inserts typed or pasted text at the cursor. Control characters are dropped, tabs
    /// become a space, `\r\n` and `\r` become `\n`. Stops at [`MAX_INPUT_BYTES`]; returns
    /// false if something did not fit.
    pub fn insert_str(&mut self, s: &str) -> bool {
        let normalized = s.replace("\r\n", "\n").replace('\r', "\n");
        for c in normalized.chars() {
            let c = match c {
                '\t' => ' ',
                '\n' if !self.masked => '\n',
                c if c.is_control() => continue,
                c => c,
            };
            if self.text.len() + c.len_utf8() > MAX_INPUT_BYTES {
                return false;
            }
            self.text.insert(self.cursor, c);
            self.cursor += c.len_utf8();
        }
        true
    }

    pub fn insert(&mut self, c: char) -> bool {
        let mut buf = [0u8; 4];
        self.insert_str(c.encode_utf8(&mut buf))
    }

    fn prev_boundary(&self, at: usize) -> usize {
        self.text[..at]
            .char_indices()
            .next_back()
            .map_or(0, |(i, _)| i)
    }

    fn next_boundary(&self, at: usize) -> usize {
        self.text[at..]
            .chars()
            .next()
            .map_or(at, |c| at + c.len_utf8())
    }

    pub fn backspace(&mut self) {
        if self.cursor > 0 {
            let start = self.prev_boundary(self.cursor);
            self.text.replace_range(start..self.cursor, "");
            self.cursor = start;
        }
    }

    pub fn delete(&mut self) {
        if self.cursor < self.text.len() {
            let end = self.next_boundary(self.cursor);
            self.text.replace_range(self.cursor..end, "");
        }
    }

    pub fn left(&mut self) {
        self.cursor = self.prev_boundary(self.cursor);
    }

    pub fn right(&mut self) {
        self.cursor = self.next_boundary(self.cursor);
    }

    pub fn home(&mut self) {
        self.cursor = 0;
    }

    pub fn end(&mut self) {
        self.cursor = self.text.len();
    }

    /// Where the word before the cursor starts.
    fn word_start(&self) -> usize {
        let before = &self.text[..self.cursor];
        let trimmed = before.trim_end_matches(' ');
        trimmed.rfind(' ').map_or(0, |i| i + 1)
    }

    /// Ctrl-W: deletes the word before the cursor.
    pub fn delete_word(&mut self) {
        let start = self.word_start();
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    /// Ctrl-U: deletes everything before the cursor.
    pub fn kill_to_start(&mut self) {
        self.text.replace_range(..self.cursor, "");
        self.cursor = 0;
    }

    /// Ctrl-K: deletes everything after the cursor.
    pub fn kill_to_end(&mut self) {
        self.text.truncate(self.cursor);
    }

    /// The word being typed (from after the last space before the cursor) and where it
    /// starts: what tab completion completes.
    pub fn current_word(&self) -> (usize, &str) {
        let start = self.text[..self.cursor]
            .rfind([' ', '\n'])
            .map_or(0, |i| i + 1);
        (start, &self.text[start..self.cursor])
    }

    /// Replaces `start..cursor` with `with`.
    pub fn replace_before_cursor(&mut self, start: usize, with: &str) {
        if start <= self.cursor && self.text.is_char_boundary(start) {
            self.text.replace_range(start..self.cursor, with);
            self.cursor = start + with.len();
        }
    }

    /// Up: an older line of the history.
    pub fn history_up(&mut self) {
        let next = self.browsing.map_or(0, |i| i + 1);
        let Some(line) = self.history.get(next).cloned() else {
            return;
        };
        if self.browsing.is_none() {
            self.draft = std::mem::take(&mut self.text);
        }
        self.browsing = Some(next);
        self.text = line;
        self.cursor = self.text.len();
    }

    /// Down: a newer line, then what was being typed.
    pub fn history_down(&mut self) {
        match self.browsing {
            None => {}
            Some(0) => {
                self.browsing = None;
                self.text = std::mem::take(&mut self.draft);
                self.cursor = self.text.len();
            }
            Some(i) => {
                self.browsing = Some(i - 1);
                self.text = self.history.get(i - 1).cloned().unwrap_or_default();
                self.cursor = self.text.len();
            }
        }
    }

    /// What to draw in `columns` columns: the visible part of the text, and the cursor's
    /// column in it. Scrolls horizontally to keep the cursor in view.
    pub fn view(&self, columns: usize) -> (String, usize) {
        let shown = |s: &str| -> String {
            s.chars()
                .map(|c| match c {
                    _ if self.masked => MASK,
                    '\n' => NEWLINE_SHOWN,
                    c => c,
                })
                .collect()
        };
        let before = shown(&self.text[..self.cursor]);
        let after = shown(&self.text[self.cursor..]);
        let columns = columns.max(2);
        // Keep one column for the cursor at the end.
        let (visible_before, cursor_col) = if width(&before) < columns {
            (before.as_str(), width(&before))
        } else {
            tail_fitting(&before, columns - 1)
        };
        let rest = truncate(&after, columns.saturating_sub(cursor_col));
        (format!("{visible_before}{rest}"), cursor_col)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn editing_moves_by_characters() {
        let mut e = LineEditor::default();
        e.insert_str("héllo wörld");
        e.left();
        e.backspace();
        assert_eq!(e.text(), "héllo wörd");
        e.home();
        e.delete();
        e.right();
        e.insert('E');
        assert_eq!(e.text(), "éEllo wörd");
        e.end();
        e.delete_word();
        assert_eq!(e.text(), "éEllo ");
        e.kill_to_start();
        assert!(e.is_empty());
    }

    #[test]
    fn pastes_keep_lines_and_drop_controls() {
        let mut e = LineEditor::default();
        e.insert_str("one\r\ntwo\x1b[31m\tthree");
        assert_eq!(e.text(), "one\ntwo[31m three");
        let (shown, col) = e.view(80);
        assert_eq!(shown, "one↵two[31m three");
        assert_eq!(col, 17);
        let mut p = LineEditor::masked();
        p.insert_str("pw\nx");
        assert_eq!(p.text(), "pwx");
        assert_eq!(p.view(10).0, "•••");
    }

    #[test]
    fn input_is_bounded() {
        let mut e = LineEditor::default();
        assert!(!e.insert_str(&"x".repeat(MAX_INPUT_BYTES + 10)));
        assert_eq!(e.text().len(), MAX_INPUT_BYTES);
    }

    #[test]
    fn history_browses_and_restores_the_draft() {
        let mut e = LineEditor::default();
        for line in ["first", "second", "/join secret pw"] {
            e.insert_str(line);
            e.take(!line.starts_with("/join"));
        }
        e.insert_str("dra");
        e.history_up();
        assert_eq!(e.text(), "second");
        e.history_up();
        assert_eq!(e.text(), "first");
        e.history_up();
        assert_eq!(e.text(), "first");
        e.history_down();
        e.history_down();
        assert_eq!(e.text(), "dra");
    }

    #[test]
    fn the_view_follows_the_cursor() {
        let mut e = LineEditor::default();
        e.insert_str("abcdefghijklmnopqrstuvwxyz");
        let (shown, col) = e.view(10);
        assert_eq!(shown, "rstuvwxyz");
        assert_eq!(col, 9);
        e.home();
        let (shown, col) = e.view(10);
        assert_eq!(shown, "abcdefghi…");
        assert_eq!(col, 0);
        let (start, word) = {
            e.end();
            e.current_word()
        };
        assert_eq!((start, word.len()), (0, 26));
    }
}
