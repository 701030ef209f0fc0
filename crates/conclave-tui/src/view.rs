//! Drawing: `render(frame, &App)` and nothing else; it reads the state and changes nothing.

use std::collections::HashMap;
use std::time::Duration;

use conclave_client::trust::format_fingerprint;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use ratatui::Frame;
use ratatui::layout::{Alignment, Position, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

use crate::app::{App, ConnState, LoginForm, Overlay, Phase};
use crate::buffer::{Buffer, ConvKey, Entry, EntryKind, NoticeKind, SendState};
use crate::command::COMMANDS;
use crate::layout::{self, MIN_HEIGHT, MIN_WIDTH};
use crate::text::{self, sanitize, truncate, width, wrap};

/// Columns of the time stamp (`HH:MM `).
const TIME_COLUMNS: usize = 6;
/// Widest sender column.
const NICK_COLUMNS: usize = 10;
/// Between the sender and the text.
const SEPARATOR: &str = " │ ";
/// Between the sender and the text of the selected message (as wide as [`SEPARATOR`]).
const SELECTED_SEPARATOR: &str = " ▶ ";
/// Columns of the command column in the help.
const HELP_COMMAND_COLUMNS: usize = 36;
/// Fingerprint pairs per row on the confirmation screen.
const FINGERPRINT_PAIRS_PER_ROW: usize = 16;
/// Hex digits of the fingerprint in the status bar.
const SHORT_FINGERPRINT_PAIRS: usize = 4;

/// Sender colours; a name always gets the same one.
const NICK_COLOURS: [Color; 12] = [
    Color::Cyan,
    Color::Green,
    Color::Yellow,
    Color::Blue,
    Color::Magenta,
    Color::LightRed,
    Color::LightGreen,
    Color::LightCyan,
    Color::LightMagenta,
    Color::LightBlue,
    Color::LightYellow,
    Color::Red,
];

pub fn nick_colour(name: &str) -> Color {
    // FNV-1a: stable across runs and platforms.
    let mut hash: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    NICK_COLOURS[hash as usize % NICK_COLOURS.len()]
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn zoned(ts_ms: i64, tz: &TimeZone) -> Option<jiff::Zoned> {
    Timestamp::from_millisecond(ts_ms)
        .ok()
        .map(|t| t.to_zoned(tz.clone()))
}

fn time_of(ts_ms: i64, tz: &TimeZone) -> String {
    zoned(ts_ms, tz).map_or_else(|| "--:--".into(), |z| z.strftime("%H:%M").to_string())
}

fn day_of(ts_ms: i64, tz: &TimeZone) -> Option<jiff::civil::Date> {
    zoned(ts_ms, tz).map(|z| z.date())
}

/// Columns of the sender for a conversation `columns` wide.
fn nick_columns(columns: usize) -> usize {
    NICK_COLUMNS.min(columns / 4).max(1)
}

/// Columns left for the text.
fn text_columns(columns: usize) -> usize {
    columns
        .saturating_sub(TIME_COLUMNS + nick_columns(columns) + width(SEPARATOR))
        .max(1)
}

/// Rows an entry takes (without a day separator).
pub fn entry_row_count(entry: &Entry, columns: usize) -> usize {
    wrap(&entry.text, text_columns(columns)).len()
}

/// Whether a day separator goes before entry `i`.
fn separator_before(b: &Buffer, i: usize, tz: &TimeZone) -> bool {
    let Some(entry) = b.entries.get(i) else {
        return false;
    };
    match i.checked_sub(1).and_then(|p| b.entries.get(p)) {
        None => true,
        Some(prev) => day_of(prev.ts_ms, tz) != day_of(entry.ts_ms, tz),
    }
}

fn rows_of(b: &Buffer, i: usize, columns: usize, tz: &TimeZone) -> usize {
    b.entries.get(i).map_or(0, |e| entry_row_count(e, columns))
        + usize::from(separator_before(b, i, tz))
}

/// Rows of the buffer counted from the bottom, stopping once past `limit`.
pub fn count_rows(b: &Buffer, columns: usize, limit: usize, tz: &TimeZone) -> usize {
    let mut rows = 0;
    for i in (0..b.entries.len()).rev() {
        rows += rows_of(b, i, columns, tz);
        if rows > limit {
            break;
        }
    }
    rows
}

/// Rows from the message `seq` (its first row) to the bottom.
pub fn rows_from(b: &Buffer, seq: u64, columns: usize, tz: &TimeZone) -> Option<usize> {
    let mut rows = 0;
    for i in (0..b.entries.len()).rev() {
        rows += rows_of(b, i, columns, tz);
        if b.entries[i].seq() == Some(seq) {
            return Some(rows);
        }
    }
    None
}

fn day_separator(ts_ms: i64, tz: &TimeZone, columns: usize) -> Line<'static> {
    let label = zoned(ts_ms, tz).map_or_else(
        || "unknown date".to_string(),
        |z| z.strftime("%A %-d %B %Y").to_string(),
    );
    let label = format!(" {label} ");
    let side = columns.saturating_sub(width(&label)) / 2;
    Line::from(Span::styled(
        format!("{}{label}{}", "─".repeat(side), "─".repeat(side)),
        Style::default().fg(Color::DarkGray),
    ))
}

/// The rows of entry `i`, day separator included.
fn entry_lines(
    b: &Buffer,
    i: usize,
    columns: usize,
    tz: &TimeZone,
    me: &str,
    names: &HashMap<String, String>,
) -> Vec<Line<'static>> {
    let Some(entry) = b.entries.get(i) else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    if separator_before(b, i, tz) {
        lines.push(day_separator(entry.ts_ms, tz, columns));
    }
    let nick_w = nick_columns(columns);
    let (nick, nick_style, text_style) = match &entry.kind {
        EntryKind::Message { from, state, .. } => {
            let mut nick_style = Style::default()
                .fg(nick_colour(from))
                .add_modifier(Modifier::BOLD);
            let mut text_style = Style::default();
            if from == me {
                nick_style = nick_style.add_modifier(Modifier::UNDERLINED);
            }
            match state {
                SendState::Delivered => {}
                SendState::Sending(_) => text_style = text_style.fg(Color::DarkGray),
                SendState::Failed => {
                    text_style = text_style
                        .fg(Color::Red)
                        .add_modifier(Modifier::CROSSED_OUT)
                }
            }
            if entry.mention {
                text_style = text_style.fg(Color::Yellow).add_modifier(Modifier::BOLD);
                nick_style = nick_style.add_modifier(Modifier::REVERSED);
            }
            let shown = names.get(from).cloned().unwrap_or_else(|| from.clone());
            (shown, nick_style, text_style)
        }
        EntryKind::Notice(kind) => {
            let (mark, colour) = match kind {
                NoticeKind::Info => ("--", Color::Gray),
                NoticeKind::Error => ("!!", Color::Red),
                NoticeKind::Join => ("-->", Color::Green),
                NoticeKind::Part => ("<--", Color::DarkGray),
                NoticeKind::Kick => ("<!>", Color::LightRed),
                NoticeKind::Announce => ("***", Color::LightMagenta),
            };
            let style = Style::default().fg(colour);
            (mark.to_string(), style, style)
        }
    };
    let highlight = b.highlight.is_some() && b.highlight.as_deref() == entry.msg_id();
    let selected = b.selected.is_some() && b.selected.as_deref() == entry.msg_id();
    let base = if selected {
        Style::default().bg(Color::Indexed(24))
    } else if highlight {
        Style::default().bg(Color::DarkGray)
    } else {
        Style::default()
    };
    // An action: "* alice waves" (the text starts with the name).
    let nick = if entry.action { "*".to_string() } else { nick };
    let nick = truncate(&nick, nick_w);
    let pad = nick_w.saturating_sub(width(&nick));
    let marker = match &entry.kind {
        EntryKind::Message {
            state: SendState::Sending(_),
            ..
        } => " …",
        EntryKind::Message {
            state: SendState::Failed,
            ..
        } => " ✗ not sent",
        _ => "",
    };
    let rows = crate::markdown::styled_rows(
        &format!("{}{marker}", entry.text),
        &entry.styles,
        text_columns(columns),
    );
    let text_style = if entry.action {
        text_style.add_modifier(Modifier::ITALIC)
    } else {
        text_style
    };
    for (n, row) in rows.into_iter().enumerate() {
        let mut spans = Vec::with_capacity(4);
        if n == 0 {
            spans.push(Span::styled(
                format!("{:<w$}", time_of(entry.ts_ms, tz), w = TIME_COLUMNS),
                Style::default().fg(Color::DarkGray),
            ));
            spans.push(Span::raw(" ".repeat(pad)));
            spans.push(Span::styled(nick.clone(), nick_style));
        } else {
            spans.push(Span::raw(" ".repeat(TIME_COLUMNS + nick_w)));
        }
        spans.push(Span::styled(
            if selected {
                SELECTED_SEPARATOR
            } else {
                SEPARATOR
            },
            Style::default().fg(Color::DarkGray),
        ));
        for (piece, marks) in row {
            spans.push(Span::styled(piece, marked(text_style, marks)));
        }
        lines.push(Line::from(spans).style(base));
    }
    lines
}

