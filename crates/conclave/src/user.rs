//! `conclave user ...`: accounts on a data directory.

use anyhow::{Context, bail};
use conclave_server::store::StoreError;
use conclave_server::{Config, accounts, server};

use crate::cli::{UserAction, UserArgs};

/// Reads a password from `env`, or prompts for it (twice for a new one).
pub fn read_password(env: Option<&str>, prompt: &str, confirm: bool) -> anyhow::Result<String> {
    if let Some(var) = env {
        return std::env::var(var).with_context(|| {
            format!("environment variable {var} (from --password-env) is not set")
        });
    }
    let pw = rpassword::prompt_password(prompt)
        .context("cannot read a password from the terminal; pass --password-env VAR instead")?;
    if confirm {
        let again = rpassword::prompt_password("Repeat it: ")
            .context("cannot read a password from the terminal")?;
        if again != pw {
            bail!("the two passwords differ; nothing was changed");
        }
    }
    Ok(pw)
}

fn canonical(name: &str) -> anyhow::Result<String> {
    conclave_proto::names::canonical(name).map_err(|e| anyhow::anyhow!("user name {name:?}: {e}"))
}

/// While a server runs on the data directory, accounts are managed through its admin socket,
/// so the change takes effect at once (a deleted account's sessions are closed).
fn through_server(args: &UserArgs) -> anyhow::Result<bool> {
    let dir = &args.data.data_dir;
    if !crate::admin::server_running(dir) {
        return Ok(false);
    }
    let req = match &args.action {
        UserAction::Add {
            name,
            admin,
            password_env,
        } => {
            let name = conclave_proto::names::canonical_new_account(name)
                .map_err(|e| anyhow::anyhow!("user name {name:?}: {e}"))?;
            let pw = read_password(
                password_env.as_deref(),
                &format!("Password for {name}: "),
                true,
            )?;
            accounts::check_new_password(&pw).map_err(anyhow::Error::msg)?;
            serde_json::json!({"cmd": "user_add", "user": name, "password": pw, "admin": admin})
        }
        UserAction::Del { name } => {
            serde_json::json!({"cmd": "user_del", "user": canonical(name)?})
        }
        UserAction::Passwd { name, password_env } => {
            let name = canonical(name)?;
            let pw = read_password(
                password_env.as_deref(),
                &format!("New password for {name}: "),
                true,
            )?;
            accounts::check_new_password(&pw).map_err(anyhow::Error::msg)?;
            serde_json::json!({"cmd": "user_passwd", "user": name, "password": pw})
        }
        UserAction::Admin { name, revoke } => {
            serde_json::json!({"cmd": "user_admin", "user": canonical(name)?, "admin": !revoke})
        }
        UserAction::List => serde_json::json!({"cmd": "user_list"}),
        UserAction::Invite => serde_json::json!({"cmd": "user_invite"}),
    };
    let answer = crate::admin::ok(crate::admin::request(dir, &req)?)?;
    match &args.action {
        UserAction::Add { admin, .. } => {
            let role = if *admin { "admin" } else { "user" };
            println!("created {role} {}", answer["user"].as_str().unwrap_or("?"));
        }
        UserAction::Del { name } => println!("deleted {}", name.to_ascii_lowercase()),
        UserAction::Passwd { name, .. } => {
            println!("password changed for {}", name.to_ascii_lowercase())
        }
        UserAction::Admin { revoke, .. } => {
            println!(
                "{}",
                admin_role_text(answer["user"].as_str().unwrap_or("?"), !revoke)
            )
        }
        UserAction::List => {
            for u in answer["users"].as_array().cloned().unwrap_or_default() {
                let role = if u["admin"].as_bool() == Some(true) {
                    "admin"
                } else {
                    "user"
                };
                println!("{}\t{}", u["user"].as_str().unwrap_or("?"), role);
            }
        }
        UserAction::Invite => println!("{}", answer["code"].as_str().unwrap_or("?")),
    }
    Ok(true)
}

/// What `user admin` prints.
fn admin_role_text(name: &str, admin: bool) -> String {
    if admin {
        format!("{name} is now an admin")
    } else {
        format!("{name} is no longer an admin")
    }
}

