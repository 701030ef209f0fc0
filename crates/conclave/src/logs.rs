//! `conclave logs`: show, filter, follow and verify the audit log of a data directory
//! (docs/audit-log.md). It only reads; it works while the server runs.

use std::fs::File;
use std::io::{self, BufReader, IsTerminal, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use conclave_server::audit::{self, AUDIT_DIR, CURRENT_FILE, Kind, LineReader, Record};
use ipnet::IpNet;
use jiff::Timestamp;
use serde_json::Value;

use crate::cli::LogsArgs;

/// How often `--follow` looks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Warnings about unreadable lines printed before they are only counted.
const MAX_WARNINGS: u64 = 10;
/// The longest time ago `--since 99999d` may reach (about 1000 years).
const MAX_AGO_SECS: u64 = 1000 * 366 * 24 * 3600;

const TIME_FORMS: &str = "give RFC 3339 (2026-11-21T10:00:00Z), a date (2026-11-21, meaning midnight UTC) or a time ago (30s, 15m, 2h, 7d)";

pub fn run(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let filter = Filter::from_args(&args)?;
    let data_dir = &args.data.data_dir;
    crate::cli::require_dir(data_dir)?;
    if args.verify {
        return verify(data_dir, args.json);
    }
    let printer = Printer::new(args.json);
    let result = if args.follow {
        follow(data_dir, &filter, printer)
    } else {
        show(data_dir, &filter, printer)
    };
    match result {
        // `conclave logs | head`: the reader left; that is not an error.
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(ExitCode::SUCCESS)
        }
        other => other,
    }
}

fn no_log_message(data_dir: &Path) -> String {
    format!(
        "no audit log in {} (a server writes one there while it runs)",
        data_dir.join(AUDIT_DIR).display()
    )
}

// ---------------------------------------------------------------------------------------------
// Filters
// ---------------------------------------------------------------------------------------------

struct Filter {
    since: Option<Timestamp>,
    until: Option<Timestamp>,
    net: Option<IpNet>,
    user: Option<String>,
    kinds: Vec<Kind>,
}

impl Filter {
    fn from_args(args: &LogsArgs) -> anyhow::Result<Filter> {
        let since = args
            .since
            .as_deref()
            .map(|t| parse_time("--since", t))
            .transpose()?;
        let until = args
            .until
            .as_deref()
            .map(|t| parse_time("--until", t))
            .transpose()?;
        if let (Some(s), Some(u)) = (since, until)
            && s > u
        {
            bail!("--since ({s:.3}) is after --until ({u:.3}): no record can match");
        }
        let net = args.ip.as_deref().map(parse_net).transpose()?;
        let mut kinds = Vec::new();
        for k in &args.kind {
            if k.trim().is_empty() {
                continue;
            }
            match Kind::parse(k) {
                Some(kind) => kinds.push(kind),
                None => {
                    let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                    bail!(
                        "--kind {k:?}: no such kind of record; the kinds are {}",
                        known.join(", ")
                    );
                }
            }
        }
        Ok(Filter {
            since,
            until,
            net,
            user: args.user.clone(),
            kinds,
        })
    }

    fn matches(&self, r: &Record) -> bool {
        if self.since.is_some_and(|s| r.ts < s) || self.until.is_some_and(|u| r.ts > u) {
            return false;
        }
        if let Some(net) = &self.net
            && !r.ip.is_some_and(|ip| net.contains(&ip.to_canonical()))
        {
            return false;
        }
        if let Some(user) = &self.user
            && !r
                .user
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(user))
        {
            return false;
        }
        self.kinds.is_empty() || self.kinds.iter().any(|k| k.as_str() == r.kind)
    }
}

/// `T` of `--since`/`--until`: RFC 3339, a date (midnight UTC), or a time ago (`15m`).
fn parse_time(flag: &str, text: &str) -> anyhow::Result<Timestamp> {
    let t = text.trim();
    let bad = || anyhow::anyhow!("{flag} {text:?}: not a time; {TIME_FORMS}");
    if let Some(unit) = t.chars().last().filter(|c| "smhd".contains(*c)) {
        let digits = &t[..t.len() - 1];
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            let n: u64 = digits.parse().map_err(|_| bad())?;
            let unit_secs = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                _ => 86_400,
            };
            let secs = n
                .checked_mul(unit_secs)
                .filter(|&s| s <= MAX_AGO_SECS)
                .ok_or_else(|| anyhow::anyhow!("{flag} {text:?}: too long ago"))?;
            let ago = jiff::SignedDuration::from_secs(secs as i64);
            return Timestamp::now()
                .checked_sub(ago)
                .map_err(|_| anyhow::anyhow!("{flag} {text:?}: too long ago"));
        }
    }
    if let Ok(ts) = t.parse::<Timestamp>() {
        return Ok(ts);
    }
    let is_date = t.len() == 10
        && t.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if is_date && let Ok(date) = t.parse::<jiff::civil::Date>() {
        return date
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map(|z| z.timestamp())
            .map_err(|_| bad());
    }
    Err(bad())
}