/// A formatted run's style over the entry's.
fn marked(style: Style, m: crate::markdown::Marks) -> Style {
    let mut s = style;
    if m.bold {
        s = s.add_modifier(Modifier::BOLD);
    }
    if m.italic {
        s = s.add_modifier(Modifier::ITALIC);
    }
    if m.code {
        s = s.fg(Color::LightCyan).bg(Color::Indexed(235));
    }
    if m.link {
        s = s.fg(Color::LightBlue).add_modifier(Modifier::UNDERLINED);
    }
    if m.quote {
        s = s.fg(Color::Gray);
    }
    s
}

/// The rows on screen: `rows` of them, ending `scroll` rows above the bottom.
fn visible_lines(
    b: &Buffer,
    columns: usize,
    rows: usize,
    tz: &TimeZone,
    me: &str,
    names: &HashMap<String, String>,
) -> Vec<Line<'static>> {
    let wanted = rows + b.scroll;
    let mut collected: Vec<Line<'static>> = Vec::new();
    for i in (0..b.entries.len()).rev() {
        let mut lines = entry_lines(b, i, columns, tz, me, names);
        lines.append(&mut collected);
        collected = lines;
        if collected.len() >= wanted {
            break;
        }
    }
    let end = collected.len().saturating_sub(b.scroll);
    let start = end.saturating_sub(rows);
    collected.drain(start..end).collect()
}

