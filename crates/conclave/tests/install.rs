//! Installing Conclave: shell completions and man pages from `conclave` itself, the systemd
//! unit in packaging/ (checked with `systemd-analyze` where there is one) and the example
//! config the .deb installs. The .deb itself is built and checked by packaging/build-deb.sh.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging")
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for (shell, marks) in [
        ("bash", &["_conclave()", "complete -F _conclave"][..]),
        ("zsh", &["#compdef conclave", "_conclave"]),
        ("fish", &["complete -c conclave"]),
    ] {
        let f = run(shell, conclave(["completions", shell]));
        f.assert_success();
        let text = f.stdout_text();
        for mark in marks {
            assert!(text.contains(mark), "{shell}: no {mark:?}");
        }
        // The subcommands and their options come from the same definitions as --help.
        for word in ["serve", "admin", "revoke", "data-dir"] {
            assert!(text.contains(word), "{shell}: no {word:?}");
        }
    }
    run("no such shell", conclave(["completions", "tcsh"]))
        .assert_failure()
        .assert_stderr_has("possible values");
}

#[test]
fn man_pages_for_every_command() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("man1");
    let f = run("man", conclave([Path::new("man"), &dir]));
    f.assert_success();
    assert!(f.stdout_text().starts_with("wrote "), "{f:#?}");
    let page = |name: &str| {
        std::fs::read_to_string(dir.join(format!("{name}.1")))
            .unwrap_or_else(|e| panic!("{name}.1: {e}"))
    };
    assert!(page("conclave").contains(".TH conclave 1"));
    for name in [
        "conclave-serve",
        "conclave-user-add",
        "conclave-user-admin",
        "conclave-admin-deny-add",
        "conclave-logs",
        "conclave-chat",
        "conclave-client",
        "conclave-completions",
    ] {
        let text = page(name);
        assert!(text.contains(&format!(".TH {name} 1")), "{name}: {text}");
    }
    assert!(page("conclave-user-admin").contains("revoke"));
    assert!(page("conclave-client").contains("end\\-to\\-end keys"));
    // man can read them, where it is installed.
    if let Ok(out) = Command::new("man")
        .arg("-l")
        .arg(dir.join("conclave-user-admin.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("conclave-user-admin"), "{text}");
    }
}

/// The unit's hardening is there, and systemd (where installed) accepts the unit.
#[test]
fn systemd_unit_is_hardened_and_verifies() {
    let unit = std::fs::read_to_string(packaging().join("conclave.service")).expect("the unit");
    for line in [
        "User=conclave",
        "StateDirectory=conclave",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
        "ExecReload=/usr/bin/conclave admin --data-dir /var/lib/conclave reload",
        "ExecStart=/usr/bin/conclave serve --data-dir /var/lib/conclave --config /etc/conclave/conclave.toml",
    ] {
        assert!(unit.contains(line), "the unit lacks {line:?}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIPPED: systemd-analyze is not installed; the unit was not verified");
        return;
    }
    // verify checks that the executable exists: point it at the one just built.
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join("conclave.service");
    std::fs::write(&copy, unit.replace("/usr/bin/conclave", bin())).expect("write");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    assert!(
        !stderr.contains("conclave.service"),
        "no complaint about the unit: {stderr}"
    );
    // The exposure score (0 best, 10 worst), where this systemd can rate a unit file.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    match text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
    {
        Some(score) => assert!(score <= 2.0, "exposure {score}: {text}"),
        None => println!("SKIPPED: this systemd-analyze cannot rate a unit file offline"),
    }
}

/// The commented example config loads as shipped (all defaults), and with every setting
/// uncommented (so the values it shows are valid).
#[test]
fn example_config_loads_commented_and_uncommented() {
    let example = packaging().join("conclave.toml");
    let data = tempfile::tempdir().expect("tempdir");
    let config = conclave_server::Config::load(data.path(), Some(&example))
        .unwrap_or_else(|e| panic!("as shipped: {e}"));
    config.validate().expect("valid as shipped");
    assert_eq!(
        config.listen.to_string(),
        conclave_server::config::DEFAULT_LISTEN
    );

    let text = std::fs::read_to_string(&example).expect("read");
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(uncommented.contains("\nmax_message_bytes = 65536"));
    let path = data.path().join("uncommented.toml");
    std::fs::write(&path, uncommented).expect("write");
    let config = conclave_server::Config::load(data.path(), Some(&path))
        .unwrap_or_else(|e| panic!("uncommented: {e}"));
    config.validate().expect("valid uncommented");
}
