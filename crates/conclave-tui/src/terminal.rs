//! The terminal's modes: raw input, the alternate screen, mouse reporting and bracketed
//! paste on the way in; all of them undone on the way out, whatever the way out is (a return,
//! an error, a panic).

use std::io::{self, Stdout, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture,
};
use ratatui::crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use ratatui::crossterm::{cursor, execute};

pub type Term = Terminal<CrosstermBackend<Stdout>>;

/// Puts the terminal back as it was. Safe to call more than once (the escape sequences are
/// idempotent, and errors are ignored: there is nothing better to do on the way out).
pub fn restore() {
    let _ = disable_raw_mode();
    let mut out = io::stdout();
    let _ = execute!(
        out,
        DisableBracketedPaste,
        DisableMouseCapture,
        LeaveAlternateScreen,
        cursor::Show
    );
    let _ = out.flush();
}

/// Owns the terminal's modes: [`Guard::enter`] sets them and installs a panic hook that
/// restores them before the panic message is printed; dropping the guard restores them too.
pub struct Guard {
    pub terminal: Term,
    restored: Arc<AtomicBool>,
}

impl Guard {
    pub fn enter() -> io::Result<Guard> {
        let restored = Arc::new(AtomicBool::new(false));
        let flag = restored.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !flag.swap(true, Ordering::SeqCst) {
                restore();
            }
            previous(info);
        }));
        enable_raw_mode()?;
        let mut out = io::stdout();
        if let Err(e) = execute!(
            out,
            EnterAlternateScreen,
            EnableMouseCapture,
            EnableBracketedPaste
        ) {
            restore();
            return Err(e);
        }
        let terminal = match Terminal::new(CrosstermBackend::new(io::stdout())) {
            Ok(t) => t,
            Err(e) => {
                restore();
                return Err(e);
            }
        };
        Ok(Guard { terminal, restored })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.restored.swap(true, Ordering::SeqCst) {
            restore();
        }
        // The hook installed in `enter` stays (it only restores once), so a later panic still
        // prints normally.
    }
}