pub fn render(frame: &mut Frame, app: &App) {
    let area = frame.area();
    if layout::too_small(area) {
        render_too_small(frame, area);
        return;
    }
    match &app.phase {
        Phase::Login(form) => render_login(frame, area, app, form),
        Phase::Connecting => {
            let text = format!("Connecting to {} as {}…", app.opts.server, app.opts.user);
            render_centered(
                frame,
                area,
                vec![Line::from(text), Line::from(""), Line::from("Esc quits")],
            );
        }
        Phase::ConfirmFingerprint { fingerprint } => render_confirm(frame, area, app, fingerprint),
        Phase::Mismatch { text } => render_mismatch(frame, area, text),
        Phase::Failed { message } => render_failed(frame, area, message),
        Phase::Chat => render_chat(frame, area, app),
    }
}

fn render_too_small(frame: &mut Frame, area: Rect) {
    let text = vec![
        Line::from("terminal too small"),
        Line::from(format!(
            "{}x{}, need {MIN_WIDTH}x{MIN_HEIGHT}",
            area.width, area.height
        )),
    ];
    frame.render_widget(
        Paragraph::new(text)
            .wrap(Wrap { trim: true })
            .alignment(Alignment::Center),
        area,
    );
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn render_centered(frame: &mut Frame, area: Rect, lines: Vec<Line<'static>>) {
    let height = lines.len() as u16 + 2;
    let r = centered(area, area.width.saturating_sub(4).min(76), height);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(" conclave ")),
        r,
    );
}

fn render_login(frame: &mut Frame, area: Rect, app: &App, form: &LoginForm) {
    let title = if app.opts.register {
        format!(" Register {} on {} ", app.opts.user, app.opts.server)
    } else {
        format!(" Log in to {} as {} ", app.opts.server, app.opts.user)
    };
    let box_area = centered(area, area.width.saturating_sub(4).min(64), 9);
    let inner_width = box_area.width.saturating_sub(2 + 12) as usize;
    let mut lines = Vec::new();
    let (pw, pw_col) = form.password.view(inner_width);
    lines.push(Line::from(vec![Span::raw("Password:   "), Span::raw(pw)]));
    let mut cursor = (pw_col, 0);
    if let Some(confirm) = &form.confirm {
        let (again, col) = confirm.view(inner_width);
        lines.push(Line::from(vec![
            Span::raw("Again:      "),
            Span::raw(again),
        ]));
        if form.field == 1 {
            cursor = (col, 1);
        }
    }
    lines.push(Line::from(""));
    if let Some(error) = &form.error {
        lines.push(Line::from(Span::styled(
            sanitize(error, false),
            Style::default().fg(Color::Red),
        )));
    }
    lines.push(Line::from(Span::styled(
        "Enter to continue · Esc to quit · each character shows as •",
        Style::default().fg(Color::DarkGray),
    )));
    frame.render_widget(Clear, box_area);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(title)),
        box_area,
    );
    frame.set_cursor_position(Position::new(
        box_area.x + 1 + 12 + cursor.0 as u16,
        box_area.y + 1 + cursor.1,
    ));
}

