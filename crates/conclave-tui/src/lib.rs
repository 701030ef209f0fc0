//! `conclave chat`: the terminal chat client, on top of `conclave-client`.
//!
//! The screen is sans-IO: [`app::App`] holds every piece of state and decides everything in
//! [`app::App::update`] (an input in, actions out); [`view::render`] draws it and changes
//! nothing. Tests drive both without a terminal or a socket (ratatui's `TestBackend`). The
//! I/O lives at the edges:
//! - `shell`: the event loop: terminal input (a thread), the client's events, replies, the
//!   clock; carries out the actions; draws.
//! - `terminal`: raw mode, alternate screen, mouse and bracketed paste, restored on every
//!   way out (a drop guard and a panic hook).
//! - [`files`]: the adapter to the library's file transfer.
//!
//! Map of the pure parts: [`buffer`] (conversations, no duplicates, bounded), [`command`]
//! (slash commands), [`input`] (the line editor), [`layout`] (panes for a size), [`text`]
//! (sanitising and wrapping peer text). [`remember`] keeps the open direct conversations in the
//! state directory across restarts.
//!
//! Nothing is printed to the terminal but the screen: logs go to `chat.log` in the state
//! directory, and never hold message text or passwords.

pub mod acts;
pub mod app;
pub mod buffer;
pub mod chat;
pub mod command;
pub mod devices;
pub mod files;
pub mod input;
pub mod layout;
pub mod markdown;
pub mod remember;
mod shell;
mod terminal;
pub mod text;
pub mod thread;
pub mod view;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use conclave_client::Trust;

/// The log file's name in the state directory.
pub const LOG_FILE: &str = "chat.log";

/// What `conclave chat` was started with.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub server: String,
    pub user: String,
    pub register: bool,
    /// `--fingerprint` or `--ca`; [`Trust::PinnedOnly`] asks on first contact.
    pub trust: Trust,
    /// From `--password-env`; otherwise the screen asks.
    pub password: Option<String>,
    pub server_password: Option<String>,
    pub invite_code: Option<String>,
    pub state_dir: Option<PathBuf>,
    /// Ring the terminal bell on a mention (`--no-bell`: off).
    pub bell: bool,
    /// Show mentions in the window title (`--no-title`: off).
    pub title: bool,
    /// From `--recovery-key-env`: restore the end-to-end history from the backup of this key
    /// once signed in (never shown, logged or kept).
    pub recovery_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(
        "conclave chat needs a terminal (standard input and output are not one); for scripts, \
         use conclave client --json"
    )]
    NotATerminal,
    #[error("cannot set up the terminal: {0}")]
    Terminal(std::io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Logs go to a file (the terminal belongs to the screen). Without a state directory, or if
/// the file cannot be opened, nothing is logged.
fn init_logging(state_dir: Option<&std::path::Path>) {
    let Some(dir) = state_dir
        .map(PathBuf::from)
        .or_else(conclave_client::trust::default_state_dir)
    else {
        return;
    };
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let Ok(file) = options.open(dir.join(LOG_FILE)) else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CONCLAVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init();
}

/// Where this account's open direct conversations are remembered.
pub(crate) fn direct_file(opts: &ChatOptions) -> Option<PathBuf> {
    let dir = opts
        .state_dir
        .clone()
        .or_else(conclave_client::trust::default_state_dir)?;
    // Keyed by the first --server address (as typed, so a single address keeps the folder it
    // always had), like the pin and the end-to-end state.
    let first = opts.server.split(',').next().unwrap_or_default().trim();
    Some(remember::path(&dir, first, &opts.user))
}

/// Runs the chat screen until the user quits. The terminal is restored however it ends.
pub fn run(opts: ChatOptions) -> Result<(), ChatError> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(ChatError::NotATerminal);
    }
    init_logging(opts.state_dir.as_deref());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ChatError::Runtime)?;
    let size = ratatui::crossterm::terminal::size().map_err(ChatError::Terminal)?;
    let tz = jiff::tz::TimeZone::system();
    let mut app = app::App::new(
        app::AppOptions {
            server: opts.server.clone(),
            user: opts.user.clone(),
            register: opts.register,
            trust: opts.trust.clone(),
            password: opts.password.clone(),
            server_password: opts.server_password.clone(),
            invite_code: opts.invite_code.clone(),
            direct: direct_file(&opts)
                .map(|p| remember::load(&p))
                .unwrap_or_default(),
        },
        size,
        tz,
        jiff::Timestamp::now().as_millisecond(),
    );
    if let Some(path) = direct_file(&opts).map(|p| remember::muted_path(&p)) {
        app.chat.muted = remember::load_muted(&path).into_iter().collect();
    }
    app.chat.bell = opts.bell;
    app.chat.set_title = opts.title;
    let mut guard = terminal::Guard::enter().map_err(ChatError::Terminal)?;
    tracing::info!(server = %opts.server, user = %opts.user, "chat started");
    let result = runtime.block_on(shell::run(opts, &mut guard.terminal, app));
    drop(guard);
    // The terminal reader thread may sit in a poll for a moment; do not wait for it.
    runtime.shutdown_background();
    tracing::info!("chat ended");
    result.map_err(ChatError::Terminal)
}
