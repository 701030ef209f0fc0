//! `conclave chat`: the terminal UI (crates/conclave-tui).

use std::process::ExitCode;

use anyhow::Context;
use conclave_client::trust::Trust;
use conclave_tui::ChatOptions;

use crate::cli::ChatArgs;
use crate::client::env_secret;

pub fn run(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let trust = match (&args.fingerprint, &args.ca) {
        (Some(fp), _) => {
            Trust::fingerprint(fp).map_err(|e| anyhow::anyhow!("--fingerprint: {e}"))?
        }
        (None, Some(ca)) => Trust::Ca(ca.clone()),
        // Pinned servers are checked; an unknown one is shown for confirmation.
        (None, None) => Trust::PinnedOnly,
    };
    let password = match &args.password_env {
        Some(var) => Some(std::env::var(var).with_context(|| {
            format!("environment variable {var} (from --password-env) is not set")
        })?),
        None => None,
    };
    let opts = ChatOptions {
        server: args.server,
        user: args.user,
        register: args.register,
        trust,
        password,
        server_password: env_secret(&args.server_password_env, "--server-password-env")?,
        invite_code: env_secret(&args.invite_code_env, "--invite-code-env")?,
        state_dir: args.state_dir,
        bell: !args.no_bell,
        title: !args.no_title,
        recovery_key: env_secret(&args.recovery_key_env, "--recovery-key-env")?,
    };
    conclave_tui::run(opts)?;
    Ok(ExitCode::SUCCESS)
}
