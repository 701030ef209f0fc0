//! `conclave client --json`.

use std::process::ExitCode;

use anyhow::Context;
use conclave_client::json::{self, JsonOptions};
use conclave_client::trust::Trust;
use conclave_client::{Auth, ConnectOptions};

use crate::cli::ClientArgs;

pub(crate) fn env_secret(var: &Option<String>, flag: &str) -> anyhow::Result<Option<String>> {
    match var {
        None => Ok(None),
        Some(v) => std::env::var(v)
            .map(Some)
            .with_context(|| format!("environment variable {v} (from {flag}) is not set")),
    }
}

pub fn run_json(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let trust = match (&args.fingerprint, &args.ca, args.trust_on_first_use) {
        (Some(fp), _, _) => {
            Trust::fingerprint(fp).map_err(|e| anyhow::anyhow!("--fingerprint: {e}"))?
        }
        (None, Some(ca), _) => Trust::Ca(ca.clone()),
        (None, None, true) => Trust::TrustOnFirstUse,
        (None, None, false) => Trust::PinnedOnly,
    };
    let password = crate::user::read_password(
        args.password_env.as_deref(),
        &format!("Password for {}: ", args.user),
        args.register && args.password_env.is_none(),
    )?;
    let server_password = env_secret(&args.server_password_env, "--server-password-env")?;
    let auth = if args.register {
        Auth::Register {
            user: args.user.clone(),
            password,
            server_password,
            invite_code: env_secret(&args.invite_code_env, "--invite-code-env")?,
        }
    } else {
        Auth::Login {
            user: args.user.clone(),
            password,
            server_password,
        }
    };
    let mut connect = ConnectOptions::new(args.server.clone(), auth);
    connect.trust = trust;
    connect.state_dir = args.state_dir.clone();
    match args.reconnect_for {
        Some(0) => connect.reconnect = conclave_client::Reconnect::never(),
        Some(s) => connect.reconnect.give_up_after = std::time::Duration::from_secs(s),
        None => {}
    }
    let recovery_key = env_secret(&args.recovery_key_env, "--recovery-key-env")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(async move {
        json::run(
            {
                let mut o = JsonOptions::new(connect);
                o.window = args.window;
                o.congestion = args.congestion.clone();
                o.recovery_key = recovery_key;
                if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    o.progress_hook = Some(crate::progress::bars());
                }
                o
            },
            tokio::io::BufReader::new(tokio::io::stdin()),
            tokio::io::stdout(),
        )
        .await
    });
    // Tokio's stdin reader blocks in a thread that never returns while stdin stays open; do
    // not wait for it, or a client the server disconnected would hang until input arrives.
    rt.shutdown_background();
    result.map_err(|e| anyhow::anyhow!("{e} [{}]", e.code()))?;
    Ok(ExitCode::SUCCESS)
}
