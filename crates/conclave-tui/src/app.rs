//! The screen's state and every decision it makes, without I/O: [`App::update`] takes an
//! [`Input`] (a key, a paste, a server event, a reply, a tick) and returns the [`Action`]s the
//! I/O shell (`run`) must carry out. Tests drive it directly.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use conclave_client::proto::{DisconnectReason, Event, Message, Reply, Request, names};
use conclave_client::trust::format_fingerprint;
use conclave_client::{Auth, ClientEvent, PinOutcome, Session, Trust};
use jiff::tz::TimeZone;
use ratatui::crossterm::event::{
    KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEvent, MouseEventKind,
};

use crate::buffer::{Buffer, ConvKey, Entry, HistoryState, NoticeKind, Presence};
use crate::command::{self, BanTarget, COMMANDS, Command, DEFAULT_HISTORY_PAGE, MAX_HISTORY_PAGE};
use crate::files::{FileEvent, Transfer};
use crate::input::LineEditor;
use crate::layout;
use crate::view;

mod presence;
mod recovery;
mod thread;
pub use recovery::RECOVERY_PROMPT;

/// Messages loaded when a conversation is opened.
pub const INITIAL_HISTORY: u32 = 50;
/// Seconds between latency measurements (pings).
pub const PING_EVERY_TICKS: u64 = 5;
/// Rows the mouse wheel scrolls.
pub const WHEEL_ROWS: usize = 3;
/// Most search results asked for.
pub const SEARCH_LIMIT: u32 = 100;
/// Most history pages loaded to reach a search result.
pub const MAX_JUMP_PAGES: u32 = 20;
/// Most buffers open at once (rooms and direct conversations).
pub const MAX_BUFFERS: usize = 200;
/// Most transfers shown at once.
pub const MAX_TRANSFERS: usize = 16;
/// Most file offers whose names are remembered (for the progress bars of `/accept`).
pub const MAX_OFFERS: usize = 256;

/// What the I/O shell feeds in.
#[derive(Debug, Clone)]
pub enum Input {
    Key(KeyEvent),
    Mouse(MouseEvent),
    Paste(String),
    Resize(u16, u16),
    /// Once a second.
    Tick,
    Connected(Box<Session>),
    ConnectFailed(ConnectFailure),
    Client(ClientEvent),
    Reply {
        tag: u64,
        result: Result<Reply, Failure>,
    },
    /// A ping's round trip, or why it failed.
    Latency(Option<Duration>),
    File(FileEvent),
    /// The result of `/file` (the file id) or `/accept` (where it goes).
    FileStarted {
        tag: u64,
        result: Result<String, String>,
    },
}

/// A request that failed: the error code and the sentence to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: String,
    pub message: String,
}

/// Why connecting failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// A server not pinned yet: ask whether to trust this fingerprint.
    UnknownServer { fingerprint: String },
    /// The certificate is not the pinned one (the full warning text).
    Mismatch { text: String },
    /// The server refused the login or registration.
    Refused { code: String, message: String },
    /// Anything else (network, TLS, protocol).
    Other { message: String },
}

/// What the I/O shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Connect {
        trust: Trust,
        auth: Auth,
    },
    Request {
        tag: u64,
        req: Request,
        /// Sent as it is, even where end-to-end encryption would handle it (a room created
        /// server-encrypted).
        plain: bool,
    },
    Ping,
    SendFile {
        tag: u64,
        path: PathBuf,
        target: ConvKey,
    },
    AcceptFile {
        tag: u64,
        file_id: String,
        dir: PathBuf,
    },
    /// Withdraw a file I sent (`/cancel`).
    CancelFile {
        tag: u64,
        file_id: String,
    },
    /// Approve or reject a device, the backup, a restore (issue 21); the result comes back
    /// as [`Input::FileStarted`] with this tag (a sentence to show).
    Device {
        tag: u64,
        op: crate::devices::DeviceOp,
    },
    /// The direct conversations now open, to remember for the next start.
    RememberDirect(Vec<Vec<String>>),
    /// The muted conversations now, to remember for the next start.
    RememberMuted(Vec<ConvKey>),
    /// Leave: tell the server (when connected), restore the terminal, exit.
    Quit,
    /// Ring the terminal bell (a mention).
    Bell,
    /// Set the terminal window's title (mentions waiting).
    SetTitle(String),
}

/// How to log in, from the command line.
#[derive(Debug, Clone)]
pub struct AppOptions {
    pub server: String,
    pub user: String,
    pub register: bool,
    /// From `--fingerprint` or `--ca`; `PinnedOnly` means "ask on first contact".
    pub trust: Trust,
    /// From `--password-env`; otherwise the login screen asks.
    pub password: Option<String>,
    pub server_password: Option<String>,
    pub invite_code: Option<String>,
    /// The direct conversations open when the last session ended (each: the other
    /// participants), shown again after login.
    pub direct: Vec<Vec<String>>,
}

/// The login screen.
#[derive(Debug, Clone, Default)]
pub struct LoginForm {
    pub password: LineEditor,
    /// Registration asks twice.
    pub confirm: Option<LineEditor>,
    /// Which field has the cursor: 0 password, 1 confirmation.
    pub field: usize,
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Phase {
    Login(Box<LoginForm>),
    Connecting,
    ConfirmFingerprint { fingerprint: String },
    Mismatch { text: String },
    Failed { message: String },
    Chat,
}

/// A pane over the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overlay {
    None,
    Help {
        scroll: usize,
    },
    Search {
        query: String,
        results: Vec<Message>,
        selected: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    Connected,
    Reconnecting { since_ms: i64, why: String },
    Closed { why: String },
}

/// What a request was for, to handle its reply.
#[derive(Debug, Clone)]
enum Pending {
    Send {
        key: ConvKey,
        local: u64,
        /// A reply: the message it answers and the quote shown in front of it.
        reply: Option<(String, String)>,
    },
    /// The first page of the thread pane.
    Thread {
        key: ConvKey,
        root: String,
    },
    Join {
        room: String,
    },
    Part {
        room: String,
    },
    Create {
        room: String,
    },
    Members {
        room: String,
    },
    Who {
        room: Option<String>,
    },
    Rooms,
    Devices {
        user: String,
    },
    History {
        key: ConvKey,
        asked: bool,
    },
    Search {
        query: String,
    },
    VoteKick,
    Done(String),
    File,
    Decline {
        file_id: String,
    },
    Files,
    Cancel {
        file_id: String,
    },
    // Everyday chat, part B (handled in `app::presence`).
    /// Nothing to show (typing notices, read markers).
    Quiet,
    ReadMarkers {
        key: ConvKey,
    },
    /// `rooms`, for topics and owners.
    RoomInfo,
}

/// Tab completion in progress: pressing Tab again cycles.
#[derive(Debug, Clone)]
struct Completion {
    start: usize,
    candidates: Vec<String>,
    index: usize,
}

pub struct App {
    pub opts: AppOptions,
    pub phase: Phase,
    pub overlay: Overlay,
    pub session: Option<Session>,
    pub buffers: Vec<Buffer>,
    pub current: usize,
    pub input: LineEditor,
    pub conn: ConnState,
    pub latency: Option<Duration>,
    /// Terminal size (columns, rows).
    pub size: (u16, u16),
    pub show_members: bool,
    /// The zone timestamps are shown in.
    pub tz: TimeZone,
    /// Wall clock, milliseconds since the epoch (set by the shell; fixed in tests).
    pub now_ms: i64,
    /// While reconnecting: when the client library tries next (set by the shell).
    pub next_attempt_ms: Option<i64>,
    pub transfers: Vec<Transfer>,
    /// Names of the files offered to me, by file id.
    offers: HashMap<String, String>,
    /// Names of the files I offered, by file id (for "bob received report.pdf").
    sent: HashMap<String, String>,
    pub quit: bool,
    auth: Option<Auth>,
    pending: HashMap<u64, Pending>,
    next_tag: u64,
    ticks: u64,
    completion: Option<Completion>,
    known_users: BTreeSet<String>,
    known_rooms: BTreeSet<String>,
    jump_pages: u32,
    /// Conversations this device reads end to end (set by the shell).
    pub e2ee: HashSet<ConvKey>,
    /// The direct conversations last told to the shell to remember.
    remembered: Vec<Vec<String>>,
    /// Topics, typing, read markers, away, display names, mutes.
    pub chat: crate::chat::ChatState,
    /// Edited, deleted, reacted and replying lines, per buffer.
    lines: HashMap<ConvKey, crate::acts::Lines>,
    /// The thread pane, while open (`/thread`).
    pub thread: Option<crate::thread::ThreadPane>,
    /// The masked recovery-key field of `/restore`, while it is open.
    recovery: Option<LineEditor>,
}

/// A server sentence as the chat says it: the JSON client's command names become this
/// screen's slash commands.
fn for_chat(message: &str) -> String {
    [
        ("`rooms`", "/rooms"),
        ("`join`", "/join"),
        ("`who`", "/who"),
        ("`files`", "/files"),
        ("`accept_file`", "/accept"),
        ("`history`", "/history"),
    ]
    .iter()
    .fold(message.to_string(), |m, (json, chat)| m.replace(json, chat))
}

fn ctrl(key: &KeyEvent, c: char) -> bool {
    key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char(c)
}

impl App {
    pub fn new(opts: AppOptions, size: (u16, u16), tz: TimeZone, now_ms: i64) -> App {
        let mut form = LoginForm {
            password: LineEditor::masked(),
            ..LoginForm::default()
        };
        if opts.register {
            form.confirm = Some(LineEditor::masked());
        }
        App {
            opts,
            phase: Phase::Login(Box::new(form)),
            overlay: Overlay::None,
            session: None,
            buffers: vec![Buffer::new(ConvKey::Status)],
            current: 0,
            input: LineEditor::default(),
            conn: ConnState::Closed {
                why: "not connected yet".into(),
            },
            latency: None,
            size,
            show_members: true,
            tz,
            now_ms,
            next_attempt_ms: None,
            transfers: Vec::new(),
            offers: HashMap::new(),
            sent: HashMap::new(),
            quit: false,
            auth: None,
            pending: HashMap::new(),
            next_tag: 1,
            ticks: 0,
            completion: None,
            known_users: BTreeSet::new(),
            known_rooms: BTreeSet::new(),
            jump_pages: 0,
            e2ee: HashSet::new(),
            remembered: Vec::new(),
            chat: Default::default(),
            lines: HashMap::new(),
            thread: None,
            recovery: None,
        }
    }