/// `--ip`: a CIDR network or one address.
fn parse_net(text: &str) -> anyhow::Result<IpNet> {
    let t = text.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(ip.to_canonical()));
    }
    bail!(
        "--ip {text:?}: not a network or address; give a CIDR (203.0.113.0/24, 2001:db8::/32) or one address (203.0.113.7, 2001:db8::1)"
    )
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

struct Printer {
    json: bool,
    color: bool,
    out: io::BufWriter<io::Stdout>,
    header_done: bool,
    /// Records printed.
    shown: u64,
}

const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const GREEN: &str = "\x1b[32m";
const RESET: &str = "\x1b[0m";

impl Printer {
    fn new(json: bool) -> Printer {
        let stdout = io::stdout();
        let color = !json
            && stdout.is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            && std::env::var("TERM").map_or(true, |t| t != "dumb");
        Printer {
            json,
            color,
            out: io::BufWriter::new(stdout),
            header_done: false,
            shown: 0,
        }
    }

    fn print(&mut self, r: &Record) -> io::Result<()> {
        self.shown += 1;
        if self.json {
            return writeln!(self.out, "{}", r.raw);
        }
        if !self.header_done {
            self.header_done = true;
            writeln!(
                self.out,
                "{:<23}  {:<15}  {:<16}  {:<21}  {:<16}  DETAILS",
                "TIME (UTC)", "KIND", "USER", "ADDRESS", "ROOM"
            )?;
        }
        let time = format!("{:.3}", r.ts).replace('T', " ").replace('Z', "");
        let kind = format!("{:<15}", clean(&r.kind));
        let kind = match self.colour_of(r) {
            Some(c) => format!("{c}{kind}{RESET}"),
            None => kind,
        };
        let addr = match (r.ip, r.port) {
            (Some(IpAddr::V6(ip)), Some(port)) => format!("[{ip}]:{port}"),
            (Some(ip), Some(port)) => format!("{ip}:{port}"),
            (Some(ip), None) => ip.to_string(),
            (None, _) => "-".to_string(),
        };
        let mut details: Vec<String> = Vec::new();
        if let Some(reason) = &r.reason {
            details.push(clean(reason));
        }
        for (k, v) in &r.extra {
            let v = match v {
                Value::String(s) if !s.is_empty() && !s.contains(char::is_whitespace) => clean(s),
                Value::String(s) => format!("{:?}", clean(s)),
                other => clean(&other.to_string()),
            };
            details.push(format!("{}={v}", clean(k)));
        }
        let line = format!(
            "{time:<23}  {kind}  {:<16}  {addr:<21}  {:<16}  {}",
            r.user.as_deref().map_or("-".into(), clean),
            r.room.as_deref().map_or("-".into(), clean),
            details.join("  "),
        );
        writeln!(self.out, "{}", line.trim_end())
    }