fn fingerprint_rows(fingerprint: &str) -> Vec<String> {
    let formatted = format_fingerprint(fingerprint);
    let pairs: Vec<&str> = formatted.split(':').collect();
    pairs
        .chunks(FINGERPRINT_PAIRS_PER_ROW)
        .map(|c| c.join(":"))
        .collect()
}

fn render_confirm(frame: &mut Frame, area: Rect, app: &App, fingerprint: &str) {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut lines = vec![
        Line::from(Span::styled(
            format!("First connection to {}", app.opts.server),
            bold,
        )),
        Line::from(""),
        Line::from("The server presented a certificate with this SHA-256 fingerprint:"),
        Line::from(""),
    ];
    for row in fingerprint_rows(fingerprint) {
        lines.push(Line::from(Span::styled(
            format!("    {row}"),
            Style::default()
                .fg(Color::Yellow)
                .add_modifier(Modifier::BOLD),
        )));
    }
    lines.extend([
        Line::from(""),
        Line::from("Compare it with what the server's operator sees (`conclave fingerprint` on the server), over a channel you trust. Nothing has been sent to this server yet: not your password."),
        Line::from(""),
        Line::from(vec![
            Span::styled("y", bold),
            Span::raw(": it matches; trust this server and remember it (later connections check it)"),
        ]),
        Line::from(vec![Span::styled("n", bold), Span::raw(" or Esc: do not trust it; quit")]),
    ]);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(" Is this the right server? ")),
        area,
    );
}

fn render_mismatch(frame: &mut Frame, area: Rect, text: &str) {
    let style = Style::default().fg(Color::White).bg(Color::Red);
    let mut lines: Vec<Line> = text
        .lines()
        .map(|l| Line::from(sanitize(l, false)))
        .collect();
    lines.push(Line::from(""));
    lines.push(Line::from(Span::styled(
        "Press q to quit. Nothing was sent to this server.",
        Style::default().add_modifier(Modifier::BOLD),
    )));
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines)
            .style(style)
            .wrap(Wrap { trim: false })
            .block(
                Block::bordered()
                    .title(" THE SERVER'S CERTIFICATE HAS CHANGED ")
                    .style(style),
            ),
        area,
    );
}

fn render_failed(frame: &mut Frame, area: Rect, message: &str) {
    let mut lines: Vec<Line<'static>> = message
        .lines()
        .map(|l| Line::from(sanitize(l, false)))
        .collect();
    lines.push(Line::from(""));
    lines.push(Line::from("Press q to quit."));
    let height = (lines.len() as u16 + 6).min(area.height);
    let r = centered(area, area.width.saturating_sub(4).min(90), height);
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }).block(
            Block::bordered()
                .title(" Could not connect ")
                .border_style(Style::default().fg(Color::Red)),
        ),
        r,
    );
}