/// Records an offline account change in the audit log (best effort: the change is made).
fn audit(config: &Config, cmd: &str, user: Option<&str>) {
    audit_with(config, cmd, user, None);
}

/// [`audit`] with the new admin role, for `user admin`.
fn audit_with(config: &Config, cmd: &str, user: Option<&str>, admin: Option<bool>) {
    use conclave_server::audit::{AuditLog, Fields, Kind};
    match AuditLog::open(&config.data_dir, config.audit.clone()) {
        Ok(log) => {
            let mut f = Fields::new().with("cmd", cmd).with("via", "data directory");
            if let Some(u) = user {
                f = f.user(u);
            }
            if let Some(a) = admin {
                f = f.with("admin", a);
            }
            log.record(Kind::Admin, f);
            log.close();
        }
        Err(e) => eprintln!("conclave: warning: the change was made but not audited: {e}"),
    }
}

pub fn run(args: UserArgs) -> anyhow::Result<std::process::ExitCode> {
    let dir = &args.data.data_dir;
    let creates = !dir.join(conclave_server::store::DB_FILE).exists();
    if matches!(args.action, UserAction::Add { .. }) {
        // The first account may be made before the first start (registration is closed on
        // a network address), so `user add` may create the data directory; it says so.
    } else {
        args.data.existing()?;
    }
    if through_server(&args)? {
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let mut config = Config::load(&args.data.data_dir, None)?;
    if let Some(var) = &args.data_key_env {
        config.data_key_passphrase = Some(crate::serve::read_passphrase(var)?);
    }
    let mut db = server::open_db(&config)?;
    match args.action {
        UserAction::Add {
            name,
            admin,
            password_env,
        } => {
            let name = conclave_proto::names::canonical_new_account(&name)
                .map_err(|e| anyhow::anyhow!("user name {name:?}: {e}"))?;
            let pw = read_password(
                password_env.as_deref(),
                &format!("Password for {name}: "),
                true,
            )?;
            accounts::check_new_password(&pw).map_err(anyhow::Error::msg)?;
            let hash = accounts::hash_password(&pw).map_err(anyhow::Error::msg)?;
            match db.create_user(&name, &hash, admin) {
                Ok(()) => {}
                Err(StoreError::Exists) => bail!("the account {name:?} exists already"),
                Err(e) => return Err(e.into()),
            }
            db.add_member(&config.default_room, &name)?;
            let role = if admin { "admin" } else { "user" };
            audit(&config, "user_add", Some(&name));
            if creates {
                eprintln!(
                    "conclave: set up a new data directory in {} (conclave serve --data-dir {} uses it)",
                    dir.display(),
                    dir.display()
                );
            }
            println!("created {role} {name}");
        }
        UserAction::Del { name } => {
            let name = canonical(&name)?;
            if !db.delete_user(&name)? {
                bail!("there is no account {name:?} (conclave user list shows them)");
            }
            audit(&config, "user_del", Some(&name));
            println!("deleted {name}");
        }
        UserAction::Passwd { name, password_env } => {
            let name = canonical(&name)?;
            if db.user(&name)?.is_none() {
                bail!("there is no account {name:?} (conclave user list shows them)");
            }
            let pw = read_password(
                password_env.as_deref(),
                &format!("New password for {name}: "),
                true,
            )?;
            accounts::check_new_password(&pw).map_err(anyhow::Error::msg)?;
            let hash = accounts::hash_password(&pw).map_err(anyhow::Error::msg)?;
            db.set_password(&name, &hash)?;
            audit(&config, "user_passwd", Some(&name));
            println!("password changed for {name}");
        }
        UserAction::Admin { name, revoke } => {
            let name = canonical(&name)?;
            if !db.set_admin(&name, !revoke)? {
                bail!("there is no account {name:?} (conclave user list shows them)");
            }
            audit_with(&config, "user_admin", Some(&name), Some(!revoke));
            println!("{}", admin_role_text(&name, !revoke));
        }
        UserAction::List => {
            for u in db.users()? {
                println!("{}\t{}", u.name, if u.admin { "admin" } else { "user" });
            }
        }
        UserAction::Invite => {
            let code = accounts::new_invite_code();
            db.add_invite_code(&accounts::invite_code_hash(&code))?;
            audit(&config, "user_invite", None);
            println!("{code}");
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
