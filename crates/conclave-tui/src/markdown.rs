//! Formatted messages (`text/markdown`): the small Markdown subset people use in chat (bold,
//! italic, inline code, code blocks, links, quotes; lists and headings shown plainly) turned
//! into plain text plus style runs, which the view draws. Pure.
//!
//! Parsing is pulldown-cmark's (CommonMark, no extensions), not ours: Markdown's corner
//! cases (nesting, emphasis rules, code spans with backticks) are many, and a well-tested
//! parser gets them right. What it produces is only text and styles:
//! - every piece of text goes through [`crate::text::sanitize`], so a control character
//!   in a message (a terminal escape, BEL, a bidirectional override) never reaches a cell;
//! - HTML in a message is shown as the text it is, never interpreted;
//! - a link shows its text and then its address, so a link cannot hide where it goes; nothing
//!   is fetched (not by the client, and the server never sees the text of an end-to-end
//!   message, nor follows a link in any).

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

use crate::text::{sanitize, wrap};

/// How a run of text is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Marks {
    pub bold: bool,
    pub italic: bool,
    pub code: bool,
    pub link: bool,
    pub quote: bool,
}

/// `marks` from character `start` (inclusive) to `end` (exclusive) of the rendered text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StyleRun {
    pub start: usize,
    pub end: usize,
    pub marks: Marks,
}

/// What a quote line starts with.
pub const QUOTE_PREFIX: &str = "│ ";
/// What a list item starts with.
pub const BULLET: &str = "• ";

struct Out {
    text: String,
    chars: usize,
    runs: Vec<StyleRun>,
    quote_depth: usize,
    at_line_start: bool,
}

impl Out {
    fn push(&mut self, piece: &str, marks: Marks) {
        let clean = sanitize(piece, true);
        for (n, line) in clean.split('\n').enumerate() {
            if n > 0 {
                self.newline();
            }
            if line.is_empty() {
                continue;
            }
            self.line_start();
            let len = line.chars().count();
            if marks != Marks::default() {
                self.runs.push(StyleRun {
                    start: self.chars,
                    end: self.chars + len,
                    marks,
                });
            }
            self.text.push_str(line);
            self.chars += len;
        }
    }

    /// The quote bars, at the start of a line inside a quote.
    fn line_start(&mut self) {
        if self.at_line_start {
            self.at_line_start = false;
            for _ in 0..self.quote_depth {
                let len = QUOTE_PREFIX.chars().count();
                self.runs.push(StyleRun {
                    start: self.chars,
                    end: self.chars + len,
                    marks: Marks {
                        quote: true,
                        ..Marks::default()
                    },
                });
                self.text.push_str(QUOTE_PREFIX);
                self.chars += len;
            }
        }
    }

    fn newline(&mut self) {
        self.text.push('\n');
        self.chars += 1;
        self.at_line_start = true;
    }

    /// A new block starts on its own line.
    fn block(&mut self) {
        if !self.text.is_empty() && !self.at_line_start {
            self.newline();
        }
    }
}

/// Renders a Markdown message: its text (sanitized, newlines kept) and style runs.
pub fn render(source: &str) -> (String, Vec<StyleRun>) {
    let mut out = Out {
        text: String::new(),
        chars: 0,
        runs: Vec::new(),
        quote_depth: 0,
        at_line_start: true,
    };
    let mut marks = Marks::default();
    let mut links: Vec<String> = Vec::new();
    for event in Parser::new_ext(source, Options::empty()) {
        match event {
            Event::Start(tag) => match tag {
                Tag::Strong | Tag::Heading { .. } => {
                    if matches!(tag, Tag::Heading { .. }) {
                        out.block();
                    }
                    marks.bold = true;
                }
                Tag::Emphasis => marks.italic = true,
                Tag::Link { dest_url, .. } => {
                    marks.link = true;
                    links.push(dest_url.to_string());
                }
                Tag::Image { dest_url, .. } => {
                    out.push("[image: ", marks);
                    links.push(dest_url.to_string());
                }
                Tag::BlockQuote(_) => {
                    out.block();
                    out.quote_depth += 1;
                    marks.quote = true;
                }
                Tag::CodeBlock(_) => {
                    out.block();
                    marks.code = true;
                }
                Tag::Item => {
                    out.block();
                    out.push(BULLET, marks);
                }
                Tag::Paragraph | Tag::List(_) | Tag::HtmlBlock => out.block(),
                _ => {}
            },
            Event::End(end) => match end {
                TagEnd::Strong | TagEnd::Heading(_) => marks.bold = false,
                TagEnd::Emphasis => marks.italic = false,
                TagEnd::Link => {
                    marks.link = false;
                    if let Some(url) = links.pop() {
                        let shown = sanitize(&url, false);
                        out.push(
                            &format!(" <{shown}>"),
                            Marks {
                                link: true,
                                ..marks
                            },
                        );
                    }
                }
                TagEnd::Image => {
                    if let Some(url) = links.pop() {
                        let shown = sanitize(&url, false);
                        out.push(
                            &format!("] <{shown}>"),
                            Marks {
                                link: true,
                                ..marks
                            },
                        );
                    }
                }
                TagEnd::BlockQuote(_) => {
                    out.quote_depth = out.quote_depth.saturating_sub(1);
                    marks.quote = out.quote_depth > 0;
                    out.block();
                }
                TagEnd::CodeBlock => {
                    marks.code = false;
                    // The block's last newline.
                    if out.text.ends_with('\n') {
                        out.text.pop();
                        out.chars -= 1;
                        out.at_line_start = false;
                    }
                }
                _ => {}
            },
            Event::Text(t) => out.push(&t, marks),
            Event::Code(t) => out.push(
                &t,
                Marks {
                    code: true,
                    ..marks
                },
            ),
            // Shown as written, never interpreted.
            Event::Html(t) | Event::InlineHtml(t) => out.push(&t, marks),
            Event::SoftBreak | Event::HardBreak => out.newline(),
            Event::Rule => {
                out.block();
                out.push("───", marks);
            }
            Event::FootnoteReference(t) | Event::InlineMath(t) | Event::DisplayMath(t) => {
                out.push(&t, marks)
            }
            Event::TaskListMarker(done) => out.push(if done { "[x] " } else { "[ ] " }, marks),
        }
    }
    while out.text.ends_with('\n') {
        out.text.pop();
        out.chars -= 1;
    }
    out.runs.retain(|r| r.start < out.chars);
    for r in &mut out.runs {
        r.end = r.end.min(out.chars);
    }
    (out.text, out.runs)
}

