//! The recovery-key prompt of `/restore` (issue 21): typed or pasted into a masked field of
//! its own (each character shows as •), never into the input line, so it is not in the input
//! history, not echoed, and never sent as a message or a typing notice. Enter restores, Esc
//! leaves it. Pure, like the rest of `app`.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::{Action, App, Input};
use crate::input::LineEditor;

/// What the input line's prompt says while the field is open.
pub const RECOVERY_PROMPT: &str = "recovery key";

impl App {
    /// Opens the masked field (`/restore` without a key).
    pub(super) fn ask_recovery_key(&mut self) -> Vec<Action> {
        self.recovery = Some(LineEditor::masked());
        self.say(
            crate::buffer::NoticeKind::Info,
            "type or paste your recovery key (it is not shown), then Enter to restore your history; Esc to stop",
        );
        Vec::new()
    }

    /// Whether the recovery-key field is open (the view shows it instead of the input line).
    pub fn recovery_field(&self) -> Option<&LineEditor> {
        self.recovery.as_ref()
    }

    /// Takes an input while the field is open; `None` when it is not (the input goes on as
    /// usual).
    pub(super) fn recovery_input(&mut self, input: &Input) -> Option<Vec<Action>> {
        let field = self.recovery.as_mut()?;
        match input {
            Input::Paste(text) => {
                field.insert_str(text.trim());
            }
            Input::Key(key) => return Some(self.recovery_key(*key)),
            _ => return None,
        }
        Some(Vec::new())
    }

    fn recovery_key(&mut self, key: KeyEvent) -> Vec<Action> {
        let Some(field) = self.recovery.as_mut() else {
            return Vec::new();
        };
        match key.code {
            KeyCode::Esc => {
                self.recovery = None;
                self.say(crate::buffer::NoticeKind::Info, "no restore");
            }
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.recovery = None;
            }
            KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                field.insert(c);
            }
            KeyCode::Backspace => field.backspace(),
            KeyCode::Left => field.left(),
            KeyCode::Right => field.right(),
            KeyCode::Home => field.home(),
            KeyCode::End => field.end(),
            KeyCode::Enter => {
                let key = field.take(false);
                self.recovery = None;
                if key.trim().is_empty() {
                    self.say(crate::buffer::NoticeKind::Info, "no restore");
                    return Vec::new();
                }
                self.say(
                    crate::buffer::NoticeKind::Info,
                    "restoring your history from the backup…",
                );
                return self.device_op(crate::devices::DeviceOp::Restore {
                    key: key.trim().to_string(),
                });
            }
            // Nothing else leaves the field (no history, no completion).
            _ => {}
        }
        Vec::new()
    }
}
