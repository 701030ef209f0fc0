//! `conclave monitor`: live traffic and alerts of a running server, over its admin socket.
//!
//! On a terminal: a full-screen view refreshed in place (ratatui), sortable, quit with `q`. The
//! terminal is restored on exit, on error and on panic. When stdout is not a terminal (or with
//! `--json`): one JSON object per line per interval, the server's `monitor` answer as it is.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, TableState, Wrap};
use serde_json::{Value, json};

use crate::admin::{ok, request};
use crate::cli::DataDirArg;

/// Sort orders, in the order `s` cycles through them.
const SORTS: [&str; 7] = ["id", "user", "ip", "bytes", "rate", "rtt", "queue"];
/// Shortest refresh interval accepted.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Alerts fetched per refresh.
const ALERTS_SHOWN: u64 = 50;

#[derive(Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    pub data: DataDirArg,
    /// Seconds between refreshes.
    #[arg(long, value_name = "SECS", default_value = "1")]
    pub interval: f64,
    /// Sort connections by id, user, ip, bytes, rate, rtt or queue (press s to change).
    #[arg(long, default_value = "id", value_parser = clap::builder::PossibleValuesParser::new(SORTS))]
    pub sort: String,
    /// Most connections fetched per refresh.
    #[arg(long, value_name = "N", default_value = "1000")]
    pub limit: u64,
    /// Stop after this many refreshes (default: until q, Ctrl-C or a closed pipe).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// One JSON line per interval, even on a terminal.
    #[arg(long)]
    pub json: bool,
}

pub const MONITOR_HELP: &str = "\
On a terminal: q quits, s changes the sort, r reverses it, arrows and PgUp/PgDn scroll.
Elsewhere (a pipe, a file) or with --json: one JSON object per line per interval.

Examples:
  conclave monitor
  conclave monitor --sort rate
  conclave monitor --json --interval 5 | jq -c '.totals'
  conclave monitor --count 1 > snapshot.json";

fn fetch(data_dir: &Path, sort: &str, limit: u64) -> anyhow::Result<Value> {
    let answer = ok(request(
        data_dir,
        &json!({"cmd": "monitor", "sort": sort, "limit": limit, "alerts": ALERTS_SHOWN}),
    )?)?;
    Ok(answer)
}

pub fn run(args: MonitorArgs) -> anyhow::Result<ExitCode> {
    if !args.interval.is_finite() || args.interval <= 0.0 {
        bail!("--interval must be a positive number of seconds, like 1 or 0.5");
    }
    let interval = Duration::from_secs_f64(args.interval).max(MIN_INTERVAL);
    // Fail early, with the admin socket's explanation, when no server answers.
    let first = fetch(&args.data.data_dir, &args.sort, args.limit)?;
    if args.json || !std::io::stdout().is_terminal() {
        return json_lines(&args, interval, first);
    }
    tui(&args, interval, first)
}