fn render_chat(frame: &mut Frame, area: Rect, app: &App) {
    let a = layout::areas(area, app.members_visible(), app.transfers.len());
    let b = app.current_buffer();
    let me = app.me();
    if let Some(r) = a.sidebar {
        render_sidebar(frame, r, app);
    }
    if let Some(r) = a.members {
        render_members(frame, r, b, &app.chat);
    }
    // Title.
    let title = match &b.key {
        ConvKey::Status => format!(" {} · status and server notices", b.key.label()),
        ConvKey::Room(room) => {
            let online = b.members.values().filter(|p| p.online).count();
            let topic = app
                .chat
                .topics
                .get(room)
                .map(|t| format!(" · {}", crate::text::sanitize(t, false)))
                .unwrap_or_default();
            format!(
                " {}{topic} · {} members, {online} online",
                b.key.label(),
                b.members.len()
            )
        }
        ConvKey::Direct(people) => format!(
            " {} · direct conversation with {}",
            b.key.label(),
            people.join(", ")
        ),
    };
    // "read by": who has read the newest message.
    let read_by = b
        .entries
        .iter()
        .rev()
        .find_map(crate::buffer::Entry::seq)
        .map(|seq| app.chat.read_by(&b.key, seq, me))
        .filter(|who| !who.is_empty())
        .map(|who| format!(" · read by {}", who.join(", ")))
        .unwrap_or_default();
    let title = format!("{title}{read_by}");
    let mut title_spans = vec![Span::raw(truncate(&title, a.title.width as usize))];
    if b.selected.is_some() {
        if let Some(who) = app.selected_reactions() {
            title_spans.push(Span::styled(
                format!(" [{who}]"),
                Style::default().fg(Color::LightYellow),
            ));
        }
        title_spans.push(Span::styled(
            " [selected: /reply /edit /delete /react /thread, Esc lets go]",
            Style::default().fg(Color::LightCyan),
        ));
    } else if b.scroll > 0 {
        title_spans.push(Span::styled(
            format!(" [scrolled: {} new, PgDn]", b.unread),
            Style::default().fg(Color::Yellow),
        ));
    }
    frame.render_widget(
        Paragraph::new(Line::from(title_spans)).style(Style::default().bg(Color::Indexed(236))),
        a.title,
    );
    // Conversation, and under it the thread pane when it is open here.
    let names = app.nick_labels();
    let columns = a.chat.width as usize;
    let mut chat = a.chat;
    if app.thread_shown_for(app.current)
        && let Some(pane) = &app.thread
    {
        let (main, rows) = layout::thread_split(chat.height);
        let r = Rect::new(chat.x, chat.y + main, chat.width, rows);
        chat.height = main;
        render_thread(frame, r, app, pane, &names);
    }
    let lines = visible_lines(b, columns, chat.height as usize, &app.tz, me, &names);
    let pad = (chat.height as usize).saturating_sub(lines.len());
    let mut shown: Vec<Line> = std::iter::repeat_n(Line::from(""), pad).collect();
    shown.extend(lines);
    frame.render_widget(Paragraph::new(shown), chat);
    if let Some(r) = a.transfers {
        render_transfers(frame, r, app);
    }
    render_status(frame, a.status, app);
    render_input(frame, a.input, app);
    match &app.overlay {
        Overlay::None => {}
        Overlay::Help { scroll } => {
            let r = Rect::new(area.x, area.y, area.width, area.height.saturating_sub(2));
            render_help(frame, r, *scroll);
        }
        Overlay::Search {
            query,
            results,
            selected,
        } => {
            render_search(frame, a.chat, app, query, results, *selected);
        }
    }
}

/// The thread pane: a title row, then the thread's messages (the newest at the bottom).
fn render_thread(
    frame: &mut Frame,
    r: Rect,
    app: &App,
    pane: &crate::thread::ThreadPane,
    names: &HashMap<String, String>,
) {
    if r.height == 0 {
        return;
    }
    let root = pane
        .buffer
        .entries
        .iter()
        .find(|e| e.msg_id() == Some(pane.root.as_str()));
    let about = match root {
        Some(e) => {
            let from = match &e.kind {
                EntryKind::Message { from, .. } => names.get(from).unwrap_or(from).clone(),
                EntryKind::Notice(_) => String::new(),
            };
            let start: String = e.text.chars().take(40).collect();
            format!("{from}: {}", start.replace('\n', " "))
        }
        None if pane.loading => "loading…".to_string(),
        None => "(the first message is not available)".to_string(),
    };
    let title = format!(
        " thread · {about} · {} replies · what you type answers here · Esc or /thread closes",
        pane.replies()
    );
    frame.render_widget(
        Paragraph::new(Line::from(truncate(&title, r.width as usize)))
            .style(Style::default().bg(Color::Indexed(236))),
        Rect::new(r.x, r.y, r.width, 1),
    );
    let body = Rect::new(r.x, r.y + 1, r.width, r.height - 1);
    let lines = visible_lines(
        &pane.buffer,
        body.width as usize,
        body.height as usize,
        &app.tz,
        app.me(),
        names,
    );
    let pad = (body.height as usize).saturating_sub(lines.len());
    let mut shown: Vec<Line> = std::iter::repeat_n(Line::from(""), pad).collect();
    shown.extend(lines);
    frame.render_widget(Paragraph::new(shown), body);
}