/// The marks of every character of `text` (char index → marks).
fn marks_per_char(len: usize, runs: &[StyleRun]) -> Vec<Marks> {
    let mut per = vec![Marks::default(); len];
    for r in runs {
        for m in per.iter_mut().take(r.end.min(len)).skip(r.start) {
            m.bold |= r.marks.bold;
            m.italic |= r.marks.italic;
            m.code |= r.marks.code;
            m.link |= r.marks.link;
            m.quote |= r.marks.quote;
        }
    }
    per
}

/// `text` wrapped to `columns` (as [`crate::text::wrap`] does, so the row count is the
/// same), each row split into runs of equal marks.
pub fn styled_rows(text: &str, runs: &[StyleRun], columns: usize) -> Vec<Vec<(String, Marks)>> {
    let chars: Vec<char> = text.chars().collect();
    let per = marks_per_char(chars.len(), runs);
    let mut pos = 0;
    let mut rows = Vec::new();
    for row in wrap(text, columns) {
        let mut spans: Vec<(String, Marks)> = Vec::new();
        for c in row.chars() {
            // Rows are the text in order, less the spaces and newlines wrapping removed.
            while pos < chars.len() && chars[pos] != c {
                pos += 1;
            }
            let m = per.get(pos).copied().unwrap_or_default();
            pos += 1;
            match spans.last_mut() {
                Some((s, last)) if *last == m => s.push(c),
                _ => spans.push((c.to_string(), m)),
            }
        }
        rows.push(spans);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(text: &str, runs: &[StyleRun], f: impl Fn(&Marks) -> bool) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        runs.iter()
            .filter(|r| f(&r.marks))
            .map(|r| chars[r.start..r.end].iter().collect())
            .collect()
    }

    #[test]
    fn the_subset_renders_with_styles() {
        let (text, runs) = render("a **bold** and *it* with `x = 1`");
        assert_eq!(text, "a bold and it with x = 1");
        assert_eq!(marked(&text, &runs, |m| m.bold), ["bold"]);
        assert_eq!(marked(&text, &runs, |m| m.italic), ["it"]);
        assert_eq!(marked(&text, &runs, |m| m.code), ["x = 1"]);
    }

    #[test]
    fn links_show_where_they_go() {
        let (text, runs) = render("see [the docs](https://example.org/a)");
        assert_eq!(text, "see the docs <https://example.org/a>");
        assert_eq!(
            marked(&text, &runs, |m| m.link),
            ["the docs", " <https://example.org/a>"]
        );
    }

    #[test]
    fn quotes_and_code_blocks_keep_their_lines() {
        let (text, runs) = render("> quoted\n> twice\n\nafter\n\n```\nfn x() {}\nlet y;\n```");
        assert_eq!(text, "│ quoted\n│ twice\nafter\nfn x() {}\nlet y;");
        assert!(marked(&text, &runs, |m| m.quote).contains(&"quoted".to_string()));
        assert_eq!(marked(&text, &runs, |m| m.code), ["fn x() {}", "let y;"]);
    }

    #[test]
    fn control_characters_and_html_are_neutralised() {
        let (text, _) = render("**\u{1b}]0;pwned\u{7}** <b>hi</b> `\u{1b}[2J` \u{202e}x");
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(!text.contains('\u{202e}'));
        assert!(text.contains("<b>hi</b>"), "HTML shown as text: {text:?}");
        let (text, _) = render("```\n\u{1b}[31mred\n```\n[x](javascript:\u{1b}[2J)");
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
    }

    #[test]
    fn plain_looking_text_is_unchanged() {
        assert_eq!(render("just words, no marks").0, "just words, no marks");
        assert_eq!(render("two\nlines").0, "two\nlines");
    }

    #[test]
    fn styled_rows_wrap_like_plain_text() {
        let (text, runs) = render("**aaaa bbbb** cccc dddd");
        let rows = styled_rows(&text, &runs, 9);
        assert_eq!(rows.len(), wrap(&text, 9).len());
        assert_eq!(
            rows[0],
            vec![(
                "aaaa bbbb".to_string(),
                Marks {
                    bold: true,
                    ..Marks::default()
                }
            )]
        );
        assert_eq!(rows[1], vec![("cccc dddd".to_string(), Marks::default())]);
    }
}