    fn colour_of(&self, r: &Record) -> Option<&'static str> {
        if !self.color {
            return None;
        }
        match r.known_kind()? {
            Kind::LoginFailed
            | Kind::Ban
            | Kind::IpRejected
            | Kind::Alert
            | Kind::Error
            | Kind::AuditDropped => Some(RED),
            Kind::Kick
            | Kind::Limit
            | Kind::Unban
            | Kind::Vote
            | Kind::VoteResult
            | Kind::AuditRecovered => Some(YELLOW),
            Kind::LoginOk | Kind::Register => Some(GREEN),
            _ => None,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Text from the log made safe for a terminal: control characters (an escape sequence in a
/// kick reason, say) are shown escaped instead of being obeyed.
fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// Reads records from a file from a byte offset, printing those that match.
struct Reader<'a> {
    filter: &'a Filter,
    printer: Printer,
    /// Seq of the last record read (printed or not).
    last_seq: Option<u64>,
    warnings: u64,
}

impl Reader<'_> {
    /// Reads `file` from `*offset` to its end, advancing `*offset` past each complete line (an
    /// incomplete last line is left for later: it may still be being written). With `after`,
    /// records up to that seq are skipped (already shown before a rotation).
    fn read(
        &mut self,
        name: &str,
        file: &File,
        offset: &mut u64,
        after: Option<u64>,
    ) -> anyhow::Result<()> {
        let mut f = file;
        f.seek(SeekFrom::Start(*offset))
            .with_context(|| format!("reading {name}"))?;
        let mut lines = LineReader::new(BufReader::new(f));
        while let Some(line) = lines
            .next_line()
            .with_context(|| format!("reading {name}"))?
        {
            if !line.complete {
                break;
            }
            *offset += line.bytes;
            let record = if line.too_long {
                Err(format!(
                    "longer than {} bytes, not a record",
                    audit::MAX_LINE_BYTES
                ))
            } else {
                audit::parse_line(&line.text).map_err(|e| e.to_string())
            };
            match record {
                Ok(r) => {
                    if after.is_some_and(|a| r.seq <= a) {
                        continue;
                    }
                    self.last_seq = Some(r.seq);
                    if self.filter.matches(&r) {
                        self.printer.print(&r)?;
                    }
                }
                Err(e) => {
                    self.warnings += 1;
                    if self.warnings <= MAX_WARNINGS {
                        eprintln!(
                            "conclave: skipped {name}:{}: {e} (conclave logs --verify checks the whole log)",
                            line.number
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.printer.flush()?;
        if self.warnings > MAX_WARNINGS {
            eprintln!(
                "conclave: {} more unreadable lines skipped",
                self.warnings - MAX_WARNINGS
            );
        }
        Ok(())
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Opens an audit file; `None` if it vanished (rotated away meanwhile).
fn open(path: &Path) -> anyhow::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn show(data_dir: &Path, filter: &Filter, printer: Printer) -> anyhow::Result<ExitCode> {
    let paths = audit::files(data_dir)?;
    if paths.is_empty() {
        eprintln!("conclave: {}", no_log_message(data_dir));
        return Ok(ExitCode::SUCCESS);
    }
    let mut reader = Reader {
        filter,
        printer,
        last_seq: None,
        warnings: 0,
    };
    for path in &paths {
        if let Some(f) = open(path)? {
            reader.read(&file_name(path), &f, &mut 0, None)?;
        }
    }
    reader.finish()?;
    if reader.printer.shown == 0 {
        eprintln!("conclave: no record matches");
    }
    Ok(ExitCode::SUCCESS)
}

/// The followed `audit.log`: an open handle (which stays valid when the file is renamed), its
/// inode, and how far it was read.
struct Followed {
    file: File,
    ino: u64,
    offset: u64,
}

fn follow(data_dir: &Path, filter: &Filter, printer: Printer) -> anyhow::Result<ExitCode> {
    let dir = data_dir.join(AUDIT_DIR);
    let current = dir.join(CURRENT_FILE);
    let mut reader = Reader {
        filter,
        printer,
        last_seq: None,
        warnings: 0,
    };
    let mut followed: Option<Followed> = None;
    let mut said_waiting = false;
    // First everything already rotated, then audit.log from its start.
    let mut catch_up = true;
    loop {
        if catch_up {
            catch_up = false;
            let after = reader.last_seq;
            for path in audit::files(data_dir)? {
                // Files rotated before the last record read hold nothing new.
                let old = after
                    .zip(audit::rotated_seq(&path))
                    .is_some_and(|(a, s)| s <= a);
                if path == current || old {
                    continue;
                }
                if let Some(f) = open(&path)? {
                    let skip = followed
                        .as_ref()
                        .is_some_and(|old| f.metadata().is_ok_and(|m| m.ino() == old.ino));
                    if !skip {
                        reader.read(&file_name(&path), &f, &mut 0, after)?;
                    }
                }
            }
            followed = None;
            if let Some(file) = open(&current)? {
                let ino = file.metadata().context("reading audit.log")?.ino();
                let mut f = Followed {
                    file,
                    ino,
                    offset: 0,
                };
                reader.read(CURRENT_FILE, &f.file, &mut f.offset, reader.last_seq)?;
                followed = Some(f);
            } else if !said_waiting {
                said_waiting = true;
                eprintln!(
                    "conclave: {}; waiting for it (Ctrl-C to stop)",
                    no_log_message(data_dir)
                );
            }
            reader.printer.flush()?;
        }
        std::thread::sleep(FOLLOW_POLL);
        let now = std::fs::metadata(&current).ok();
        match (&mut followed, now) {
            (Some(f), Some(m)) if m.ino() == f.ino => {
                if m.len() < f.offset {
                    // Cut back (a restart removed an incomplete record): read on from its end.
                    f.offset = m.len();
                }
                reader.read(CURRENT_FILE, &f.file, &mut f.offset, None)?;
            }
            (Some(f), _) => {
                // Rotated (or replaced): finish the old file through the open handle, then
                // catch up on any file rotated since and start on the new audit.log.
                reader.read(CURRENT_FILE, &f.file, &mut f.offset, None)?;
                catch_up = true;
            }
            (None, Some(_)) => catch_up = true,
            (None, None) => {}
        }
        reader.printer.flush()?;
    }
}

// ---------------------------------------------------------------------------------------------
// Verify
// ---------------------------------------------------------------------------------------------

fn verify(data_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let paths: Vec<PathBuf> = audit::files(data_dir)?;
    if paths.is_empty() {
        bail!("{}: nothing to verify", no_log_message(data_dir));
    }
    let report = audit::verify(data_dir)?;
    let code = if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(code);
    }
    let mut out = io::stdout().lock();
    writeln!(out, "audit log: {}", data_dir.join(AUDIT_DIR).display())?;
    let span = match (paths.first(), paths.last()) {
        (Some(a), Some(b)) if paths.len() > 1 => {
            format!(" ({} .. {})", file_name(a), file_name(b))
        }
        _ => String::new(),
    };
    writeln!(out, "files:     {}{span}", report.files)?;
    match (report.first_seq, report.last_seq) {
        (Some(first), Some(last)) => {
            writeln!(out, "records:   {}, seq {first} to {last}", report.records)?
        }
        _ => writeln!(out, "records:   {}", report.records)?,
    }
    match report.first_seq {
        Some(_) if report.anchored => writeln!(
            out,
            "chain:     anchored at genesis (the first record's prev is all zeros)"
        )?,
        Some(first) => writeln!(
            out,
            "chain:     starts at seq {first} (older files were rotated away); checked from there on"
        )?,
        None => writeln!(out, "chain:     no records")?,
    }
    if let Some(hash) = &report.last_hash {
        writeln!(
            out,
            "newest:    {hash} (note it elsewhere to anchor everything up to it)"
        )?;
    }
    if report.ok() {
        writeln!(out, "result:    OK, every hash and link checks out")?;
    } else {
        writeln!(out, "problems:  {}", report.problems.len())?;
        for p in &report.problems {
            writeln!(out, "  {p}")?;
        }
        writeln!(
            out,
            "result:    FAILED, the log was altered or damaged at the lines above"
        )?;
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_every_form() {
        let ts = parse_time("--since", "2026-11-21T10:00:00Z").expect("rfc3339");
        assert_eq!(ts.to_string(), "2026-11-21T10:00:00Z");
        let ts = parse_time("--since", "2026-11-21T11:00:00+01:00").expect("offset");
        assert_eq!(ts.to_string(), "2026-11-21T10:00:00Z");
        let ts = parse_time("--since", "2026-11-21").expect("date");
        assert_eq!(ts.to_string(), "2026-11-21T00:00:00Z");
        for (text, secs) in [("30s", 30), ("15m", 900), ("2h", 7200), ("7d", 604_800)] {
            let ago = Timestamp::now().duration_since(parse_time("--since", text).expect(text));
            assert!((ago.as_secs() - secs).abs() <= 5, "{text}: {ago:?}");
        }
        for bad in [
            "yesterday",
            "",
            "5y",
            "2026-13-01",
            "2026-11-21T10:00:00",
            "-5m",
        ] {
            let e = parse_time("--since", bad).expect_err(bad).to_string();
            assert!(
                e.contains(&format!("{bad:?}")) && e.contains("RFC 3339"),
                "{e}"
            );
        }
        assert!(parse_time("--since", "99999999999999d").is_err());
    }

    #[test]
    fn networks_and_addresses() {
        let net = parse_net("203.0.113.0/24").expect("v4");
        assert!(net.contains(&"203.0.113.7".parse::<IpAddr>().expect("ip")));
        assert!(!net.contains(&"203.0.114.7".parse::<IpAddr>().expect("ip")));
        let one = parse_net("2001:db8::1").expect("v6 address");
        assert!(one.contains(&"2001:db8::1".parse::<IpAddr>().expect("ip")));
        assert!(!one.contains(&"2001:db8::2".parse::<IpAddr>().expect("ip")));
        assert_eq!(
            parse_net("203.0.113.7/24").expect("host bits").to_string(),
            "203.0.113.0/24"
        );
        for bad in ["10.0.0.0/33", "nope", "2001:db8::/129", ""] {
            let e = parse_net(bad).expect_err(bad).to_string();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("CIDR"), "{e}");
        }
    }

    #[test]
    fn control_characters_are_not_sent_to_the_terminal() {
        assert_eq!(clean("spam\x1b[31m!"), "spam\\u{1b}[31m!");
        assert_eq!(clean("a\nb"), "a\\nb");
        assert_eq!(clean("plain é"), "plain é");
    }
}