fn render_sidebar(frame: &mut Frame, r: Rect, app: &App) {
    let inner = (r.width as usize).saturating_sub(1);
    let mut lines = Vec::new();
    for (i, b) in app.buffers.iter().enumerate() {
        let number = if i < 9 {
            format!("{}.", i + 1)
        } else {
            "  ".into()
        };
        let count = if b.unread > 0 {
            format!(" {}", b.unread)
        } else {
            String::new()
        };
        let label_w = inner.saturating_sub(width(&number) + width(&count));
        let label = truncate(&b.key.label(), label_w);
        let gap = inner.saturating_sub(width(&number) + width(&label) + width(&count));
        let mut style = Style::default();
        if b.mention {
            style = style.fg(Color::LightMagenta).add_modifier(Modifier::BOLD);
        } else if b.unread > 0 {
            style = style.fg(Color::Yellow).add_modifier(Modifier::BOLD);
        }
        if i == app.current {
            style = style.add_modifier(Modifier::REVERSED);
        }
        lines.push(Line::from(vec![
            Span::styled(number, Style::default().fg(Color::DarkGray)),
            Span::styled(format!("{label}{}{count}", " ".repeat(gap)), style),
        ]));
    }
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::RIGHT)
                .border_style(Style::default().fg(Color::DarkGray)),
        ),
        r,
    );
}

fn render_members(frame: &mut Frame, r: Rect, b: &Buffer, chat: &crate::chat::ChatState) {
    let inner = (r.width as usize).saturating_sub(1);
    let mut members: Vec<(&String, &crate::buffer::Presence)> = b.members.iter().collect();
    members.sort_by_key(|(name, p)| (!p.online, !p.admin, (*name).clone()));
    let lines: Vec<Line> = members
        .into_iter()
        .map(|(name, p)| {
            let away = p.online && chat.away.contains_key(name.as_str());
            let (dot, style) = if away {
                ("◐", Style::default().fg(Color::Yellow))
            } else if p.online {
                ("●", Style::default().fg(Color::Green))
            } else {
                ("○", Style::default().fg(Color::DarkGray))
            };
            let admin = if p.admin { "@" } else { " " };
            Line::from(vec![
                Span::styled(format!("{dot}{admin}"), style),
                Span::styled(
                    truncate(&chat.shown_name(name), inner.saturating_sub(2)),
                    if p.online {
                        Style::default().fg(nick_colour(name))
                    } else {
                        Style::default().fg(Color::DarkGray)
                    },
                ),
            ])
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::LEFT)
                .border_style(Style::default().fg(Color::DarkGray)),
        ),
        r,
    );
}

fn render_transfers(frame: &mut Frame, r: Rect, app: &App) {
    let columns = r.width as usize;
    let lines: Vec<Line> = app
        .transfers
        .iter()
        .take(r.height as usize)
        .map(|t| {
            let ratio = if t.total == 0 {
                1.0
            } else {
                (t.done as f64 / t.total as f64).clamp(0.0, 1.0)
            };
            let arrow = if t.sending { "↑" } else { "↓" };
            let figures = format!(
                " {:>3}% {} / {}",
                (ratio * 100.0).round() as u64,
                human_bytes(t.done),
                human_bytes(t.total)
            );
            let name = truncate(&t.name, (columns / 3).max(4));
            let bar_w = columns
                .saturating_sub(width(arrow) + 1 + width(&name) + 3 + width(&figures))
                .max(1);
            let filled = ((bar_w as f64) * ratio).round() as usize;
            Line::from(vec![
                Span::raw(format!("{arrow} {name} [")),
                Span::styled("█".repeat(filled), Style::default().fg(Color::Green)),
                Span::raw(" ".repeat(bar_w - filled.min(bar_w))),
                Span::raw(format!("]{figures}")),
            ])
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), r);
}

/// The first pairs of the fingerprint, as the status bar shows it.
pub fn short_fingerprint(fingerprint: &str) -> String {
    let formatted = format_fingerprint(fingerprint);
    formatted
        .split(':')
        .take(SHORT_FINGERPRINT_PAIRS)
        .collect::<Vec<_>>()
        .join(":")
}

