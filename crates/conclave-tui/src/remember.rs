//! The direct conversations open at the end of a session, kept in the state directory, so
//! they are in the list again at the next start (the server has no list of them to ask).
//!
//! One file per server and account: one conversation per line, its other participants
//! separated by commas. Lines that are not valid are skipped; the file is bounded.
//!
//! The muted conversations (`/mute`) are kept the same way, beside it (`.muted`): one per
//! line, `#room` or `@bob,carol`.

use std::io::Write;
use std::path::{Path, PathBuf};

use conclave_client::proto::names;

use crate::buffer::ConvKey;

/// Most conversations remembered (the file is cut to these).
pub const MAX_REMEMBERED: usize = 200;
/// Most participants of one remembered conversation.
const MAX_PEOPLE: usize = 64;
/// Files larger than this are not read.
const MAX_FILE_BYTES: u64 = 256 * 1024;

/// Where the list for `user` on `server` lives.
pub fn path(state_dir: &Path, server: &str, user: &str) -> PathBuf {
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    state_dir
        .join("chat")
        .join(safe(server))
        .join(format!("{}.direct", safe(user)))
}

/// The remembered conversations (none when the file is missing or unreadable).
pub fn load(path: &Path) -> Vec<Vec<String>> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() <= MAX_FILE_BYTES => {}
        _ => return Vec::new(),
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    parse(&text)
}

/// The conversations in `text`: valid lines only, at most [`MAX_REMEMBERED`], no repeats.
pub fn parse(text: &str) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    for line in text.lines() {
        let people: Option<Vec<String>> = line
            .split(',')
            .map(|p| names::canonical(p.trim()).ok())
            .collect();
        let Some(mut people) = people else { continue };
        people.sort();
        people.dedup();
        if people.is_empty() || people.len() > MAX_PEOPLE || out.contains(&people) {
            continue;
        }
        out.push(people);
        if out.len() == MAX_REMEMBERED {
            break;
        }
    }
    out
}

/// Writes the list (whole, replacing the file; private to the user).
pub fn save(path: &Path, conversations: &[Vec<String>]) -> std::io::Result<()> {
    let mut text = String::new();
    for c in conversations.iter().take(MAX_REMEMBERED) {
        text.push_str(&c.join(","));
        text.push('\n');
    }
    write_private(path, &text)
}

/// Where the muted conversations are kept, beside the direct conversations' file.
pub fn muted_path(direct: &Path) -> PathBuf {
    direct.with_extension("muted")
}

/// The muted conversations (none when the file is missing or unreadable).
pub fn load_muted(path: &Path) -> Vec<ConvKey> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() <= MAX_FILE_BYTES => {}
        _ => return Vec::new(),
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let key = if let Some(room) = line.strip_prefix('#') {
            names::canonical_room(room.trim()).ok().map(ConvKey::Room)
        } else if let Some(people) = line.strip_prefix('@') {
            parse(people).into_iter().next().map(ConvKey::Direct)
        } else {
            None
        };
        if let Some(key) = key
            && !out.contains(&key)
        {
            out.push(key);
            if out.len() == MAX_REMEMBERED {
                break;
            }
        }
    }
    out
}

/// Writes the muted conversations (whole, replacing the file; private to the user).
pub fn save_muted(path: &Path, muted: &[ConvKey]) -> std::io::Result<()> {
    let text: String = muted
        .iter()
        .filter(|k| **k != ConvKey::Status)
        .take(MAX_REMEMBERED)
        .map(|k| format!("{}\n", k.label()))
        .collect();
    write_private(path, &text)
}

/// Replaces the file at `path` with `text` (mode 0600, through a temporary file).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut options = std::fs::OpenOptions::new();
    options.create(true).write(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_conversations_come_back_and_bad_lines_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = path(dir.path(), "127.0.0.1:7667", "alice");
        assert!(p.starts_with(dir.path()));
        assert_eq!(load(&p), Vec::<Vec<String>>::new(), "no file yet");
        let list = vec![vec!["bob".to_string()], vec!["bob".into(), "carol".into()]];
        save(&p, &list).expect("save");
        assert_eq!(load(&p), list);
        assert_eq!(
            parse("bob\n\nnot a name!\nBob\ncarol, dave\n"),
            vec![vec!["bob".to_string()], vec!["carol".into(), "dave".into()]]
        );
    }

    #[test]
    fn muted_conversations_come_back_and_bad_lines_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = muted_path(&path(dir.path(), "127.0.0.1:7667", "alice"));
        assert_eq!(load_muted(&p), Vec::new(), "no file yet");
        let muted = vec![
            ConvKey::Room("lab".into()),
            ConvKey::Direct(vec!["bob".into(), "carol".into()]),
        ];
        save_muted(&p, &muted).expect("save");
        assert_eq!(load_muted(&p), muted);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&p, "#lab\nnonsense\n#\n@bob\n#lab\n@not a name!\n").expect("write");
        assert_eq!(
            load_muted(&p),
            vec![
                ConvKey::Room("lab".into()),
                ConvKey::Direct(vec!["bob".into()])
            ]
        );
    }
}