    /// A message's line in buffer `i`: its reply quote and state (edits, deletion,
    /// reactions) shown.
    fn entry_of(&mut self, i: usize, m: &conclave_client::proto::Message, me: &str) -> Entry {
        let mut entry = Entry::message(m, me);
        let x = m.extra.as_deref();
        let reply_to = x.and_then(|x| x.reply_to.as_deref());
        if reply_to.is_none() && x.and_then(|x| x.state.as_ref()).is_none() {
            return entry;
        }
        let Some(b) = self.buffers.get(i) else {
            return entry;
        };
        let lines = self.lines.entry(b.key.clone()).or_default();
        let quote = reply_to.map(|r| crate::acts::quote(b, lines, r));
        let mut line = crate::acts::line_of(m, &entry.text, quote);
        line.reply_to = reply_to.map(str::to_string);
        entry.text = line.text();
        lines.insert(m.msg_id.clone(), line);
        entry
    }

    /// Edits, deletes or reacts to a message of the current conversation.
    fn act_on(
        &mut self,
        (selected, last): (thread::Pick, thread::Pick),
        what: &str,
        kind: conclave_client::proto::ActKind,
        content: &str,
    ) -> Vec<Action> {
        let b = self.current_buffer();
        let Some(target) = b.key.target(Vec::new()) else {
            self.error("this is the status buffer: switch to a conversation first");
            return Vec::new();
        };
        let id = match self.target_message(selected, last, what) {
            Ok(id) => id,
            Err(e) => {
                self.error(&e);
                return Vec::new();
            }
        };
        let body = match kind {
            conclave_client::proto::ActKind::Delete => conclave_client::proto::Body {
                content_type: conclave_client::proto::chat::CONTENT_TYPE_DELETE.into(),
                data: Vec::new(),
            },
            _ => conclave_client::proto::Body::text(content),
        };
        let refs = conclave_client::proto::Refs {
            reply_to: None,
            acts_on: Some(conclave_client::proto::ActsOn { msg_id: id, kind }),
        };
        vec![self.request(
            Pending::Done(format!("{} done", kind.as_str())),
            Request::Send {
                target,
                body,
                idempotency_key: None,
                refs: Some(Box::new(refs)),
            },
        )]
    }

    /// The direct conversations open now, in the order of the list.
    fn open_directs(&self) -> Vec<Vec<String>> {
        self.buffers
            .iter()
            .filter_map(|b| match &b.key {
                ConvKey::Direct(people) => Some(people.clone()),
                _ => None,
            })
            .take(crate::remember::MAX_REMEMBERED)
            .collect()
    }

    /// The first actions: connect at once when the password came from the environment.
    pub fn start(&mut self) -> Vec<Action> {
        match self.opts.password.clone() {
            Some(password) => self.connect_with(password),
            None => Vec::new(),
        }
    }

    pub fn me(&self) -> &str {
        self.session
            .as_ref()
            .map_or(self.opts.user.as_str(), |s| s.user.as_str())
    }

    pub fn current_buffer(&self) -> &Buffer {
        // `current` always indexes `buffers`, which always holds the status buffer.
        &self.buffers[self.current.min(self.buffers.len() - 1)]
    }

    fn connect_with(&mut self, password: String) -> Vec<Action> {
        let user = self.opts.user.clone();
        let server_password = self.opts.server_password.clone();
        let auth = if self.opts.register {
            Auth::Register {
                user,
                password,
                server_password,
                invite_code: self.opts.invite_code.clone(),
            }
        } else {
            Auth::Login {
                user,
                password,
                server_password,
            }
        };
        self.auth = Some(auth.clone());
        self.phase = Phase::Connecting;
        vec![Action::Connect {
            trust: self.opts.trust.clone(),
            auth,
        }]
    }

    fn tag(&mut self, pending: Pending) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.pending.insert(tag, pending);
        tag
    }

    fn device_op(&mut self, op: crate::devices::DeviceOp) -> Vec<Action> {
        let tag = self.tag(Pending::Done(String::new()));
        vec![Action::Device { tag, op }]
    }

    fn request(&mut self, pending: Pending, req: Request) -> Action {
        let tag = self.tag(pending);
        Action::Request {
            tag,
            req,
            plain: false,
        }
    }

    /// The buffer of `key`, created if needed (bounded: past [`MAX_BUFFERS`], the status
    /// buffer stands in).
    fn buffer_index(&mut self, key: &ConvKey) -> usize {
        if let Some(i) = self.buffers.iter().position(|b| &b.key == key) {
            return i;
        }
        if self.buffers.len() >= MAX_BUFFERS {
            return 0;
        }
        self.buffers.push(Buffer::new(key.clone()));
        // Status first, then rooms, then direct conversations, each by name.
        let current_key = self.current_buffer().key.clone();
        self.buffers.sort_by(|a, b| a.key.cmp(&b.key));
        self.current = self
            .buffers
            .iter()
            .position(|b| b.key == current_key)
            .unwrap_or(0);
        self.buffers.iter().position(|b| &b.key == key).unwrap_or(0)
    }

    fn switch_to(&mut self, index: usize) {
        if index < self.buffers.len() {
            self.current = index;
            let b = &mut self.buffers[index];
            if b.scroll == 0 {
                b.unread = 0;
                b.mention = false;
            }
        }
    }

    /// A notice in the buffer of `key` (created if needed).
    /// End-to-end encryption news, as notices in the conversation they concern.
    fn e2ee_notice(&mut self, n: conclave_client::e2ee::E2eeNotice) {
        use conclave_client::e2ee::E2eeNotice as N;
        let me = self.me().to_string();
        if let N::Device(d) = n {
            let text = crate::devices::notice_text(&d);
            self.say(NoticeKind::Info, &crate::text::sanitize(&text, false));
            return;
        }
        let (conv, kind, text) = match n {
            // Handled above.
            N::Device(_) => return,
            N::Joined { conv } => (
                conv,
                NoticeKind::Info,
                "end-to-end encrypted: only members can read it; messages from before you joined are not readable".to_string(),
            ),
            N::Members { conv, added, removed, .. } => {
                let mut parts = Vec::new();
                if !added.is_empty() {
                    parts.push(format!("added {}", added.join(", ")));
                }
                if !removed.is_empty() {
                    parts.push(format!("removed {}", removed.join(", ")));
                }
                (conv, NoticeKind::Info, format!("encryption group: {}", parts.join("; ")))
            }
            N::NewDevice { conv, user, device, fingerprint, changed } => (
                conv,
                if changed { NoticeKind::Error } else { NoticeKind::Info },
                format!(
                    "{} device {user}/{device}: safety number {fingerprint}",
                    if changed { "CHANGED" } else { "new" }
                ),
            ),
            N::Removed { conv } => (
                conv,
                NoticeKind::Kick,
                "you were removed from this conversation's encryption group".to_string(),
            ),
            N::Unreadable { conv, seq, reason } => (
                conv,
                NoticeKind::Info,
                format!("message {seq} cannot be read on this device: {reason}"),
            ),
        };
        let key = ConvKey::from_conv(&conv, &me);
        self.notice_in(&key, kind, &crate::text::sanitize(&text, false));
    }

    fn notice_in(&mut self, key: &ConvKey, kind: NoticeKind, text: &str) {
        let i = self.buffer_index(key);
        let entry = Entry::notice(self.now_ms, kind, text);
        self.push_entry(i, entry, false);
    }

    /// A notice in the buffer on screen.
    fn say(&mut self, kind: NoticeKind, text: &str) {
        let entry = Entry::notice(self.now_ms, kind, text);
        let i = self.current;
        self.push_entry(i, entry, false);
    }

    fn error(&mut self, text: &str) {
        self.say(NoticeKind::Error, text);
    }

    /// Appends to buffer `i`, keeping a scrolled-up view still and counting unread messages.
    fn push_entry(&mut self, i: usize, entry: Entry, counts: bool) {
        let width = layout::chat_width(self.size, self.members_visible_for(i));
        let rows = view::entry_row_count(&entry, width);
        let is_current = i == self.current;
        let mention = entry.mention;
        let Some(b) = self.buffers.get_mut(i) else {
            return;
        };
        let direct = matches!(b.key, ConvKey::Direct(_));
        if !b.push(entry) {
            return;
        }
        if b.scroll > 0 {
            b.scroll += rows;
        }
        if counts && (!is_current || b.scroll > 0) {
            b.unread = b.unread.saturating_add(1);
            b.mention |= mention || direct;
        }
    }