fn latency_text(latency: Option<Duration>) -> String {
    match latency {
        None => "-- ms".into(),
        Some(d) if d < Duration::from_millis(1) => "<1 ms".into(),
        Some(d) => format!("{} ms", d.as_millis()),
    }
}

fn render_status(frame: &mut Frame, r: Rect, app: &App) {
    let bar = Style::default().bg(Color::Indexed(236)).fg(Color::Gray);
    let sep = Span::styled(" │ ", bar.fg(Color::DarkGray));
    let (state, state_style) = match &app.conn {
        ConnState::Connected => ("● connected".to_string(), bar.fg(Color::Green)),
        ConnState::Reconnecting { since_ms, .. } => {
            let text = match app.next_attempt_ms {
                // Rounded up: "in 1s" until the attempt starts.
                Some(at) if at > app.now_ms => {
                    format!("◌ reconnecting in {}s", (at - app.now_ms + 999) / 1000)
                }
                _ => {
                    let secs = (app.now_ms - since_ms).max(0) / 1000;
                    format!("◌ reconnecting… ({secs}s offline)")
                }
            };
            (text, bar.fg(Color::Yellow))
        }
        ConnState::Closed { .. } => ("✗ disconnected".to_string(), bar.fg(Color::Red)),
    };
    let mut spans = vec![
        // The address connected to (one of a --server list), once there is one.
        Span::styled(
            format!(
                " {}",
                app.session
                    .as_ref()
                    .map_or(app.opts.server.as_str(), |s| s.server.as_str())
            ),
            bar,
        ),
        sep.clone(),
        Span::styled(state, state_style),
    ];
    let mut kx_span = None;
    if let Some(s) = &app.session {
        spans.push(sep.clone());
        // The key exchange group next to the version: yellow when classical (traffic recorded
        // today could be decrypted by a future quantum computer).
        let kx_style = if conclave_client::is_post_quantum(&s.key_exchange) {
            bar
        } else {
            bar.fg(Color::Yellow)
        };
        spans.push(Span::styled(format!("{} ", s.tls_version), bar));
        kx_span = Some(spans.len());
        spans.push(Span::styled(s.key_exchange.clone(), kx_style));
        spans.push(Span::styled(
            format!(" {}", short_fingerprint(&s.fingerprint)),
            bar,
        ));
        spans.push(sep.clone());
        spans.push(Span::styled(latency_text(app.latency), bar));
    }
    spans.push(sep.clone());
    spans.push(Span::styled(
        app.current_buffer().key.label(),
        bar.add_modifier(Modifier::BOLD),
    ));
    // Which kind of conversation this is: end to end, or readable by the server.
    let key = &app.current_buffer().key;
    if matches!(key, ConvKey::Room(_) | ConvKey::Direct(_)) {
        let (text, colour) = if app.e2ee.contains(key) {
            (" E2EE", Color::Green)
        } else {
            (" server-enc", Color::Yellow)
        };
        spans.push(Span::styled(text, bar.fg(colour)));
    }
    spans.push(sep);
    spans.push(Span::styled(
        app.me().to_string(),
        bar.fg(nick_colour(app.me())),
    ));
    if let Some(typing) = app.chat.typing_line(key, app.now_ms) {
        spans.push(Span::styled(format!(" │ {typing}"), bar.fg(Color::Cyan)));
    }
    // Other buffers with a mention or unread messages.
    let activity: Vec<String> = app
        .buffers
        .iter()
        .enumerate()
        .filter(|(i, b)| *i != app.current && b.unread > 0)
        .map(|(i, _)| (i + 1).to_string())
        .collect();
    if !activity.is_empty() {
        spans.push(Span::styled(
            format!(" │ act: {}", activity.join(",")),
            bar.fg(Color::Yellow),
        ));
    }
    // On a narrow terminal a post-quantum group is shown as `PQ` so the rest still fits; a
    // classical group (short anyway, and a warning) keeps its name.
    let mut line = Line::from(spans);
    if line.width() > r.width as usize
        && let Some(i) = kx_span
        && let Some(span) = line.spans.get_mut(i)
        && conclave_client::is_post_quantum(&span.content)
    {
        span.content = "PQ".into();
    }
    frame.render_widget(Paragraph::new(line).style(bar), r);
}