/// One JSON line per interval; ends after `--count` lines, or quietly when the reader goes.
fn json_lines(args: &MonitorArgs, interval: Duration, first: Value) -> anyhow::Result<ExitCode> {
    let mut next = Some(first);
    let mut stdout = std::io::stdout().lock();
    for n in 1u64.. {
        let started = Instant::now();
        let mut snapshot = match next.take() {
            Some(s) => s,
            None => fetch(&args.data.data_dir, &args.sort, args.limit)
                .context("the server stopped answering")?,
        };
        if let Some(o) = snapshot.as_object_mut() {
            o.remove("ok");
        }
        let written = writeln!(stdout, "{snapshot}").and_then(|()| stdout.flush());
        match written {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
        if args.count.is_some_and(|c| n >= c) {
            break;
        }
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
    Ok(ExitCode::SUCCESS)
}

/// Restores the terminal when dropped: on return, on error, and while unwinding. (ratatui's
/// own panic hook restores it before the panic message is printed.)
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

struct View {
    data_dir: String,
    sort: usize,
    reverse: bool,
    table: TableState,
    snapshot: Option<Value>,
    error: Option<String>,
    fetched: Instant,
}

fn tui(args: &MonitorArgs, interval: Duration, first: Value) -> anyhow::Result<ExitCode> {
    // Before init: a half-done init (raw mode on, no alternate screen) is undone too.
    let _restore = TerminalGuard;
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let mut view = View {
        data_dir: args.data.data_dir.display().to_string(),
        sort: SORTS.iter().position(|s| *s == args.sort).unwrap_or(0),
        reverse: false,
        table: TableState::default().with_selected(Some(0)),
        snapshot: Some(first),
        error: None,
        fetched: Instant::now(),
    };
    let mut refreshes = 1u64;
    loop {
        terminal
            .draw(|f| draw(f, &mut view, interval))
            .context("cannot draw")?;
        let wait = interval.saturating_sub(view.fetched.elapsed());
        if event::poll(wait).context("cannot read the terminal")? {
            if let Event::Key(k) = event::read().context("cannot read the terminal")? {
                if k.kind != KeyEventKind::Press {
                    continue;
                }
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => break,
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => break,
                    KeyCode::Char('s') => {
                        view.sort = (view.sort + 1) % SORTS.len();
                        view.fetched = Instant::now() - interval;
                    }
                    KeyCode::Char('r') => view.reverse = !view.reverse,
                    KeyCode::Down | KeyCode::Char('j') => view.table.select_next(),
                    KeyCode::Up | KeyCode::Char('k') => view.table.select_previous(),
                    KeyCode::PageDown => view.table.scroll_down_by(20),
                    KeyCode::PageUp => view.table.scroll_up_by(20),
                    KeyCode::Home => view.table.select_first(),
                    KeyCode::End => view.table.select_last(),
                    _ => {}
                }
            }
            continue;
        }
        if args.count.is_some_and(|c| refreshes >= c) {
            break;
        }
        refreshes += 1;
        view.fetched = Instant::now();
        match fetch(&args.data.data_dir, SORTS[view.sort], args.limit) {
            Ok(s) => {
                view.snapshot = Some(s);
                view.error = None;
            }
            Err(e) => view.error = Some(format!("{e:#}")),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn num(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// 1536 → "1.5 Ki"; units as binary multiples.
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut v = n;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// A duration in seconds for people: "45s", "12m", "3h20m", "2d4h".
pub fn human_secs(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m", secs / 60),
        3600..=86_399 => format!("{}h{}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{}h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn clock(ts_ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ts_ms)
        .map(|t| t.strftime("%H:%M:%S").to_string())
        .unwrap_or_else(|_| "?".into())
}

fn draw(f: &mut Frame, view: &mut View, interval: Duration) {
    let [head, totals, table, alerts, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(4),
        Constraint::Min(5),
        Constraint::Length(9),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let empty = Value::Null;
    let snap = view.snapshot.as_ref().unwrap_or(&empty);
    let server = &snap["server"];
    let mut title = vec![
        Span::styled("conclave monitor", Style::new().bold()),
        Span::raw(format!(
            "  {}  v{}  up {}  every {:.1} s  sort: {}{}",
            view.data_dir,
            s(server, "version"),
            human_secs(server["uptime_s"].as_u64().unwrap_or(0)),
            interval.as_secs_f64(),
            SORTS[view.sort],
            if view.reverse { " (reversed)" } else { "" }
        )),
    ];
    if let Some(e) = &view.error {
        title.push(Span::styled(format!("  {e}"), Style::new().red().bold()));
    }
    f.render_widget(Line::from(title), head);

    let t = &snap["totals"];
    let commit = match (
        t.get("store_commit_ms_mean").and_then(Value::as_f64),
        t.get("store_commit_ms_p99").and_then(Value::as_f64),
    ) {
        (Some(mean), Some(p99)) => format!("{mean:.1} ms mean, p99 <= {p99} ms"),
        _ => "idle".into(),
    };
    // Connections by TLS key exchange group, e.g. "X25519MLKEM768 3, X25519 1".
    let by_kx = t["connections_by_key_exchange"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(group, n)| format!("{group} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|text| !text.is_empty())
        .map_or(String::new(), |text| format!(" ({text})"));
    let lines = vec![
        Line::from(format!(
            "connections {}{}   users online {}   listen {}   registration {}",
            s(t, "connections"),
            by_kx,
            s(t, "users_online"),
            s(server, "listen"),
            s(server, "registration"),
        )),
        Line::from(format!(
            "messages {:.1}/s ({} total)   deliveries {:.1}/s   in {}/s   out {}/s",
            num(t, "messages_per_s"),
            s(t, "messages_total"),
            num(t, "deliveries_per_s"),
            human_bytes(num(t, "bytes_in_per_s")),
            human_bytes(num(t, "bytes_out_per_s")),
        )),
        Line::from(format!(
            "store commits {:.1}/s, {}, queue {}   outbound queues {} (max {})",
            num(t, "store_commits_per_s"),
            commit,
            s(t, "store_queue"),
            s(t, "outbound_queue_total"),
            s(t, "outbound_queue_max"),
        )),
        Line::from(format!(
            "logins ok {} failed {}   alerts {}   bans in force {}",
            s(t, "logins_ok"),
            s(t, "logins_failed"),
            s(t, "alerts_total"),
            s(t, "bans_active"),
        )),
    ];
    f.render_widget(Paragraph::new(lines), totals);

    let mut conns: Vec<&Value> = snap["connections"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    if view.reverse {
        conns.reverse();
    }
    let now = now_ms();
    let rows: Vec<Row> = conns
        .iter()
        .map(|c| {
            let rtt = c["rtt_ms"]
                .as_f64()
                .map_or("-".into(), |r| format!("{r:.2}"));
            let since = c["since_ms"]
                .as_i64()
                .map_or("-".into(), |t| human_secs(((now - t).max(0) / 1000) as u64));
            Row::new(vec![
                Cell::from(s(c, "id")),
                Cell::from(s(c, "user")),
                Cell::from(format!("{}:{}", s(c, "ip"), s(c, "port"))),
                Cell::from(s(c, "tls")),
                Cell::from(s(c, "cipher").trim_start_matches("TLS13_").to_string()),
                Cell::from(human_bytes(num(c, "bytes_in"))),
                Cell::from(human_bytes(num(c, "bytes_out"))),
                Cell::from(human_bytes(num(c, "bytes_in_per_s"))),
                Cell::from(human_bytes(num(c, "bytes_out_per_s"))),
                Cell::from(format!("{}/{}", s(c, "frames_in"), s(c, "frames_out"))),
                Cell::from(format!(
                    "{:.0}/{:.0}",
                    num(c, "frames_in_per_s"),
                    num(c, "frames_out_per_s")
                )),
                Cell::from(rtt),
                Cell::from(s(c, "queue")),
                Cell::from(since),
            ])
        })
        .collect();
    let header = Row::new(vec![
        "ID", "USER", "ADDRESS", "TLS", "CIPHER", "IN", "OUT", "IN/s", "OUT/s", "FRAMES", "FR/s",
        "RTT ms", "QUEUE", "SINCE",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let widths = [
        Constraint::Length(6),
        Constraint::Length(14),
        Constraint::Length(22),
        Constraint::Length(7),
        Constraint::Length(18),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(13),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(6),
        Constraint::Length(6),
    ];
    let shown = format!(
        " connections ({} of {}) ",
        conns.len(),
        s(snap, "connections_total")
    );
    let table_widget = Table::new(rows, widths)
        .header(header)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .block(Block::bordered().title(shown));
    f.render_stateful_widget(table_widget, table, &mut view.table);

    let alert_lines: Vec<Line> = snap["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .rev()
                .map(|x| {
                    Line::from(vec![
                        Span::raw(format!("{} ", clock(x["ts_ms"].as_i64().unwrap_or(0)))),
                        Span::styled(s(x, "rule"), Style::new().yellow().bold()),
                        Span::raw(format!(
                            " {} {}: {} within {} s. {}",
                            s(x, "scope"),
                            s(x, "target"),
                            s(x, "count"),
                            s(x, "window_s"),
                            s(x, "action")
                        )),
                    ])
                })
                .collect()
        })
        .unwrap_or_default();
    let alerts_title = format!(" alerts ({}) ", alert_lines.len());
    let alerts_widget = if alert_lines.is_empty() {
        Paragraph::new("no alerts")
    } else {
        Paragraph::new(alert_lines)
    };
    f.render_widget(
        alerts_widget
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(alerts_title)),
        alerts,
    );
    f.render_widget(
        Line::from("q quit   s sort   r reverse   ↑↓ PgUp PgDn scroll").dim(),
        help,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0.0), "0");
        assert_eq!(human_bytes(1023.0), "1023");
        assert_eq!(human_bytes(1536.0), "1.5 Ki");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0), "3.0 Mi");
        assert_eq!(human_secs(59), "59s");
        assert_eq!(human_secs(3600 + 120), "1h2m");
        assert_eq!(human_secs(2 * 86_400 + 3 * 3600), "2d3h");
    }

    #[test]
    fn the_view_draws_a_snapshot_and_an_empty_one() {
        let backend = ratatui::backend::TestBackend::new(160, 40);
        let mut terminal = ratatui::Terminal::new(backend).expect("terminal");
        let snapshot = json!({
            "server": {"version": "0.1.0", "uptime_s": 75, "listen": "127.0.0.1:7667", "registration": "open"},
            "totals": {"connections": 1, "connections_by_key_exchange": {"X25519MLKEM768": 1}, "users_online": 1, "messages_per_s": 2.5, "messages_total": 10,
                       "store_commit_ms_mean": 1.25, "store_commit_ms_p99": 2.5},
            "connections_total": 1,
            "connections": [{"id": 7, "user": "alice", "ip": "127.0.0.1", "port": 50000, "tls": "TLS 1.3",
                             "cipher": "TLS13_AES_256_GCM_SHA384", "bytes_in": 2048, "rtt_ms": 0.05, "queue": 0}],
            "alerts": [{"ts_ms": 0, "rule": "failed_logins", "scope": "address", "target": "192.0.2.7",
                        "count": 20, "window_s": 60, "action": "banned for 15 min"}],
        });
        let mut view = View {
            data_dir: "/srv/conclave".into(),
            sort: 0,
            reverse: false,
            table: TableState::default(),
            snapshot: Some(snapshot),
            error: None,
            fetched: Instant::now(),
        };
        terminal
            .draw(|f| draw(f, &mut view, Duration::from_secs(1)))
            .expect("draw");
        let screen: String = terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        for needle in [
            "conclave monitor",
            "alice",
            "127.0.0.1:50000",
            "AES_256_GCM_SHA384",
            "2.0 Ki",
            "failed_logins",
            "banned for 15 min",
            "1.2 ms mean",
            "connections 1 (X25519MLKEM768 1)",
        ] {
            assert!(screen.contains(needle), "{needle:?} not on screen");
        }
        view.snapshot = None;
        view.error = Some("cannot reach a running server".into());
        terminal
            .draw(|f| draw(f, &mut view, Duration::from_secs(1)))
            .expect("draw without data");
    }
}