    fn members_visible_for(&self, i: usize) -> bool {
        self.show_members
            && self
                .buffers
                .get(i)
                .is_some_and(|b| matches!(b.key, ConvKey::Room(_)))
    }

    /// The names shown beside messages (see [`crate::chat::ChatState::nick_labels`]).
    pub fn nick_labels(&self) -> HashMap<String, String> {
        if self.chat.display_names.is_empty() {
            return HashMap::new();
        }
        let mut accounts = self.known_users.clone();
        for b in &self.buffers {
            accounts.extend(b.members.keys().cloned());
        }
        self.chat.nick_labels(&accounts)
    }

    pub fn members_visible(&self) -> bool {
        self.members_visible_for(self.current)
    }

    pub fn update(&mut self, input: Input) -> Vec<Action> {
        let mut actions = self.update_inner(input);
        if matches!(self.phase, Phase::Chat) {
            let open = self.open_directs();
            if open != self.remembered {
                self.remembered = open.clone();
                actions.push(Action::RememberDirect(open));
            }
        }
        actions
    }

    fn update_inner(&mut self, input: Input) -> Vec<Action> {
        match input {
            Input::Resize(w, h) => {
                self.size = (w, h);
                Vec::new()
            }
            Input::Key(key) if key.kind == KeyEventKind::Release => Vec::new(),
            Input::Key(key) if ctrl(&key, 'c') => self.quit_now(),
            Input::Tick => self.tick(),
            Input::Connected(session) => self.connected(*session),
            Input::ConnectFailed(failure) => self.connect_failed(failure),
            Input::Client(event) => self.client_event(event),
            Input::Reply { tag, result } => self.reply(tag, result),
            Input::Latency(latency) => {
                self.latency = latency;
                Vec::new()
            }
            Input::File(event) => {
                self.file_event(event);
                Vec::new()
            }
            Input::FileStarted { tag, result } => {
                if let Some(Pending::Cancel { file_id }) = self.pending.remove(&tag)
                    && result.is_ok()
                {
                    self.transfers.retain(|t| t.file_id != file_id);
                }
                match result {
                    Ok(what) => self.say(NoticeKind::Info, &what),
                    Err(e) => self.error(&e),
                }
                Vec::new()
            }
            input => match &self.phase {
                Phase::Login(_) => self.login_input(input),
                Phase::Connecting => self.connecting_input(input),
                Phase::ConfirmFingerprint { .. } => self.confirm_input(input),
                Phase::Mismatch { .. } | Phase::Failed { .. } => self.final_input(input),
                Phase::Chat => self.chat_input(input),
            },
        }
    }

    fn quit_now(&mut self) -> Vec<Action> {
        self.quit = true;
        vec![Action::Quit]
    }

    fn tick(&mut self) -> Vec<Action> {
        self.ticks += 1;
        if matches!(self.phase, Phase::Chat)
            && self.conn == ConnState::Connected
            && self.ticks.is_multiple_of(PING_EVERY_TICKS)
        {
            let mut actions = vec![Action::Ping];
            actions.extend(self.chat_tick());
            return actions;
        }
        self.chat_tick()
    }

    // ---- before the chat: login, trust ----

    fn login_input(&mut self, input: Input) -> Vec<Action> {
        let Phase::Login(form) = &mut self.phase else {
            return Vec::new();
        };
        let field = match (form.field, form.confirm.as_mut()) {
            (1, Some(confirm)) => confirm,
            _ => &mut form.password,
        };
        match input {
            Input::Paste(text) => {
                field.insert_str(&text);
            }
            Input::Key(key) => match key.code {
                KeyCode::Esc => return self.quit_now(),
                KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => {
                    field.insert(c);
                }
                KeyCode::Backspace => field.backspace(),
                KeyCode::Tab | KeyCode::Down | KeyCode::Up if form.confirm.is_some() => {
                    form.field = 1 - form.field.min(1);
                }
                KeyCode::Enter => return self.submit_login(),
                _ => {}
            },
            _ => {}
        }
        Vec::new()
    }

    fn submit_login(&mut self) -> Vec<Action> {
        let Phase::Login(form) = &mut self.phase else {
            return Vec::new();
        };
        if form.password.is_empty() {
            form.error = Some("type your password, then Enter (Esc quits)".into());
            return Vec::new();
        }
        if let Some(confirm) = &form.confirm {
            if form.field == 0 {
                form.field = 1;
                return Vec::new();
            }
            if confirm.text() != form.password.text() {
                form.error = Some("the two passwords differ; type them again".into());
                form.password.clear();
                form.confirm = Some(LineEditor::masked());
                form.field = 0;
                return Vec::new();
            }
        }
        let password = form.password.take(false);
        self.connect_with(password)
    }

    fn connecting_input(&mut self, input: Input) -> Vec<Action> {
        match input {
            Input::Key(key) if key.code == KeyCode::Esc => self.quit_now(),
            _ => Vec::new(),
        }
    }

    fn confirm_input(&mut self, input: Input) -> Vec<Action> {
        let Phase::ConfirmFingerprint { fingerprint } = &self.phase else {
            return Vec::new();
        };
        let Input::Key(key) = input else {
            return Vec::new();
        };
        match key.code {
            KeyCode::Char('y') | KeyCode::Char('Y') => {
                let trust = Trust::Fingerprint(fingerprint.clone());
                match self.auth.clone() {
                    Some(auth) => {
                        self.phase = Phase::Connecting;
                        vec![Action::Connect { trust, auth }]
                    }
                    None => Vec::new(),
                }
            }
            KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Char('q') | KeyCode::Esc => {
                self.quit_now()
            }
            _ => Vec::new(),
        }
    }

