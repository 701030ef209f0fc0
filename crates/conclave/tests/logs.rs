//! `conclave logs` on audit logs written with the server library's `AuditLog`: filters, JSON
//! output, verification and tampering, `--follow` across rotations, and bad input.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use conclave_server::audit::{self, AuditConfig, AuditLog, Fields, Kind, Record};

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// `conclave logs --data-dir D ARGS`.
fn logs(data: &Path, args: &[&str]) -> Finished {
    let mut cmd = conclave(["logs", "--data-dir"]);
    cmd.arg(data).args(args).env("NO_COLOR", "1");
    run("logs", cmd)
}

/// Every stored line of every audit file, oldest first.
fn stored_lines(data: &Path) -> Vec<String> {
    audit::files(data)
        .expect("files")
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .expect("read")
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn records(data: &Path) -> Vec<Record> {
    stored_lines(data)
        .iter()
        .map(|l| audit::parse_line(l).expect("parse"))
        .collect()
}

/// The seqs of `--json` output.
fn seqs(f: &Finished) -> Vec<u64> {
    f.stdout
        .iter()
        .map(|l| {
            audit::parse_line(l)
                .unwrap_or_else(|e| panic!("{l}: {e}"))
                .seq
        })
        .collect()
}

/// Eleven records; the last two are written at least 20 ms after the first nine.
fn sample(data: &Path) {
    let log = AuditLog::open(data, AuditConfig::default()).expect("open");
    let r = |kind, fields| log.record(kind, fields);
    r(Kind::Start, Fields::new().with("version", "test"));
    r(Kind::Connect, Fields::new().ip(addr("203.0.113.7:51234")));
    r(
        Kind::LoginFailed,
        Fields::new()
            .ip(addr("203.0.113.7:51234"))
            .user("alice")
            .reason("wrong password"),
    );
    r(
        Kind::LoginOk,
        Fields::new().ip(addr("198.51.100.20:40000")).user("bob"),
    );
    r(Kind::Join, Fields::new().user("bob").room("general"));
    r(Kind::Connect, Fields::new().ip(addr("[2001:db8::5]:443")));
    r(
        Kind::LoginOk,
        Fields::new().ip(addr("[2001:db8::5]:443")).user("carol"),
    );
    r(
        Kind::Kick,
        Fields::new()
            .ip(addr("203.0.113.99:1000"))
            .user("mallory")
            .room("general")
            .reason("spam")
            .with("by", "bob"),
    );
    r(
        Kind::Ban,
        Fields::new()
            .ip(addr("203.0.113.99:1000"))
            .user("mallory")
            .with("minutes", 60),
    );
    log.flush();
    std::thread::sleep(Duration::from_millis(20));
    r(
        Kind::LoginFailed,
        Fields::new().ip(addr("192.0.2.1:2000")).user("alice"),
    );
    r(
        Kind::Alert,
        Fields::new().reason("\x1b[31mred\x1b[0m text in a reason"),
    );
    log.close();
}

#[test]
fn filters_select_records() {
    let tmp = tempdir();
    let data = tmp.path();
    sample(data);
    let all = records(data);
    assert_eq!(all.len(), 11);

    let cases: &[(&[&str], &[u64])] = &[
        (&[], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
        (&["--kind", "login_failed"], &[3, 10]),
        (&["--kind", "login_failed,ban"], &[3, 9, 10]),
        (&["--kind", "kick", "--kind", "ban"], &[8, 9]),
        (&["--user", "alice"], &[3, 10]),
        (&["--user", "ALICE"], &[3, 10]),
        (&["--ip", "203.0.113.0/24"], &[2, 3, 8, 9]),
        (&["--ip", "2001:db8::/32"], &[6, 7]),
        (&["--ip", "198.51.100.20"], &[4]),
        (&["--ip", "203.0.113.0/24", "--kind", "login_failed"], &[3]),
        (
            &["--since", "2000-01-01"],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
        ),
        (&["--since", "1h"], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
        (&["--until", "2000-01-01"], &[]),
    ];
    for (args, want) in cases {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let f = logs(data, &full);
        f.assert_success();
        assert_eq!(seqs(&f), *want, "logs {args:?}: {f:#?}");
        if want.is_empty() {
            f.assert_stderr_has("no record matches");
        }
    }

    // The last two records are at least 20 ms after the ninth (the first nine may share a
    // millisecond). Both bounds include their time.
    let ninth = format!("{:.3}", all[8].ts);
    let tenth = format!("{:.3}", all[9].ts);
    assert!(all[9].ts > all[8].ts);
    let between = |lo: jiff::Timestamp, hi: jiff::Timestamp| -> Vec<u64> {
        all.iter()
            .filter(|r| lo <= r.ts && r.ts <= hi)
            .map(|r| r.seq)
            .collect()
    };
    let f = logs(data, &["--json", "--since", &tenth]);
    assert_eq!(seqs(f.assert_success()), [10, 11], "--since {tenth}");
    let f = logs(data, &["--json", "--until", &ninth]);
    assert_eq!(
        seqs(f.assert_success()),
        [1, 2, 3, 4, 5, 6, 7, 8, 9],
        "--until {ninth}"
    );
    let f = logs(data, &["--json", "--since", &ninth, "--until", &tenth]);
    let want = between(all[8].ts, all[9].ts);
    assert!(want.contains(&9) && want.contains(&10), "{want:?}");
    assert_eq!(seqs(f.assert_success()), want);
}

#[test]
fn json_output_is_exactly_the_stored_lines() {
    let tmp = tempdir();
    let data = tmp.path();
    // Small files: the output spans several rotated files.
    let config = AuditConfig {
        max_file_bytes: 800,
        ..AuditConfig::default()
    };
    let log = AuditLog::open(data, config).expect("open");
    for i in 0..20 {
        log.record(
            Kind::Connect,
            Fields::new().ip(addr("203.0.113.7:5000")).with("i", i),
        );
    }
    log.close();
    assert!(audit::files(data).expect("files").len() > 3);
    let f = logs(data, &["--json"]);
    f.assert_success();
    assert_eq!(f.stdout, stored_lines(data));
    for line in &f.stdout {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        assert_eq!(v["kind"], "connect");
    }
}

#[test]
fn the_table_is_plain_when_piped_and_shows_every_field() {
    let tmp = tempdir();
    let data = tmp.path();
    sample(data);
    let mut cmd = conclave(["logs", "--data-dir"]);
    cmd.arg(data);
    let f = run("logs", cmd);
    f.assert_success();
    let text = f.stdout_text();
    assert!(
        !text.contains('\x1b'),
        "no escapes when not a terminal:\n{text}"
    );
    assert!(f.stdout[0].starts_with("TIME (UTC)"), "{text}");
    assert_eq!(f.stdout.len(), 12, "a header and 11 rows:\n{text}");
    let row = |needle: &str| -> &String {
        f.stdout
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no row with {needle:?}:\n{text}"))
    };
    let failed = row("wrong password");
    assert!(
        failed.contains("login_failed") && failed.contains("alice"),
        "{failed}"
    );
    assert!(failed.contains("203.0.113.7:51234"), "{failed}");
    assert!(row("carol").contains("[2001:db8::5]:443"));
    let ban = row("minutes=60");
    assert!(ban.contains("ban") && ban.contains("mallory"), "{ban}");
    let kick = row("spam");
    assert!(
        kick.contains("general") && kick.contains("by=bob"),
        "{kick}"
    );
    // A control character in a reason is shown escaped, never sent to the terminal.
    assert!(row("red").contains("\\u{1b}[31m"));
    // Times: "2026-11-21 10:00:00.123", then the kind, in aligned columns.
    let t = &f.stdout[1][..23];
    assert!(
        t.len() == 23 && &t[10..11] == " " && &t[19..20] == ".",
        "{t:?}"
    );
    let kind_col = f.stdout[0].find("KIND").expect("KIND column");
    for line in &f.stdout[1..] {
        assert!(
            line[kind_col..].starts_with(|c: char| c.is_ascii_lowercase()),
            "kind column at {kind_col}: {line}"
        );
    }
}

fn audit_log_path(data: &Path) -> PathBuf {
    data.join(audit::AUDIT_DIR).join(audit::CURRENT_FILE)
}

#[test]
fn verify_passes_then_names_the_tampered_line() {
    let tmp = tempdir();
    let data = tmp.path();
    sample(data);
    let f = logs(data, &["--verify"]);
    f.assert_success();
    let text = f.stdout_text();
    assert!(text.contains("records:   11, seq 1 to 11"), "{text}");
    assert!(text.contains("anchored at genesis"), "{text}");
    assert!(text.contains("OK"), "{text}");

    let f = logs(data, &["--verify", "--json"]);
    f.assert_success();
    let report: serde_json::Value = serde_json::from_str(&f.stdout[0]).expect("JSON report");
    assert_eq!(report["records"], 11);
    assert_eq!(report["anchored"], true);
    assert_eq!(report["problems"], serde_json::json!([]));

    // bob's login becomes eve's.
    let path = audit_log_path(data);
    let text = std::fs::read_to_string(&path).expect("read");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    assert!(lines[3].contains("\"user\":\"bob\""), "{}", lines[3]);
    lines[3] = lines[3].replace("\"user\":\"bob\"", "\"user\":\"eve\"");
    std::fs::write(&path, lines.join("\n") + "\n").expect("write");
    let f = logs(data, &["--verify"]);
    f.assert_failure();
    let text = f.stdout_text();
    assert!(text.contains("audit.log:4: seq 4"), "{text}");
    assert!(text.contains("altered"), "{text}");
    assert!(text.contains("FAILED"), "{text}");

    // Deleting a record instead.
    lines.remove(6);
    std::fs::write(&path, lines.join("\n") + "\n").expect("write");
    let f = logs(data, &["--verify", "--json"]);
    f.assert_failure();
    let report: serde_json::Value = serde_json::from_str(&f.stdout[0]).expect("JSON report");
    let problems = report["problems"].as_array().expect("problems");
    assert!(
        problems.iter().any(|p| p
            .as_str()
            .is_some_and(|p| p.starts_with("audit.log:7:") && p.contains("1 record missing"))),
        "{problems:#?}"
    );
}

#[test]
fn bad_values_are_explained() {
    let tmp = tempdir();
    let data = tmp.path();
    sample(data);
    for (args, needles) in [
        (
            &["--ip", "10.0.0.0/33"][..],
            &["\"10.0.0.0/33\"", "CIDR", "203.0.113.0/24"][..],
        ),
        (&["--ip", "example.com"], &["\"example.com\"", "CIDR"]),
        (
            &["--kind", "login_failed,logon"],
            &["\"logon\"", "login_failed", "audit_dropped"],
        ),
        (
            &["--since", "yesterday"],
            &["\"yesterday\"", "RFC 3339", "2h"],
        ),
        (&["--until", "2026-02-30"], &["\"2026-02-30\"", "a date"]),
        (
            &["--since", "2h", "--until", "3h"],
            &["--since", "after --until"],
        ),
    ] {
        let f = logs(data, args);
        f.assert_failure();
        for n in needles {
            f.assert_stderr_has(n);
        }
        assert!(f.stdout.is_empty(), "{f:#?}");
    }
}

#[test]
fn no_log_is_nothing_to_show_but_fails_verify() {
    let tmp = tempdir();
    // No data directory at all: a mistyped --data-dir, said so.
    let data = tmp.path().join("data");
    for args in [&[][..], &["--verify"]] {
        let f = logs(&data, args);
        f.assert_failure();
        f.assert_stderr_has("there is no data directory");
    }
    // A data directory without a log yet.
    std::fs::create_dir(&data).expect("mkdir");
    let f = logs(&data, &[]);
    f.assert_success();
    f.assert_stderr_has("no audit log in");
    assert!(f.stdout.is_empty());
    let f = logs(&data, &["--verify"]);
    f.assert_failure();
    f.assert_stderr_has("nothing to verify");
}

#[test]
fn follow_prints_new_records_across_rotations() {
    let tmp = tempdir();
    let data = tmp.path();
    let config = AuditConfig {
        max_file_bytes: 700,
        keep_files: 1000,
        ..AuditConfig::default()
    };
    let log = AuditLog::open(data, config).expect("open");
    log.record(Kind::Start, Fields::new());
    log.record(Kind::Connect, Fields::new().ip(addr("203.0.113.7:1")));
    log.flush();

    let mut cmd = conclave(["logs", "--follow", "--json", "--data-dir"]);
    cmd.arg(data);
    let mut p = Proc::spawn("logs --follow", cmd);
    let mut seen = Vec::new();
    let mut take = |p: &mut Proc, n: usize| {
        for _ in 0..n {
            let line = p.next_line(WAIT).expect("a line");
            seen.push(audit::parse_line(&line).expect("a record").seq);
        }
    };
    take(&mut p, 2);
    // Many rotations between two polls, then a few with pauses.
    for i in 0..30 {
        log.record(Kind::Join, Fields::new().user("bob").with("i", i));
    }
    log.flush();
    take(&mut p, 30);
    for i in 0..5 {
        log.record(Kind::Part, Fields::new().user("bob").with("i", i));
        log.flush();
        std::thread::sleep(Duration::from_millis(150));
    }
    take(&mut p, 5);
    assert_eq!(seen, (1..=37).collect::<Vec<u64>>());
    assert!(audit::files(data).expect("files").len() > 10);
    log.close();
    // Nothing more (no duplicates) within a few polls.
    std::thread::sleep(Duration::from_millis(600));
    drop(p);
}

#[test]
fn follow_with_a_filter_shows_only_matches() {
    let tmp = tempdir();
    let data = tmp.path();
    let log = AuditLog::open(data, AuditConfig::default()).expect("open");
    let mut cmd = conclave(["logs", "--follow", "--json", "--kind", "ban", "--data-dir"]);
    cmd.arg(data);
    let mut p = Proc::spawn("logs --follow --kind ban", cmd);
    for i in 0..10 {
        let kind = if i % 5 == 4 { Kind::Ban } else { Kind::Connect };
        log.record(kind, Fields::new().with("i", i));
    }
    log.flush();
    for want in [5, 10] {
        let line = p.next_line(WAIT).expect("a line");
        let r = audit::parse_line(&line).expect("a record");
        assert_eq!((r.kind.as_str(), r.seq), ("ban", want));
    }
    log.close();
}

#[test]
fn help_has_examples() {
    let f = run("logs --help", conclave(["logs", "--help"]));
    f.assert_success();
    let text = f.stdout_text();
    for needle in [
        "--since",
        "--ip",
        "--verify",
        "Examples:",
        "conclave logs --since 2h",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
}