fn render_input(frame: &mut Frame, r: Rect, app: &App) {
    let (prompt, editor) = match app.recovery_field() {
        Some(field) => (format!("[{}] ", crate::app::RECOVERY_PROMPT), field),
        None => (
            format!(
                "[{}] ",
                truncate(&app.current_buffer().key.label(), (r.width as usize) / 3)
            ),
            &app.input,
        ),
    };
    let prompt_w = width(&prompt);
    let (shown, col) = editor.view((r.width as usize).saturating_sub(prompt_w));
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(prompt, Style::default().fg(Color::Cyan)),
            Span::raw(shown),
        ])),
        r,
    );
    if app.overlay == Overlay::None || matches!(app.overlay, Overlay::Help { .. }) {
        frame.set_cursor_position(Position::new(r.x + (prompt_w + col) as u16, r.y));
    }
}

/// The help text, a line per entry.
pub fn help_lines() -> Vec<Line<'static>> {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut lines = vec![Line::from(Span::styled("Keys", bold))];
    for (keys, what) in [
        (
            "Enter",
            "send the line (Alt-Enter: a new line in the message)",
        ),
        (
            "Tab",
            "complete a command, a name or a #room (again: the next one)",
        ),
        ("Up / Down", "earlier lines you typed"),
        (
            "Alt-Up / Alt-Down",
            "select a message: /reply, /edit, /delete, /react, /thread act on it",
        ),
        (
            "PgUp / PgDn, wheel",
            "scroll; past the top loads older messages",
        ),
        (
            "Ctrl-N / Ctrl-P",
            "next / previous conversation (also Alt-1..9, Alt-←/→)",
        ),
        ("F1 / F2", "this help / the members pane"),
        (
            "Ctrl-W Ctrl-U Ctrl-K",
            "delete a word / to the start / to the end",
        ),
        (
            "Esc",
            "close a pane, let go of the selection, close the thread; Ctrl-C quits",
        ),
    ] {
        lines.push(Line::from(vec![
            Span::styled(format!("  {keys:<22}"), Style::default().fg(Color::Cyan)),
            Span::raw(what),
        ]));
    }
    lines.push(Line::from(""));
    lines.push(Line::from(Span::styled(
        "Commands (a line starting with // sends a /)",
        bold,
    )));
    for c in COMMANDS {
        lines.push(Line::from(vec![
            Span::styled(
                format!(
                    "  {:<HELP_COMMAND_COLUMNS$}",
                    format!("/{} {}", c.name, c.args)
                ),
                Style::default().fg(Color::Cyan),
            ),
            Span::raw(format!(" {}", c.help)),
        ]));
    }
    lines
}

fn render_help(frame: &mut Frame, r: Rect, scroll: usize) {
    let lines = help_lines();
    let scroll = scroll.min(lines.len().saturating_sub(1));
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .scroll((scroll.min(u16::MAX as usize) as u16, 0))
            .block(Block::bordered().title(" Help · Up/Down scroll · Esc closes ")),
        r,
    );
}

fn render_search(
    frame: &mut Frame,
    r: Rect,
    app: &App,
    query: &str,
    results: &[conclave_client::proto::Message],
    selected: usize,
) {
    let inner_rows = r.height.saturating_sub(2) as usize;
    let columns = r.width.saturating_sub(2) as usize;
    // Keep the selected result in view.
    let first = selected.saturating_sub(inner_rows.saturating_sub(1));
    let lines: Vec<Line> = results
        .iter()
        .enumerate()
        .skip(first)
        .take(inner_rows)
        .map(|(i, m)| {
            let key = ConvKey::from_conv(&m.conv, app.me());
            let when = zoned(m.ts_ms, &app.tz)
                .map_or_else(String::new, |z| z.strftime("%Y-%m-%d %H:%M").to_string());
            let body = m
                .body
                .as_text()
                .map_or_else(|| "[not text]".to_string(), |t| sanitize(t, false));
            let head = format!("{when} {} {}: ", key.label(), m.from);
            let rest = truncate(&body, columns.saturating_sub(width(&head)));
            let mut line = Line::from(vec![
                Span::styled(head, Style::default().fg(nick_colour(&m.from))),
                Span::raw(rest),
            ]);
            if i == selected {
                line = line.style(Style::default().add_modifier(Modifier::REVERSED));
            }
            line
        })
        .collect();
    let title = format!(
        " search {:?}: {} result(s) · ↑↓ choose · Enter jumps · Esc closes ",
        text::truncate(query, 30),
        results.len()
    );
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        r,
    );
}