    fn final_input(&mut self, input: Input) -> Vec<Action> {
        match input {
            Input::Key(key)
                if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc | KeyCode::Enter) =>
            {
                self.quit_now()
            }
            _ => Vec::new(),
        }
    }

    fn connect_failed(&mut self, failure: ConnectFailure) -> Vec<Action> {
        match failure {
            ConnectFailure::UnknownServer { fingerprint } => {
                self.phase = Phase::ConfirmFingerprint { fingerprint };
            }
            ConnectFailure::Mismatch { text } => self.phase = Phase::Mismatch { text },
            ConnectFailure::Refused { code, message }
                if code == "auth_failed" && self.opts.password.is_none() =>
            {
                let mut form = LoginForm {
                    password: LineEditor::masked(),
                    error: Some(message),
                    ..LoginForm::default()
                };
                if self.opts.register {
                    form.confirm = Some(LineEditor::masked());
                }
                self.phase = Phase::Login(Box::new(form));
            }
            ConnectFailure::Refused { message, .. } | ConnectFailure::Other { message } => {
                self.phase = Phase::Failed { message };
            }
        }
        Vec::new()
    }

    fn connected(&mut self, session: Session) -> Vec<Action> {
        self.phase = Phase::Chat;
        self.conn = ConnState::Connected;
        let trust = match &session.trust {
            PinOutcome::Known { .. } => "matches the pinned fingerprint".to_string(),
            PinOutcome::NewlyPinned { known_servers }
            | PinOutcome::Given {
                known_servers: Some(known_servers),
                ..
            } => format!("fingerprint pinned in {}", known_servers.display()),
            PinOutcome::Given { .. } => "matches --fingerprint".to_string(),
            PinOutcome::Ca { ca_file } => format!("verified with the CA {}", ca_file.display()),
        };
        let text = format!(
            "connected to {} as {}{} ({} with {}, certificate {}; {})",
            session.server,
            session.user,
            if session.admin { " (admin)" } else { "" },
            session.tls_version,
            session.key_exchange,
            format_fingerprint(&session.fingerprint),
            trust
        );
        self.notice_in(&ConvKey::Status, NoticeKind::Info, &text);
        if !conclave_client::is_post_quantum(&session.key_exchange) {
            self.notice_in(
                &ConvKey::Status,
                NoticeKind::Error,
                &format!(
                    "the server agreed only to the classical key exchange {}: traffic recorded now could be decrypted by a future quantum computer (a current server offers X25519MLKEM768)",
                    session.key_exchange
                ),
            );
        }
        self.notice_in(
            &ConvKey::Status,
            NoticeKind::Info,
            "type /help for the commands; Ctrl-N / Ctrl-P switch conversations, F1 help, F2 members",
        );
        let rooms = session.rooms.clone();
        self.known_users.insert(session.user.clone());
        self.session = Some(session);
        let mut actions = vec![Action::Ping];
        // Topics and owners (the title line, `@room`).
        actions.push(self.request(Pending::RoomInfo, Request::Rooms));
        for room in &rooms {
            actions.extend(self.open_room(room));
        }
        // The direct conversations open last time (the server keeps no list of them).
        let me = self.me().to_string();
        for people in self.opts.direct.clone() {
            let people: Vec<String> = people.into_iter().filter(|p| *p != me).collect();
            let key = ConvKey::Direct(if people.is_empty() {
                vec![me.clone()]
            } else {
                people
            });
            if !self.buffers.iter().any(|b| b.key == key) {
                self.buffer_index(&key);
                actions.extend(self.load_history(&key, INITIAL_HISTORY, false));
            }
        }
        self.remembered = self.open_directs();
        if let Some(first) = rooms.first() {
            let i = self.buffer_index(&ConvKey::Room(first.clone()));
            self.switch_to(i);
        }
        actions
    }

    /// A room buffer, with its members and recent history requested.
    fn open_room(&mut self, room: &str) -> Vec<Action> {
        self.known_rooms.insert(room.to_string());
        let key = ConvKey::Room(room.to_string());
        self.buffer_index(&key);
        let mut actions = vec![self.request(
            Pending::Members {
                room: room.to_string(),
            },
            Request::Who {
                room: Some(room.to_string()),
            },
        )];
        actions.extend(self.load_history(&key, INITIAL_HISTORY, false));
        actions
    }

    /// Asks for `limit` messages older than what the buffer holds.
    fn load_history(&mut self, key: &ConvKey, limit: u32, asked: bool) -> Vec<Action> {
        let Some(conv) = key.conv_ref() else {
            return Vec::new();
        };
        let i = self.buffer_index(key);
        let Some(b) = self.buffers.get_mut(i) else {
            return Vec::new();
        };
        if b.history == HistoryState::Loading {
            return Vec::new();
        }
        b.history = HistoryState::Loading;
        let before = b.oldest_seq();
        let mut actions = vec![self.request(
            Pending::History {
                key: key.clone(),
                asked,
            },
            Request::History {
                conv: conv.clone(),
                limit,
                before,
            },
        )];
        // The first page: also who has read how far ("read by").
        if before.is_none() {
            actions.push(self.request(
                Pending::ReadMarkers { key: key.clone() },
                Request::ReadMarkers { conv },
            ));
        }
        actions
    }

    // ---- the chat ----

    fn chat_input(&mut self, input: Input) -> Vec<Action> {
        if let Some(actions) = self.recovery_input(&input) {
            return actions;
        }
        match input {
            Input::Paste(text) => {
                self.completion = None;
                if !self.input.insert_str(&text) {
                    self.error("the input is full; the rest of the paste was dropped");
                }
                Vec::new()
            }
            Input::Mouse(mouse) => {
                match mouse.kind {
                    MouseEventKind::ScrollUp => return self.scroll_up(WHEEL_ROWS),
                    MouseEventKind::ScrollDown => self.scroll_down(WHEEL_ROWS),
                    _ => {}
                }
                Vec::new()
            }
            Input::Key(key) => self.chat_key(key),
            _ => Vec::new(),
        }
    }

    fn chat_key(&mut self, key: KeyEvent) -> Vec<Action> {
        if key.code != KeyCode::Tab {
            self.completion = None;
        }
        // Panes first.
        match (&mut self.overlay, key.code) {
            (Overlay::Help { .. }, KeyCode::Esc | KeyCode::F(1)) => {
                self.overlay = Overlay::None;
                return Vec::new();
            }
            (Overlay::Help { scroll }, KeyCode::Up | KeyCode::PageUp) => {
                *scroll = scroll.saturating_sub(if key.code == KeyCode::Up { 1 } else { 10 });
                return Vec::new();
            }
            (Overlay::Help { scroll }, KeyCode::Down | KeyCode::PageDown) => {
                let max = crate::view::help_lines().len();
                *scroll = (*scroll + if key.code == KeyCode::Down { 1 } else { 10 }).min(max);
                return Vec::new();
            }
            (Overlay::Search { .. }, KeyCode::Esc) => {
                self.overlay = Overlay::None;
                return Vec::new();
            }
            (Overlay::Search { selected, .. }, KeyCode::Up) => {
                *selected = selected.saturating_sub(1);
                return Vec::new();
            }
            (
                Overlay::Search {
                    selected, results, ..
                },
                KeyCode::Down,
            ) => {
                *selected = (*selected + 1).min(results.len().saturating_sub(1));
                return Vec::new();
            }
            (
                Overlay::Search {
                    selected, results, ..
                },
                KeyCode::Enter,
            ) => {
                let target = results.get(*selected).cloned();
                self.overlay = Overlay::None;
                return match target {
                    Some(m) => self.jump_to(&m),
                    None => Vec::new(),
                };
            }
            _ => {}
        }
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        let page = layout::chat_rows(self.size).saturating_sub(1).max(1);
        match key.code {
            KeyCode::F(1) => self.overlay = Overlay::Help { scroll: 0 },
            KeyCode::F(2) => self.show_members = !self.show_members,
            KeyCode::PageUp => return self.scroll_up(page),
            KeyCode::PageDown => self.scroll_down(page),
            KeyCode::Char('n') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.switch_to((self.current + 1) % self.buffers.len());
            }
            KeyCode::Char('p') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.switch_to((self.current + self.buffers.len() - 1) % self.buffers.len());
            }
            KeyCode::Right if alt => self.switch_to((self.current + 1) % self.buffers.len()),
            KeyCode::Left if alt => {
                self.switch_to((self.current + self.buffers.len() - 1) % self.buffers.len());
            }
            KeyCode::Char(c @ '1'..='9') if alt => {
                self.switch_to(c as usize - '1' as usize);
            }
            KeyCode::Char('w') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.input.delete_word();
            }
            KeyCode::Char('u') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.input.kill_to_start();
            }
            KeyCode::Char('k') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.input.kill_to_end();
            }
            KeyCode::Char('a') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.input.home();
            }
            KeyCode::Char('e') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.input.end();
            }
            KeyCode::Char('l') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                let b = &mut self.buffers[self.current];
                b.scroll = 0;
                b.unread = 0;
                b.mention = false;
            }
            KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) && !alt => {
                self.type_char(c);
                return self.chat_typed();
            }
            KeyCode::Backspace => self.input.backspace(),
            KeyCode::Delete => self.input.delete(),
            KeyCode::Left => self.input.left(),
            KeyCode::Right => self.input.right(),
            KeyCode::Home => self.input.home(),
            KeyCode::End => self.input.end(),
            KeyCode::Up if alt => self.select_message(true),
            KeyCode::Down if alt => self.select_message(false),
            KeyCode::Up => self.input.history_up(),
            KeyCode::Down => self.input.history_down(),
            KeyCode::Tab => self.complete(),
            KeyCode::Esc => {
                // The innermost first: an overlay, the selection, the thread pane.
                if !matches!(self.overlay, Overlay::None) {
                    self.overlay = Overlay::None;
                } else if self.current_buffer().selected.is_some() {
                    self.buffers[self.current].selected = None;
                    self.buffers[self.current].scroll = 0;
                } else if self.thread_shown_for(self.current) {
                    self.thread = None;
                }
            }
            KeyCode::Enter
                if key
                    .modifiers
                    .intersects(KeyModifiers::ALT | KeyModifiers::SHIFT) =>
            {
                self.input.insert_str("\n");
            }
            KeyCode::Enter => return self.submit(),
            _ => {}
        }
        Vec::new()
    }

    fn type_char(&mut self, c: char) {
        if !self.input.insert(c) {
            self.error("the input is full");
        }
    }

    fn scroll_up(&mut self, rows: usize) -> Vec<Action> {
        let width = layout::chat_width(self.size, self.members_visible());
        let view_rows = layout::chat_rows(self.size);
        let b = &mut self.buffers[self.current];
        let wanted = b.scroll + rows;
        let total = view::count_rows(b, width, wanted + view_rows, &self.tz);
        let max = total.saturating_sub(view_rows);
        b.scroll = wanted.min(max);
        if wanted >= max && b.history == HistoryState::More {
            let key = b.key.clone();
            return self.load_history(&key, DEFAULT_HISTORY_PAGE, false);
        }
        Vec::new()
    }

    fn scroll_down(&mut self, rows: usize) {
        let b = &mut self.buffers[self.current];
        b.scroll = b.scroll.saturating_sub(rows);
        if b.scroll == 0 {
            b.unread = 0;
            b.mention = false;
            b.highlight = None;
        }
    }

    /// Shows a search result in its conversation, loading older pages until it is there.
    fn jump_to(&mut self, m: &Message) -> Vec<Action> {
        let key = ConvKey::from_conv(&m.conv, self.me());
        let i = self.buffer_index(&key);
        self.switch_to(i);
        self.jump_pages = 0;
        let b = &mut self.buffers[i];
        b.highlight = Some(m.msg_id.clone());
        if b.has_seq(m.seq) {
            self.scroll_to_seq(i, m.seq);
            Vec::new()
        } else {
            b.jump_to = Some(m.seq);
            self.load_history(&key, MAX_HISTORY_PAGE, false)
        }
    }

    /// Scrolls buffer `i` so that the message `seq` is in the middle of the view.
    fn scroll_to_seq(&mut self, i: usize, seq: u64) {
        let width = layout::chat_width(self.size, self.members_visible_for(i));
        let view_rows = layout::chat_rows(self.size);
        let tz = self.tz.clone();
        let b = &mut self.buffers[i];
        b.jump_to = None;
        if let Some(rows_below) = view::rows_from(b, seq, width, &tz) {
            b.scroll = rows_below.saturating_sub(view_rows / 2);
        }
    }

    fn complete(&mut self) {
        if let Some(c) = &mut self.completion {
            if c.candidates.is_empty() {
                return;
            }
            c.index = (c.index + 1) % c.candidates.len();
            let (start, with) = (c.start, c.candidates[c.index].clone());
            self.input.replace_before_cursor(start, &with);
            return;
        }
        let (start, word) = self.input.current_word();
        let word = word.to_lowercase();
        let line = self.input.text().to_string();
        let candidates: Vec<String> = if line.starts_with('/') && start == 0 {
            COMMANDS
                .iter()
                .map(|c| format!("/{} ", c.name))
                .filter(|c| c.starts_with(&word))
                .collect()
        } else if word.starts_with('#') {
            self.room_names()
                .into_iter()
                .map(|r| format!("#{r} "))
                .filter(|r| r.starts_with(&word))
                .collect()
        } else if ["/accept ", "/decline "]
            .iter()
            .any(|c| line.to_lowercase().starts_with(c))
            && line[..start].split_whitespace().count() == 1
        {
            // The files offered to me, by id (the only thing these take first).
            let mut ids: Vec<&String> = self.offers.keys().collect();
            ids.sort();
            ids.into_iter()
                .filter(|id| id.to_lowercase().starts_with(&word))
                .map(|id| format!("{id} "))
                .collect()
        } else if line.to_lowercase().starts_with("/cancel ")
            && line[..start].split_whitespace().count() == 1
        {
            // The files I sent.
            let mut ids: Vec<&String> = self.sent.keys().collect();
            ids.sort();
            ids.into_iter()
                .filter(|id| id.to_lowercase().starts_with(&word))
                .map(|id| format!("{id} "))
                .collect()
        } else if ["/join ", "/part ", "/who "]
            .iter()
            .any(|c| line.to_lowercase().starts_with(c))
        {
            self.room_names()
                .into_iter()
                .filter(|r| r.starts_with(&word))
                .map(|r| format!("{r} "))
                .collect()
        } else {
            let suffix = if start == 0 { ": " } else { " " };
            self.user_names()
                .into_iter()
                .filter(|u| u.starts_with(&word) && u != self.me())
                .map(|u| format!("{u}{suffix}"))
                .collect()
        };
        if let Some(first) = candidates.first() {
            self.input.replace_before_cursor(start, first);
        }
        self.completion = Some(Completion {
            start,
            candidates,
            index: 0,
        });
    }

    fn room_names(&self) -> Vec<String> {
        let mut rooms = self.known_rooms.clone();
        rooms.extend(
            self.buffers
                .iter()
                .filter_map(|b| b.key.room().map(str::to_string)),
        );
        rooms.into_iter().collect()
    }

    /// Members of this conversation first, then everyone else heard of.
    fn user_names(&self) -> Vec<String> {
        let b = self.current_buffer();
        let mut names: Vec<String> = b.members.keys().cloned().collect();
        if let ConvKey::Direct(people) = &b.key {
            names.extend(people.iter().cloned());
        }
        for u in &self.known_users {
            if !names.contains(u) {
                names.push(u.clone());
            }
        }
        names
    }

    fn submit(&mut self) -> Vec<Action> {
        let text = self.input.text().to_string();
        if text.trim().is_empty() {
            self.input.clear();
            return Vec::new();
        }
        if let Some(rest) = text.strip_prefix("//") {
            self.input.take(true);
            return self.send_text(&format!("/{rest}"));
        }
        if text.starts_with('/') {
            return match command::parse(&text) {
                Ok(cmd) => {
                    self.input.take(cmd.may_remember());
                    self.run_command(cmd)
                }
                Err(e) => {
                    // The line goes (to the history: Up brings it back), so the next command
                    // is not typed after it.
                    self.input.take(true);
                    self.error(&e);
                    Vec::new()
                }
            };
        }
        self.input.take(true);
        if let Some((key, root)) = self.thread_root_for_typing() {
            let kind = conclave_client::proto::chat::TextKind::PLAIN;
            return self.send_full(key, Vec::new(), &text, kind, Some(root));
        }
        self.send_text(&text)
    }

    fn send_text(&mut self, text: &str) -> Vec<Action> {
        let key = self.current_buffer().key.clone();
        self.send_to(key, Vec::new(), text)
    }

    fn send_to(&mut self, key: ConvKey, except: Vec<String>, text: &str) -> Vec<Action> {
        self.send_kind(
            key,
            except,
            text,
            conclave_client::proto::chat::TextKind::PLAIN,
        )
    }

    /// Sends text of a kind (plain, Markdown, an action).
    fn send_kind(
        &mut self,
        key: ConvKey,
        except: Vec<String>,
        text: &str,
        kind: conclave_client::proto::chat::TextKind,
    ) -> Vec<Action> {
        self.send_full(key, except, text, kind, None)
    }

    /// Sends text of a kind, as a reply to `reply_to` when given (quoted in front of it).
    fn send_full(
        &mut self,
        key: ConvKey,
        except: Vec<String>,
        text: &str,
        kind: conclave_client::proto::chat::TextKind,
        reply_to: Option<String>,
    ) -> Vec<Action> {
        let Some(target) = key.target(except) else {
            self.error("this is the status buffer: /join a room or /msg someone to talk");
            return Vec::new();
        };
        if let ConnState::Closed { why } = &self.conn {
            let text = format!("not sent: the connection is closed ({why}); /quit and start again");
            self.error(&text);
            return Vec::new();
        }
        let i = self.buffer_index(&key);
        let local = self.next_tag;
        let mut entry = Entry::mine(self.now_ms, self.me(), text, kind, local);
        let reply = reply_to.map(|r| {
            let lines = self.lines.entry(key.clone()).or_default();
            let quote = crate::acts::quote(&self.buffers[i], lines, &r);
            (r, quote)
        });
        if let Some((root, quote)) = &reply {
            self.thread_mine(&key, root, &entry);
            let n = quote.chars().count();
            for run in &mut entry.styles {
                run.start += n;
                run.end += n;
            }
            entry.text.insert_str(0, quote);
        }
        self.push_entry(i, entry, false);
        self.buffers[i].scroll = 0;
        self.chat.sent_message();
        let refs = reply.as_ref().map(|(r, _)| {
            Box::new(conclave_client::proto::Refs {
                reply_to: Some(r.clone()),
                acts_on: None,
            })
        });
        vec![self.request(
            Pending::Send { key, local, reply },
            Request::Send {
                target,
                body: conclave_client::proto::Body::text_of_kind(text, kind),
                idempotency_key: None,
                refs,
            },
        )]
    }

    fn current_room(&mut self, what: &str) -> Option<String> {
        let room = self.current_buffer().key.room().map(str::to_string);
        if room.is_none() {
            self.error(&format!(
                "{what} works in a room: switch to one (Ctrl-N) first"
            ));
        }
        room
    }

    fn canonical_users(&mut self, users: &[String]) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for u in users {
            match names::canonical(u) {
                Ok(name) => out.push(name),
                Err(e) => {
                    self.error(&format!("{u:?} is not a user name: {e}"));
                    return None;
                }
            }
        }
        out.sort();
        out.dedup();
        Some(out)
    }

    /// Opens (and shows) the direct conversation with `users`, loading its history.
    fn open_direct(&mut self, users: Vec<String>) -> (ConvKey, Vec<Action>) {
        let me = self.me().to_string();
        let mut others: Vec<String> = users.into_iter().filter(|u| *u != me).collect();
        if others.is_empty() {
            others.push(me);
        }
        let key = ConvKey::Direct(others);
        let existed = self.buffers.iter().any(|b| b.key == key);
        let i = self.buffer_index(&key);
        self.switch_to(i);
        let actions = if existed {
            Vec::new()
        } else {
            self.load_history(&key, INITIAL_HISTORY, false)
        };
        (key, actions)
    }

    fn run_command(&mut self, cmd: Command) -> Vec<Action> {
        match cmd {
            Command::Help(topic) => {
                match topic.as_deref().and_then(command::spec) {
                    Some(spec) => {
                        let text = format!("/{} {}: {}", spec.name, spec.args, spec.help);
                        self.say(NoticeKind::Info, &text);
                    }
                    None => self.overlay = Overlay::Help { scroll: 0 },
                }
                Vec::new()
            }
            Command::Join { room, password } => {
                let req = Request::Join {
                    room: room.clone(),
                    password,
                };
                vec![self.request(Pending::Join { room }, req)]
            }
            Command::Part { room } => {
                let Some(room) = room.or_else(|| self.current_room("/part without a room")) else {
                    return Vec::new();
                };
                let req = Request::Part { room: room.clone() };
                vec![self.request(Pending::Part { room }, req)]
            }
            Command::Create {
                room,
                private,
                password,
                e2ee,
            } => {
                let req = Request::CreateRoom {
                    room: room.clone(),
                    private,
                    password,
                };
                let mut action = self.request(Pending::Create { room }, req);
                if let Action::Request { plain, .. } = &mut action {
                    *plain = !e2ee;
                }
                vec![action]
            }
            Command::Invite { user, room } => {
                let Some(room) = room.or_else(|| self.current_room("/invite without a room"))
                else {
                    return Vec::new();
                };
                let done = format!("invited {user} to #{room}");
                vec![self.request(Pending::Done(done), Request::Invite { room, user })]
            }
            Command::Msg { to, text } => {
                let Some(to) = self.canonical_users(&to) else {
                    return Vec::new();
                };
                let (key, mut actions) = self.open_direct(to);
                actions.extend(self.send_to(key, Vec::new(), &text));
                actions
            }
            Command::Query { to } => {
                let Some(to) = self.canonical_users(&to) else {
                    return Vec::new();
                };
                self.open_direct(to).1
            }
            Command::Except { except, text } => {
                let Some(room) = self.current_room("/except") else {
                    return Vec::new();
                };
                self.send_to(ConvKey::Room(room), except, &text)
            }
            Command::Who { room } => {
                let req = Request::Who { room: room.clone() };
                vec![self.request(Pending::Who { room }, req)]
            }
            Command::Rooms => vec![self.request(Pending::Rooms, Request::Rooms)],
            Command::Devices { user } => {
                let user = user.unwrap_or_else(|| self.me().to_string());
                let req = Request::E2eeDevices { user: user.clone() };
                vec![self.request(Pending::Devices { user }, req)]
            }
            Command::History { count } => {
                let key = self.current_buffer().key.clone();
                if key == ConvKey::Status {
                    self.error("/history works in a conversation: switch to one first");
                    return Vec::new();
                }
                self.load_history(&key, count, true)
            }
            Command::Search { query } => {
                let req = Request::Search {
                    query: query.clone(),
                    room: None,
                    limit: SEARCH_LIMIT,
                    before: None,
                };
                vec![self.request(Pending::Search { query }, req)]
            }
            Command::Kick { user, reason } => {
                let room = self.current_buffer().key.room().map(str::to_string);
                let done = match &room {
                    Some(r) => format!("kicked {user} from #{r}"),
                    None => format!("closed {user}'s connections"),
                };
                let req = Request::Kick { room, user, reason };
                vec![self.request(Pending::Done(done), req)]
            }
            Command::VoteKick { user } => {
                let Some(room) = self.current_room("/votekick") else {
                    return Vec::new();
                };
                vec![self.request(Pending::VoteKick, Request::VoteKick { room, user })]
            }
            Command::Ban {
                target,
                duration_s,
                reason,
            } => {
                let (user, ip, who) = match target {
                    BanTarget::User(u) => (Some(u.clone()), None, u),
                    BanTarget::Ip(ip) => (None, Some(ip.clone()), ip),
                };
                let done = match duration_s {
                    Some(s) => format!("banned {who} for {s} s"),
                    None => format!("banned {who}"),
                };
                let req = Request::Ban {
                    user,
                    ip,
                    duration_s,
                    reason,
                };
                vec![self.request(Pending::Done(done), req)]
            }
            Command::Unban { target } => {
                let (user, ip, who) = match target {
                    BanTarget::User(u) => (Some(u.clone()), None, u),
                    BanTarget::Ip(ip) => (None, Some(ip.clone()), ip),
                };
                vec![self.request(
                    Pending::Done(format!("lifted the ban on {who}")),
                    Request::Unban { user, ip },
                )]
            }
            Command::Announce { text } => {
                vec![self.request(
                    Pending::Done("announced".into()),
                    Request::Announce { text },
                )]
            }
            Command::File { path } => {
                let target = self.current_buffer().key.clone();
                if target == ConvKey::Status {
                    self.error("/file offers to this conversation: switch to one first");
                    return Vec::new();
                }
                let tag = self.tag(Pending::File);
                vec![Action::SendFile {
                    tag,
                    path: PathBuf::from(path),
                    target,
                }]
            }
            Command::Accept { file_id, dir } => {
                let tag = self.tag(Pending::File);
                vec![Action::AcceptFile {
                    tag,
                    file_id,
                    dir: PathBuf::from(dir.unwrap_or_else(|| ".".into())),
                }]
            }
            Command::Decline { file_id } => {
                vec![self.request(
                    Pending::Decline {
                        file_id: file_id.clone(),
                    },
                    Request::FileDecline { file_id },
                )]
            }
            Command::Files => vec![self.request(Pending::Files, Request::Files)],
            Command::Cancel { file_id } => {
                let tag = self.tag(Pending::Cancel {
                    file_id: file_id.clone(),
                });
                vec![Action::CancelFile { tag, file_id }]
            }
            Command::Reply { text } => {
                let key = self.current_buffer().key.clone();
                if key == ConvKey::Status {
                    self.error("this is the status buffer: switch to a conversation first");
                    return Vec::new();
                }
                match self.target_message(thread::any, thread::others, "message from someone else")
                {
                    Ok(id) => {
                        self.buffers[self.current].selected = None;
                        self.send_full(
                            key,
                            Vec::new(),
                            &text,
                            conclave_client::proto::chat::TextKind::PLAIN,
                            Some(id),
                        )
                    }
                    Err(e) => {
                        self.error(&e);
                        Vec::new()
                    }
                }
            }
            Command::Thread => self.toggle_thread(),
            Command::Edit { text } => self.act_on(
                (thread::mine, thread::mine),
                "message of yours",
                conclave_client::proto::ActKind::Edit,
                &text,
            ),
            // A selected message of someone else's may go too (room owners and admins).
            Command::Delete => self.act_on(
                (thread::any, thread::mine),
                "message of yours",
                conclave_client::proto::ActKind::Delete,
                "",
            ),
            Command::React { emoji, on } => self.act_on(
                (thread::any, thread::any),
                "message",
                if on {
                    conclave_client::proto::ActKind::React
                } else {
                    conclave_client::proto::ActKind::Unreact
                },
                &emoji,
            ),
            Command::Approve { device } => {
                self.device_op(crate::devices::DeviceOp::Approve { device })
            }
            Command::Reject { device } => {
                self.device_op(crate::devices::DeviceOp::Reject { device })
            }
            Command::Backup { on } => self.device_op(crate::devices::DeviceOp::Backup { on }),
            Command::Restore { key } if key.is_empty() => self.ask_recovery_key(),
            Command::Restore { key } => self.device_op(crate::devices::DeviceOp::Restore { key }),
            Command::Members => {
                self.show_members = !self.show_members;
                Vec::new()
            }
            Command::Close => {
                let key = self.current_buffer().key.clone();
                match key {
                    ConvKey::Direct(_) => {
                        self.buffers.remove(self.current);
                        self.current = self.current.min(self.buffers.len() - 1);
                    }
                    ConvKey::Room(_) => {
                        self.error("/part leaves a room; /close is for direct conversations")
                    }
                    ConvKey::Status => self.error("the status buffer stays open"),
                }
                Vec::new()
            }
            Command::Quit => self.quit_now(),
            cmd @ (Command::Me { .. }
            | Command::Md { .. }
            | Command::Away { .. }
            | Command::Back
            | Command::Topic { .. }
            | Command::Name { .. }
            | Command::Mute(_)
            | Command::ReadReceipts(_)) => self.chat_command(cmd),
        }
    }

    // ---- what the server says ----

    fn client_event(&mut self, event: ClientEvent) -> Vec<Action> {
        match event {
            ClientEvent::Server(event) => self.server_event(event),
            ClientEvent::E2ee(n) => {
                self.e2ee_notice(n);
                Vec::new()
            }
            ClientEvent::Disconnected {
                reason,
                message,
                reconnecting,
            } => {
                if reason == DisconnectReason::Quit && self.quit {
                    return Vec::new();
                }
                let why = crate::text::sanitize(&message, false);
                if reconnecting {
                    self.conn = ConnState::Reconnecting {
                        since_ms: self.now_ms,
                        why: why.clone(),
                    };
                    let text = format!("connection lost ({why}); reconnecting…");
                    self.notice_in(&ConvKey::Status, NoticeKind::Error, &text);
                    if self.current != 0 {
                        self.say(NoticeKind::Error, &text);
                    }
                } else {
                    self.conn = ConnState::Closed { why: why.clone() };
                    let text = format!(
                        "disconnected for good ({}): {why}; /quit to leave",
                        reason.as_str()
                    );
                    self.notice_in(&ConvKey::Status, NoticeKind::Error, &text);
                    if self.current != 0 {
                        self.say(NoticeKind::Error, &text);
                    }
                }
                self.latency = None;
                Vec::new()
            }
            ClientEvent::Reconnected {
                missed,
                truncated,
                server,
            } => {
                self.conn = ConnState::Connected;
                // With several --server addresses the new connection may be to another one.
                let moved = match &mut self.session {
                    Some(s) if s.server != server => {
                        s.server = server.clone();
                        format!(" (now through {server})")
                    }
                    _ => String::new(),
                };
                let text = format!(
                    "reconnected{moved}; {missed} message(s) missed meanwhile are shown in their conversations{}",
                    if truncated {
                        " (more were missed: scroll up for the rest)"
                    } else {
                        ""
                    }
                );
                self.notice_in(&ConvKey::Status, NoticeKind::Info, &text);
                if self.current != 0 {
                    self.say(NoticeKind::Info, "reconnected");
                }
                // Presence may have changed meanwhile.
                let rooms: Vec<String> = self
                    .buffers
                    .iter()
                    .filter_map(|b| b.key.room().map(str::to_string))
                    .collect();
                let mut actions = vec![Action::Ping];
                for room in rooms {
                    actions.push(self.request(
                        Pending::Members { room: room.clone() },
                        Request::Who { room: Some(room) },
                    ));
                }
                actions
            }
        }
    }

    fn server_event(&mut self, event: Event) -> Vec<Action> {
        if let Some(file) = crate::files::file_event(&event, self.me()) {
            self.file_event(file);
            return Vec::new();
        }
        let me = self.me().to_string();
        match event {
            Event::E2eeWelcome { .. } => {}
            Event::Message(m) => {
                let key = ConvKey::from_conv(&m.conv, &me);
                self.known_users.insert(m.from.clone());
                self.thread_event(&key, &m);
                if m.extra.as_ref().is_some_and(|x| x.acts_on.is_some()) {
                    // An act changes the line it names (when loaded); it is no line itself.
                    if let Some(i) = self.buffers.iter().position(|b| b.key == key) {
                        let lines = self.lines.entry(key).or_default();
                        crate::acts::apply(&mut self.buffers[i], lines, &m);
                    }
                    return Vec::new();
                }
                let new = !self.buffers.iter().any(|b| b.key == key);
                let i = self.buffer_index(&key);
                let mut entry = self.entry_of(i, &m, &me);
                let mention = self.chat_mention(&m, &mut entry);
                let seen = self.current == i && self.buffers.get(i).is_some_and(|b| b.scroll == 0);
                self.push_entry(i, entry, true);
                if new && let Some(b) = self.buffers.get_mut(i) {
                    // What came before this message is history.
                    b.history = HistoryState::More;
                }
                return self.chat_message(i, &key, &m, mention, seen);
            }
            Event::Join { room, user } => {
                self.known_users.insert(user.clone());
                let key = ConvKey::Room(room.clone());
                if user == me || self.buffers.iter().any(|b| b.key == key) {
                    let i = self.buffer_index(&key);
                    self.buffers[i]
                        .members
                        .entry(user.clone())
                        .or_default()
                        .online = true;
                    self.notice_in(&key, NoticeKind::Join, &format!("{user} joined #{room}"));
                }
            }
            Event::Part { room, user } => {
                let key = ConvKey::Room(room.clone());
                if let Some(b) = self.buffers.iter_mut().find(|b| b.key == key) {
                    b.members.remove(&user);
                    self.notice_in(&key, NoticeKind::Part, &format!("{user} left #{room}"));
                }
            }
            Event::Presence { user, online } => {
                self.known_users.insert(user.clone());
                for b in &mut self.buffers {
                    if let Some(p) = b.members.get_mut(&user) {
                        p.online = online;
                    }
                }
            }
            Event::Invited { room, by } => {
                let text = format!("{by} invited you to #{room}: /join {room}");
                self.notice_in(&ConvKey::Status, NoticeKind::Info, &text);
                if self.current != 0 {
                    self.say(NoticeKind::Info, &text);
                }
            }
            Event::CaughtUp { count, truncated } => {
                if count > 0 || truncated {
                    let text = format!(
                        "{count} message(s) came while you were away{}",
                        if truncated {
                            " (and more: scroll up for the rest)"
                        } else {
                            ""
                        }
                    );
                    self.notice_in(&ConvKey::Status, NoticeKind::Info, &text);
                }
            }
            Event::Kicked {
                room,
                user,
                by,
                reason,
            } => {
                let reason = crate::text::sanitize(&reason, false);
                match room {
                    Some(room) => {
                        let key = ConvKey::Room(room.clone());
                        let text = if user == me {
                            format!("you were removed from #{room} by {by}: {reason}")
                        } else {
                            format!("{user} was removed from #{room} by {by}: {reason}")
                        };
                        if let Some(b) = self.buffers.iter_mut().find(|b| b.key == key) {
                            b.members.remove(&user);
                            if user == me {
                                b.members.clear();
                            }
                        }
                        self.notice_in(&key, NoticeKind::Kick, &text);
                        if user == me {
                            self.notice_in(&ConvKey::Status, NoticeKind::Kick, &text);
                        }
                    }
                    None => {
                        let text = format!("{user} was removed from the server by {by}: {reason}");
                        self.notice_in(&ConvKey::Status, NoticeKind::Kick, &text);
                    }
                }
            }
            Event::VoteKick {
                room,
                target,
                voter,
                votes,
                needed,
            } => {
                let text = format!("{voter} votes to remove {target} ({votes} of {needed})");
                self.notice_in(&ConvKey::Room(room), NoticeKind::Kick, &text);
            }
            Event::Announce { from, text, ts_ms } => {
                let text = format!(
                    "announcement from {from}: {}",
                    crate::text::sanitize(&text, true)
                );
                let entry = Entry::notice(ts_ms, NoticeKind::Announce, &text);
                self.push_entry(0, entry.clone(), true);
                if self.current != 0 {
                    let i = self.current;
                    self.push_entry(i, entry, false);
                }
            }
            // The library reports it as `ClientEvent::Disconnected`.
            Event::Disconnect { .. } => {}
            e @ (Event::Typing { .. }
            | Event::Read { .. }
            | Event::Topic { .. }
            | Event::Away { .. }
            | Event::DisplayName { .. }) => return self.chat_event(e),
            // Handled by `files::file_event` above.
            Event::FileOffer(_)
            | Event::FileReady { .. }
            | Event::FileRelayWanted { .. }
            | Event::FileDeclined { .. }
            | Event::FileCancelled { .. }
            | Event::FileReceived { .. } => {}
            // The end-to-end layer turns these into notices.
            Event::DeviceWaiting(_) | Event::TransferReady { .. } => {}
        }
        Vec::new()
    }

    fn file_event(&mut self, event: FileEvent) {
        match event {
            FileEvent::Offer {
                file_id,
                from,
                conv,
                name,
                size,
                sha256,
            } => {
                let text = format!(
                    "{from} offers the file {} ({}, sha256 {}…): /accept {file_id}",
                    crate::text::sanitize(&name, false),
                    view::human_bytes(size),
                    sha256.get(..16).unwrap_or(&sha256)
                );
                if self.offers.len() >= MAX_OFFERS {
                    self.offers.clear();
                }
                self.offers
                    .insert(file_id, crate::text::sanitize(&name, false));
                let i = self.buffer_index(&conv);
                let entry = Entry::notice(self.now_ms, NoticeKind::Info, &text);
                self.push_entry(i, entry, true);
            }
            FileEvent::Progress {
                file_id,
                name,
                sending,
                done,
                total,
            } => {
                let name = match self.offers.get(&file_id) {
                    Some(offered) if !sending => offered.clone(),
                    _ => crate::text::sanitize(&name, false),
                };
                if sending {
                    self.remember_sent(&file_id, &name);
                }
                let count = self.transfers.len();
                match self.transfers.iter_mut().find(|t| t.file_id == file_id) {
                    Some(t) => {
                        t.done = done;
                        t.total = total;
                    }
                    None if count < MAX_TRANSFERS => self.transfers.push(Transfer {
                        file_id,
                        name,
                        sending,
                        done,
                        total,
                    }),
                    None => {}
                }
            }
            FileEvent::Done {
                file_id,
                name,
                path,
            } => {
                self.transfers.retain(|t| t.file_id != file_id);
                let name = crate::text::sanitize(&name, false);
                let text = match path {
                    Some(p) => {
                        self.offers.remove(&file_id);
                        format!("received {name}: saved as {}", p.display())
                    }
                    None => {
                        self.remember_sent(&file_id, &name);
                        format!("sent {name}")
                    }
                };
                self.notice_in(&ConvKey::Status, NoticeKind::Info, &text);
            }
            FileEvent::Failed {
                file_id,
                name,
                message,
            } => {
                self.transfers.retain(|t| t.file_id != file_id);
                let text = format!(
                    "file {}: {}",
                    crate::text::sanitize(&name, false),
                    crate::text::sanitize(&message, false)
                );
                self.notice_in(&ConvKey::Status, NoticeKind::Error, &text);
            }
            FileEvent::Received {
                file_id,
                by,
                via_p2p,
            } => {
                let text = format!(
                    "{by} received your file {}{}",
                    self.sent_name(&file_id),
                    if via_p2p { " (directly)" } else { "" }
                );
                self.file_notice(&text);
            }
            FileEvent::Cancelled { file_id, by } => {
                let text = match self.offers.remove(&file_id) {
                    Some(name) => format!("{by} cancelled the file {name} ({file_id})"),
                    None => format!("{by} cancelled the file {file_id}"),
                };
                self.file_notice(&text);
            }
            FileEvent::Declined { file_id, by } => {
                let text = format!("{by} declined your file {}", self.sent_name(&file_id));
                self.file_notice(&text);
            }
            FileEvent::Notice { text } => {
                let text = crate::text::sanitize(&text, false);
                self.notice_in(&ConvKey::Status, NoticeKind::Info, &text);
                if self.current != 0 {
                    self.say(NoticeKind::Info, &text);
                }
            }
            FileEvent::Quiet => {}
        }
    }

    fn remember_sent(&mut self, file_id: &str, name: &str) {
        if self.sent.len() >= MAX_OFFERS && !self.sent.contains_key(file_id) {
            self.sent.clear();
        }
        self.sent
            .insert(file_id.to_string(), crate::text::sanitize(name, false));
    }

    /// "report.pdf (0193…)" for a file I sent, or its id when its name is not known here.
    fn sent_name(&self, file_id: &str) -> String {
        match self.sent.get(file_id) {
            Some(name) => format!("{name} ({file_id})"),
            None => file_id.to_string(),
        }
    }

    fn file_notice(&mut self, text: &str) {
        let text = crate::text::sanitize(text, false);
        self.notice_in(&ConvKey::Status, NoticeKind::Info, &text);
        if self.current != 0 {
            self.say(NoticeKind::Info, &text);
        }
    }

    fn reply(&mut self, tag: u64, result: Result<Reply, Failure>) -> Vec<Action> {
        let Some(pending) = self.pending.remove(&tag) else {
            return Vec::new();
        };
        match (pending, result) {
            (
                Pending::Send { key, local, reply },
                Ok(Reply::Sent {
                    msg_id, seq, ts_ms, ..
                }),
            ) => {
                if let Some(b) = self.buffers.iter_mut().find(|b| b.key == key) {
                    b.confirm_send(local, &msg_id, seq, ts_ms);
                    if let Some((reply_to, quote)) = reply
                        && let Some(e) = b.entries.iter().find(|e| e.msg_id() == Some(&msg_id))
                    {
                        // Later edits and reactions keep the quote in front.
                        let base = e.text.strip_prefix(quote.as_str()).unwrap_or(&e.text);
                        let line = crate::acts::LineState {
                            base: base.to_string(),
                            quote: Some(quote),
                            reply_to: Some(reply_to),
                            ..Default::default()
                        };
                        self.lines
                            .entry(key.clone())
                            .or_default()
                            .insert(msg_id.clone(), line);
                    }
                }
                self.thread_receipt(local, Some((&msg_id, seq, ts_ms)));
            }
            (Pending::Send { key, local, .. }, result) => {
                if let Some(b) = self.buffers.iter_mut().find(|b| b.key == key) {
                    b.fail_send(local);
                }
                self.thread_receipt(local, None);
                let why = match result {
                    Err(f) => f.message,
                    Ok(other) => format!("unexpected reply {other:?}"),
                };
                self.notice_in(&key, NoticeKind::Error, &format!("not sent: {why}"));
            }
            (Pending::Join { room } | Pending::Create { room }, Ok(reply)) => {
                let room = match &reply {
                    Reply::Joined { room, .. } => room.clone(),
                    _ => names::canonical_room(&room).unwrap_or(room),
                };
                let mut actions = self.open_room(&room);
                let i = self.buffer_index(&ConvKey::Room(room.clone()));
                if let Reply::Joined { members, .. } = reply {
                    for m in members {
                        self.buffers[i].members.entry(m).or_default();
                    }
                }
                self.switch_to(i);
                let kind = if self.e2ee.contains(&ConvKey::Room(room.clone())) {
                    "end-to-end encrypted: only its members' devices read it; messages from before you joined are not readable"
                } else {
                    "server-encrypted: the server can read and search it"
                };
                self.say(NoticeKind::Join, &format!("you are in #{room} ({kind})"));
                actions.push(Action::Ping);
                actions.push(self.request(Pending::RoomInfo, Request::Rooms));
                return actions;
            }
            (Pending::Part { room }, Ok(_)) => {
                let key = ConvKey::Room(names::canonical_room(&room).unwrap_or(room.clone()));
                if let Some(i) = self.buffers.iter().position(|b| b.key == key) {
                    self.buffers.remove(i);
                    if self.current >= i && self.current > 0 {
                        self.current -= 1;
                    }
                }
                self.say(NoticeKind::Part, &format!("you left #{room}"));
            }
            (Pending::Members { room }, Ok(Reply::Users(users))) => {
                let key = ConvKey::Room(room);
                if let Some(b) = self.buffers.iter_mut().find(|b| b.key == key) {
                    b.members = users
                        .iter()
                        .map(|u| {
                            (
                                u.user.clone(),
                                Presence {
                                    online: u.online,
                                    admin: u.admin,
                                },
                            )
                        })
                        .collect();
                }
                self.chat_users(&users);
                self.known_users.extend(users.into_iter().map(|u| u.user));
            }
            (Pending::Members { .. }, Err(_)) => {}
            (Pending::Who { room }, Ok(Reply::Users(users))) => {
                let list: Vec<String> = users
                    .iter()
                    .map(|u| {
                        let mut s = self.chat.shown_name(&u.user);
                        if let Some(d) = &u.display_name {
                            s = format!("{} ({})", crate::text::sanitize(d, false), u.user);
                        }
                        if u.admin {
                            s.push_str(" (admin)");
                        }
                        if let Some(away) = &u.away {
                            if away.is_empty() {
                                s.push_str(" (away)");
                            } else {
                                s.push_str(&format!(
                                    " (away: {})",
                                    crate::text::sanitize(away, false)
                                ));
                            }
                        }
                        if room.is_some() && !u.online {
                            s.push_str(" (offline)");
                        }
                        s
                    })
                    .collect();
                let text = match &room {
                    Some(r) => format!("members of #{r}: {}", list.join(", ")),
                    None => format!("online ({}): {}", users.len(), list.join(", ")),
                };
                self.known_users.extend(users.into_iter().map(|u| u.user));
                self.say(NoticeKind::Info, &text);
            }
            (Pending::Devices { user }, Ok(Reply::E2eeDevices(devices))) => {
                if devices.is_empty() {
                    let text = format!("{user} has no end-to-end device yet");
                    self.say(NoticeKind::Info, &text);
                }
                for d in &devices {
                    let text = format!(
                        "{user}/{}: safety number {}",
                        d.device,
                        conclave_client::e2ee::key_fingerprint(&d.signature_key)
                    );
                    self.say(NoticeKind::Info, &crate::text::sanitize(&text, false));
                }
            }
            (Pending::Rooms, Ok(Reply::Rooms(rooms))) => {
                if rooms.is_empty() {
                    self.say(NoticeKind::Info, "no rooms yet: /create one");
                }
                for r in &rooms {
                    let mut flags = Vec::new();
                    if r.member {
                        flags.push("joined");
                    }
                    if r.private {
                        flags.push("private");
                    }
                    if r.has_password {
                        flags.push("password");
                    }
                    flags.push(if r.e2ee {
                        "end-to-end"
                    } else {
                        "server-encrypted"
                    });
                    let text = format!(
                        "#{}: {} member(s), {} online{}{}",
                        r.room,
                        r.members,
                        r.online,
                        if flags.is_empty() {
                            String::new()
                        } else {
                            format!(" [{}]", flags.join(", "))
                        },
                        r.owner
                            .as_ref()
                            .map(|o| format!(", owner {o}"))
                            .unwrap_or_default()
                    );
                    self.say(NoticeKind::Info, &text);
                }
                self.known_rooms.extend(rooms.into_iter().map(|r| r.room));
            }
            (Pending::History { key, asked }, Ok(Reply::Messages(messages))) => {
                let me = self.me().to_string();
                let Some(i) = self.buffers.iter().position(|b| b.key == key) else {
                    return Vec::new();
                };
                let page: Vec<Entry> = messages
                    .iter()
                    .filter(|m| m.extra.as_ref().is_none_or(|x| x.acts_on.is_none()))
                    .map(|m| self.entry_of(i, m, &me))
                    .collect();
                let added = self.buffers[i].prepend_history(page);
                if asked {
                    let text = if self.buffers[i].history == HistoryState::Complete {
                        format!(
                            "loaded {added} older message(s); this is the beginning of the conversation"
                        )
                    } else {
                        format!("loaded {added} older message(s); scroll up to see them")
                    };
                    self.say(NoticeKind::Info, &text);
                }
                if let Some(seq) = self.buffers[i].jump_to {
                    if self.buffers[i].has_seq(seq) {
                        self.scroll_to_seq(i, seq);
                    } else if self.buffers[i].history == HistoryState::More
                        && self.jump_pages < MAX_JUMP_PAGES
                    {
                        self.jump_pages += 1;
                        return self.load_history(&key, MAX_HISTORY_PAGE, false);
                    } else {
                        self.buffers[i].jump_to = None;
                        self.say(
                            NoticeKind::Error,
                            "that message is too far back to show here",
                        );
                    }
                }
            }
            (Pending::History { key, .. }, Err(f)) => {
                if let Some(b) = self.buffers.iter_mut().find(|b| b.key == key) {
                    b.history = HistoryState::More;
                    b.jump_to = None;
                }
                self.notice_in(&key, NoticeKind::Error, &format!("history: {}", f.message));
            }
            (Pending::Search { query }, Ok(Reply::Results(results))) => {
                if results.is_empty() {
                    self.say(NoticeKind::Info, &format!("no messages contain {query:?}"));
                } else {
                    self.overlay = Overlay::Search {
                        query,
                        results,
                        selected: 0,
                    };
                }
            }
            (
                Pending::VoteKick,
                Ok(Reply::VoteCounted {
                    votes,
                    needed,
                    kicked,
                }),
            ) => {
                let text = if kicked {
                    format!("your vote counted ({votes} of {needed}): removed")
                } else {
                    format!("your vote counted ({votes} of {needed})")
                };
                self.say(NoticeKind::Info, &text);
            }
            (Pending::Decline { file_id }, Ok(_)) => {
                let text = match self.offers.remove(&file_id) {
                    Some(name) => format!("declined {name} ({file_id}); the sender is told"),
                    None => format!("declined the file {file_id}; the sender is told"),
                };
                self.say(NoticeKind::Info, &text);
            }
            (Pending::Files, Ok(Reply::Files(files))) => {
                if files.is_empty() {
                    self.say(NoticeKind::Info, "no files are waiting for you");
                }
                let me = self.me().to_string();
                for f in &files {
                    // An end-to-end file's real name came in its offer; the server only
                    // knows the ciphertext's.
                    let name = self
                        .offers
                        .get(&f.file_id)
                        .cloned()
                        .unwrap_or_else(|| crate::text::sanitize(&f.name, false));
                    let text = format!(
                        "{name} ({}) from {} in {}: /accept {} or /decline {}",
                        view::human_bytes(f.size),
                        f.from,
                        ConvKey::from_conv(&f.conv, &me).label(),
                        f.file_id,
                        f.file_id
                    );
                    self.say(NoticeKind::Info, &crate::text::sanitize(&text, false));
                    if self.offers.len() < MAX_OFFERS {
                        self.offers.entry(f.file_id.clone()).or_insert(name);
                    }
                }
            }
            (Pending::Done(what), Ok(_)) => self.say(NoticeKind::Info, &what),
            (Pending::Thread { key, root }, result) => return self.thread_page(key, root, result),
            (p @ (Pending::Quiet | Pending::ReadMarkers { .. } | Pending::RoomInfo), result) => {
                return self.chat_reply(p, result);
            }
            (_, Err(f)) => self.error(&for_chat(&f.message)),
            (_, Ok(other)) => {
                tracing::debug!(reply = ?std::mem::discriminant(&other), "unexpected reply");
                self.error("the server answered with an unexpected reply");
            }
        }
        Vec::new()
    }
}
