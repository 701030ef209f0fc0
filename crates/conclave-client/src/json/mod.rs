//! `conclave client --json`: one JSON command per line on stdin, one JSON reply or event per
//! line on stdout, nothing else on stdout (diagnostics go to stderr). The schema is in
//! docs/json-client.md; [`command`] parses input and [`render`] shapes output.
//!
//! Four activities run at once and meet only through channels:
//! - the driver reads stdin and submits requests *in input order* (so a `join` followed by a
//!   `send` reaches the server in that order), then leaves each reply to a small task;
//! - those tasks await their reply and queue the reply line, so replies appear in the order
//!   the commands complete;
//! - the event forwarder queues event lines;
//! - the output writer is the only thing that touches stdout, so lines never interleave.
//!
//! All queues are bounded: a reader of stdout that stops reading eventually stops us reading
//! the connection, and the server then disconnects us as a slow consumer rather than either
//! side buffering without limit.

pub mod attention;
pub mod chat;
pub mod command;
pub mod render;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use conclave_proto::{DisconnectReason, Request};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::connection::{Client, ClientEvent, Events, Session};
use crate::error::ClientError;
use crate::options::ConnectOptions;
use crate::order::CallOrder;
use crate::trust::{PinOutcome, format_fingerprint};
use command::{Action, Command};

/// Default longest input line. Longer lines are refused with `bad_request` (and skipped)
/// without being held in memory.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1024 * 1024;
/// Default number of output lines queued for stdout.
pub const DEFAULT_OUTPUT_QUEUE_LINES: usize = 1024;
/// How long to wait, after the server acknowledged `quit`, for it to close the connection.
pub const QUIT_GRACE: Duration = Duration::from_secs(5);

/// Options of `conclave client --json`.
#[derive(Clone)]
pub struct JsonOptions {
    pub connect: ConnectOptions,
    pub max_line_bytes: usize,
    pub output_queue_lines: usize,
    /// Default transfer window in bytes (`--window`); `None`: the library's defaults.
    pub window: Option<u64>,
    /// Default QUIC congestion controller for direct transfers (`--congestion`).
    pub congestion: Option<String>,
    /// Also told about transfer progress (the command line draws progress bars with it on a
    /// terminal's standard error).
    pub progress_hook: Option<crate::files::ProgressFn>,
    /// Turn on end-to-end encryption (device state under the state directory).
    pub e2ee: bool,
    /// Restore end-to-end history from the backup under this recovery key after connecting
    /// (`--recovery-key-env`). Never printed.
    pub recovery_key: Option<String>,
}

impl std::fmt::Debug for JsonOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonOptions")
            .field("connect", &self.connect)
            .field("max_line_bytes", &self.max_line_bytes)
            .field("output_queue_lines", &self.output_queue_lines)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl JsonOptions {
    pub fn new(connect: ConnectOptions) -> Self {
        JsonOptions {
            connect,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            output_queue_lines: DEFAULT_OUTPUT_QUEUE_LINES,
            window: None,
            congestion: None,
            progress_hook: None,
            e2ee: true,
            recovery_key: None,
        }
    }
}

/// Why the connection ended, as the event forwarder saw it.
type Ended = Option<(DisconnectReason, String)>;

/// Runs the JSON client until `quit`, the end of `stdin`, or the final loss of the connection.
///
/// Returns `Ok` after a clean quit (the `quit` command or end of input), and an error when
/// the connection could not be made, when it was lost for good (after printing the
/// `disconnected` event: a final reason such as `kicked`, or reconnect attempts that ran out),
/// or when stdout could not be written. Drops the client recovers from are only printed.
pub async fn run(
    opts: JsonOptions,
    stdin: impl AsyncBufRead + Unpin,
    stdout: impl AsyncWrite + Unpin,
) -> Result<(), ClientError> {
    let request_slots = opts.connect.max_pending_requests.max(1);
    let state_dir = opts
        .connect
        .state_dir
        .clone()
        .or_else(crate::trust::default_state_dir);
    let password = opts.connect.auth.password().to_string();
    let e2ee_wanted = opts.e2ee;
    let (client, events, session) = Client::connect(opts.connect).await?;
    report_trust(&session, &client.server());
    // End-to-end encryption needs a state directory for the device's keys.
    let (events, e2ee) = match (e2ee_wanted, state_dir) {
        (true, Some(dir)) => (client.enable_e2ee(events, &dir, &password).await?, true),
        (true, None) => {
            eprintln!(
                "conclave: no state directory (set --state-dir or HOME): end-to-end encryption is off"
            );
            (events, false)
        }
        (false, _) => (events, false),
    };

    let (out, out_rx) = mpsc::channel::<String>(opts.output_queue_lines.max(1));
    // Nothing else can be queued yet, so the connected line is first.
    let _ = out
        .send(line(&render::connected(&session, client.servers())))
        .await;
    if let Some(key) = opts.recovery_key.as_deref() {
        restore(&client, key, &out).await?;
    }

    let output_failed = CancellationToken::new();
    let quitting = Arc::new(AtomicBool::new(false));
    let (ended_tx, ended_rx) = watch::channel::<Ended>(None);

    let driver = Driver {
        client,
        out: out.clone(),
        slots: Arc::new(Semaphore::new(request_slots)),
        slot_count: request_slots,
        quitting: quitting.clone(),
        ended: ended_rx,
        output_failed: output_failed.clone(),
        max_line_bytes: opts.max_line_bytes,
        window: opts.window,
        congestion: opts.congestion.clone(),
        progress_hook: opts.progress_hook.clone(),
        e2ee,
        order: CallOrder::default(),
        attention: attention::SharedAttention::default(),
    };
    let forwarder = forward_events(
        events,
        driver.client.clone_weak(),
        driver.attention.clone(),
        out,
        quitting,
        ended_tx,
    );
    let writer = write_output(stdout, out_rx, output_failed);
    let (outcome, (), written) = tokio::join!(driver.run(stdin), forwarder, writer);
    written?;
    outcome
}

async fn e2ee_request(client: &Client, req: Request) -> Result<Map<String, Value>, ClientError> {
    let reply = client.call(req).await?;
    match render::result(None, &Ok(reply)) {
        Value::Object(mut m) => {
            m.remove("ok");
            m.remove("id");
            Ok(m)
        }
        _ => Ok(Map::new()),
    }
}

/// Restores the backup of a recovery key before any command is read: `history_progress`
/// lines, then `history_received`; an error stops the client (a wrong key should not go
/// unnoticed).
async fn restore(
    client: &Client,
    key: &str,
    out: &mpsc::Sender<String>,
) -> Result<(), ClientError> {
    let progress_out = out.clone();
    let progress = move |done: u64| {
        let v = serde_json::json!({
            "event": "e2ee", "kind": "history_progress", "direction": "restore",
            "device": "backup", "messages": done,
        });
        let _ = progress_out.try_send(line(&v));
    };
    match client.restore_backup(key, progress).await {
        Ok((conversations, messages)) => {
            let v = serde_json::json!({
                "event": "e2ee", "kind": "history_received", "conversations": conversations,
                "messages": messages, "from": "backup",
            });
            let _ = out.send(line(&v)).await;
            Ok(())
        }
        // Nothing is written yet (the writer starts after this): the caller reports it.
        Err(e) => Err(e),
    }
}

fn line(value: &Value) -> String {
    // serde_json escapes control characters, so the text is a single line.
    let mut text = value.to_string();
    text.push('\n');
    text
}

/// `key`: the name the pin is kept under (the first `--server` address).
fn report_trust(session: &Session, key: &str) {
    let server = if session.server == key {
        key.to_string()
    } else {
        format!("{key} (connected through {})", session.server)
    };
    match &session.trust {
        PinOutcome::NewlyPinned { known_servers } => eprintln!(
            "conclave: {server} was not a known server; trusting its certificate on first use.\n\
             conclave:   fingerprint {}\n\
             conclave:   pinned in {}; every address of --server must present it from now on.",
            format_fingerprint(&session.fingerprint),
            known_servers.display()
        ),
        PinOutcome::Given {
            known_servers: Some(path),
            replaced: Some(old),
        } => eprintln!(
            "conclave: replaced the pinned fingerprint of {server} in {} (it was {})",
            path.display(),
            format_fingerprint(old)
        ),
        _ => {}
    }
}

/// Reads commands and submits them.
struct Driver {
    client: Client,
    out: mpsc::Sender<String>,
    /// One per request awaiting its reply; taking all of them waits for every reply.
    slots: Arc<Semaphore>,
    slot_count: usize,
    quitting: Arc<AtomicBool>,
    ended: watch::Receiver<Ended>,
    output_failed: CancellationToken,
    max_line_bytes: usize,
    /// Transfer window given on the command line (`--window`), for commands without one.
    window: Option<u64>,
    congestion: Option<String>,
    progress_hook: Option<crate::files::ProgressFn>,
    /// End-to-end encryption is on for this session.
    e2ee: bool,
    /// Requests the client library handles itself run one after another, in the order they
    /// were given: each waits for the one before (so a send is in the history asked for
    /// next, and messages keep their order).
    order: CallOrder,
    /// Unread messages and mentions (counted by the event forwarder).
    attention: attention::SharedAttention,
}

impl Driver {
    async fn run(mut self, mut stdin: impl AsyncBufRead + Unpin) -> Result<(), ClientError> {
        let mut buf = Vec::new();
        let result = loop {
            let next = tokio::select! {
                biased;
                _ = self.output_failed.cancelled() => {
                    // The writer reports its own error; just stop.
                    self.client.close();
                    break Ok(());
                }
                ended = self.ended.wait_for(Option::is_some) => {
                    let (reason, message) = ended
                        .ok()
                        .and_then(|e| e.clone())
                        .unwrap_or((DisconnectReason::Other, "the connection ended".into()));
                    break Err(ClientError::Disconnected { reason, message });
                }
                next = read_line(&mut stdin, &mut buf, self.max_line_bytes) => next,
            };
            match next {
                Err(e) => {
                    eprintln!("conclave: could not read standard input ({e}); quitting");
                    break self.quit(None).await;
                }
                Ok(None) => break self.quit(None).await,
                Ok(Some(LineRead::TooLong { bytes })) => {
                    let message = format!(
                        "the line is {bytes} bytes, over the limit of {} bytes; it was skipped",
                        self.max_line_bytes
                    );
                    self.emit(render::error(None, "bad_request", &message))
                        .await;
                }
                Ok(Some(LineRead::Line)) => {
                    if let Some(quit_id) = self.handle(&buf).await {
                        break self.quit(Some(quit_id)).await;
                    }
                }
            }
        };
        // Let the replies of commands still in flight be printed (they fail fast once the
        // connection is gone), then make sure the connection is closed.
        let _ = self.slots.acquire_many(self.slot_count as u32).await;
        self.client.close();
        result
    }

    /// Handles one line; returns `Some(id)` for `quit`.
    async fn handle(&mut self, raw: &[u8]) -> Option<Option<Value>> {
        let Ok(text) = std::str::from_utf8(raw) else {
            let reply = render::error(None, "bad_request", "the line is not valid UTF-8");
            self.emit(reply).await;
            return None;
        };
        if text.trim().is_empty() {
            return None;
        }
        let Command { id, action } = match command::parse(text) {
            Ok(command) => command,
            Err(bad) => {
                self.emit(render::error(bad.id, "bad_request", &bad.message))
                    .await;
                return None;
            }
        };
        let req = match action {
            Action::Quit => return Some(id),
            Action::SendFile {
                path,
                target,
                p2p,
                window,
                congestion,
            } => {
                let mut opts = self.file_options(p2p, window, congestion);
                let Ok(slot) = self.slots.clone().acquire_owned().await else {
                    return None;
                };
                let (client, out) = (self.client.clone(), self.out.clone());
                // Peer to peer, the sender serves for as long as recipients fetch (minutes):
                // the reply comes at the offer, with the file id (for cancel_file), and the
                // end is an event.
                let (offered_tx, mut offered_rx) = tokio::sync::mpsc::unbounded_channel();
                if p2p {
                    opts.on_offer = Some(Arc::new(move |file_id: &str| {
                        let _ = offered_tx.send(file_id.to_string());
                    }));
                }
                tokio::spawn(async move {
                    let send = client.send_file_any(&path, target, opts);
                    tokio::pin!(send);
                    let mut offered: Option<String> = None;
                    let result = loop {
                        tokio::select! {
                            r = &mut send => break r,
                            Some(file_id) = offered_rx.recv(), if offered.is_none() => {
                                let reply = render::ok_fields(id.clone(), render::file_offered(&file_id));
                                let _ = out.send(line(&reply)).await;
                                offered = Some(file_id);
                            }
                        }
                    };
                    let value = match (offered, result) {
                        (None, Ok(sent)) => render::ok_fields(id, render::file_sent(&sent)),
                        (None, Err(e)) => render::client_error(id, &e),
                        (Some(_), Ok(sent)) => render::file_sent_event(&sent),
                        (Some(file_id), Err(e)) => render::file_failed_event(&file_id, &e),
                    };
                    let _ = out.send(line(&value)).await;
                    drop(slot);
                });
                return None;
            }
            Action::CancelFile { file_id } => {
                let client = self.client.clone();
                self.spawn_call(id, async move {
                    client.cancel_file(&file_id).await?;
                    let mut m = Map::new();
                    m.insert("file_id".into(), file_id.into());
                    Ok(m)
                })
                .await;
                return None;
            }
            Action::CreateRoom {
                room,
                private,
                password,
                e2ee,
            } => {
                let client = self.client.clone();
                let e2ee = e2ee && self.e2ee;
                self.spawn_ordered(id, async move {
                    if e2ee {
                        client
                            .create_room_e2ee(&room, private, password.as_deref())
                            .await?;
                    } else {
                        client
                            .create_room(&room, private, password.as_deref())
                            .await?;
                    }
                    let mut m = Map::new();
                    m.insert("room".into(), room.into());
                    m.insert("e2ee".into(), e2ee.into());
                    Ok(m)
                })
                .await;
                return None;
            }
            Action::Act {
                msg_id,
                kind,
                content,
            } => {
                // In order with the sends around it (an edit right after its message).
                let client = self.client.clone();
                self.spawn_ordered(id, async move {
                    let r = client.act(&msg_id, kind, &content).await?;
                    let mut m = Map::new();
                    m.insert("msg_id".into(), msg_id.into());
                    m.insert("act_id".into(), r.msg_id.into());
                    m.insert("seq".into(), r.seq.into());
                    Ok(m)
                })
                .await;
                return None;
            }
            Action::ApproveDevice { device } => {
                let (client, out) = (self.client.clone(), self.out.clone());
                let to = device.clone();
                self.spawn_call(id, async move {
                    // Progress lines are dropped rather than waited for when output is behind.
                    let progress = move |done: u64, total: u64| {
                        let v = serde_json::json!({
                            "event": "e2ee", "kind": "history_progress", "direction": "send",
                            "device": to, "messages": done, "total": total,
                        });
                        let _ = out.try_send(line(&v));
                    };
                    let r = client.approve_device(&device, progress).await?;
                    let mut m = Map::new();
                    m.insert("device".into(), r.device.into());
                    m.insert("conversations".into(), r.conversations.into());
                    m.insert("messages".into(), r.messages.into());
                    m.insert("chunks".into(), r.chunks.into());
                    Ok(m)
                })
                .await;
                return None;
            }
            Action::RejectDevice { device } => {
                let client = self.client.clone();
                self.spawn_call(id, async move {
                    client.reject_device(&device).await?;
                    let mut m = Map::new();
                    m.insert("device".into(), device.into());
                    m.insert("state".into(), "removed".into());
                    Ok(m)
                })
                .await;
                return None;
            }
            Action::BackupEnable => {
                let client = self.client.clone();
                self.spawn_call(id, async move {
                    let key = client.backup_enable().await?;
                    let mut m = Map::new();
                    m.insert("recovery_key".into(), key.into());
                    m.insert(
                        "note".into(),
                        "shown once: write it down; with it, a new device restores your history (--recovery-key-env)".into(),
                    );
                    Ok(m)
                })
                .await;
                return None;
            }
            Action::BackupDisable => {
                let client = self.client.clone();
                self.spawn_call(id, async move {
                    client.backup_disable().await?;
                    Ok(Map::new())
                })
                .await;
                return None;
            }
            Action::Devices { user } => {
                let value = match self.devices(user).await {
                    Ok(m) => render::ok_fields(id, m),
                    Err(e) => render::client_error(id, &e),
                };
                self.emit(value).await;
                return None;
            }
            Action::AcceptFile {
                file_id,
                dir,
                window,
                congestion,
            } => {
                let opts = self.file_options(false, window, congestion);
                let Ok(slot) = self.slots.clone().acquire_owned().await else {
                    return None;
                };
                let (client, out) = (self.client.clone(), self.out.clone());
                tokio::spawn(async move {
                    let value = match client.accept_file(&file_id, &dir, opts).await {
                        Ok(got) => {
                            let mut done = render::file_received(&got);
                            done.insert("event".into(), "file_done".into());
                            done.insert("direction".into(), "download".into());
                            let _ = out.send(line(&Value::Object(done))).await;
                            render::ok_fields(id, render::file_received(&got))
                        }
                        Err(e) => render::client_error(id, &e),
                    };
                    let _ = out.send(line(&value)).await;
                    drop(slot);
                });
                return None;
            }
            // Everyday chat, part B: counted and muted here; a topic with `set_room`.
            Action::Unread => {
                let m = self.attention.unread(self.client.user());
                self.emit(render::ok_fields(id, m)).await;
                return None;
            }
            Action::Mute { conv, muted } => {
                self.attention.mute(&self.client, &conv, muted);
                self.emit(render::ok_fields(id, Map::new())).await;
                return None;
            }
            Action::SetRoom {
                room,
                votekick,
                topic,
            } => {
                let client = self.client.clone();
                self.spawn_call(id, async move {
                    client.set_topic(&room, &topic).await?;
                    if votekick.is_some() {
                        client.request(Request::SetRoom { room, votekick }).await?;
                    }
                    Ok(Map::new())
                })
                .await;
                return None;
            }
            Action::Request(Request::Read { ref conv, .. }) => {
                self.attention.read(&self.client, conv);
                let Action::Request(req) = action else {
                    return None;
                };
                req
            }
            // End-to-end conversations need the client's own handling; while such requests
            // are under way, the requests that touch conversations queue behind them.
            Action::Request(req)
                if self.e2ee
                    && crate::order::is_conversation_request(&req)
                    && (self.client.handles_e2ee(&req) || self.order.busy()) =>
            {
                let client = self.client.clone();
                self.spawn_ordered(id, async move { e2ee_request(&client, req).await })
                    .await;
                return None;
            }
            // `submit` gives a send without an idempotency key one.
            Action::Request(req) => req,
        };
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return None;
        };
        match self.client.submit(req).await {
            Err(e) => self.emit(render::client_error(id, &e)).await,
            Ok(pending) => {
                let out = self.out.clone();
                tokio::spawn(async move {
                    let result = pending.reply().await;
                    let _ = out.send(line(&render::result(id, &result))).await;
                    drop(slot);
                });
            }
        }
        None
    }

    /// Like [`Driver::spawn_call`], after every request handed to it before has finished.
    async fn spawn_ordered(
        &mut self,
        id: Option<Value>,
        call: impl std::future::Future<Output = Result<Map<String, Value>, ClientError>>
        + Send
        + 'static,
    ) {
        let mut turn = self.order.turn();
        self.spawn_call(id, async move {
            turn.wait().await;
            call.await
        })
        .await;
    }

    /// Runs a library call in its own task under a request slot; its reply is the result.
    async fn spawn_call(
        &self,
        id: Option<Value>,
        call: impl std::future::Future<Output = Result<Map<String, Value>, ClientError>>
        + Send
        + 'static,
    ) {
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return;
        };
        let out = self.out.clone();
        tokio::spawn(async move {
            let value = match call.await {
                Ok(m) => render::ok_fields(id, m),
                Err(e) => render::client_error(id, &e),
            };
            let _ = out.send(line(&value)).await;
            drop(slot);
        });
    }

    /// This device (no user), or a user's devices: ids and safety numbers, and whether this
    /// device has seen that key in a shared conversation.
    async fn devices(&self, user: Option<String>) -> Result<Map<String, Value>, ClientError> {
        let mut m = Map::new();
        let Some(user) = user else {
            let (device, fingerprint) =
                self.client
                    .device_fingerprint()
                    .ok_or_else(|| ClientError::E2ee {
                        message: "end-to-end encryption is off for this session".into(),
                    })?;
            m.insert("user".into(), self.client.user().into());
            m.insert("device".into(), device.into());
            m.insert("fingerprint".into(), fingerprint.into());
            return Ok(m);
        };
        let known = self.client.safety_numbers(&user).unwrap_or_default();
        let listed = match self
            .client
            .request(Request::E2eeDevices { user: user.clone() })
            .await?
        {
            conclave_proto::Reply::E2eeDevices(d) => d,
            other => return Err(crate::connection::unexpected("devices", &other)),
        };
        let devices: Vec<Value> = listed
            .iter()
            .map(|d| {
                let fp = conclave_e2ee::key_fingerprint(&d.signature_key);
                let seen = known.iter().any(|(id, f)| *id == d.device && *f == fp);
                serde_json::json!({"device": d.device, "fingerprint": fp, "seen": seen})
            })
            .collect();
        m.insert("user".into(), user.into());
        m.insert("devices".into(), devices.into());
        Ok(m)
    }

    /// Leaves cleanly. `id` is `Some` for the `quit` command (which gets a reply) and `None`
    /// at the end of input.
    async fn quit(&mut self, id: Option<Option<Value>>) -> Result<(), ClientError> {
        // Replies to earlier commands come before the quit.
        let all = self.slots.acquire_many(self.slot_count as u32).await;
        self.quitting.store(true, Ordering::SeqCst);
        let result = match self.client.quit().await {
            Ok(()) => Ok(conclave_proto::Reply::Ok),
            Err(e) => Err(e),
        };
        if let Some(id) = id {
            self.emit(render::result(id, &result)).await;
        }
        drop(all);
        result?;
        // The server closes the connection after acknowledging; give it a moment so the
        // events it sent before that are printed.
        let _ = tokio::time::timeout(QUIT_GRACE, self.ended.wait_for(Option::is_some)).await;
        Ok(())
    }

    /// Transfer options whose progress goes out as `file_progress` events (dropped rather
    /// than waited for when the output queue is full: a later one says more).
    fn file_options(
        &self,
        p2p: bool,
        window: Option<u64>,
        congestion: Option<String>,
    ) -> crate::files::FileOptions {
        let out = self.out.clone();
        let hook = self.progress_hook.clone();
        crate::files::FileOptions {
            p2p,
            window: window.or(self.window),
            congestion: congestion.or_else(|| self.congestion.clone()),
            progress: Some(Arc::new(move |p| {
                let _ = out.try_send(line(&render::file_progress(p)));
                if let Some(h) = &hook {
                    h(p);
                }
            })),
            ..Default::default()
        }
    }

    async fn emit(&self, value: Value) {
        // Fails only when the writer stopped, which `output_failed` reports.
        let _ = self.out.send(line(&value)).await;
    }
}

/// Prints events until the session ends, and says why it ended. A drop the client recovers
/// from is printed (`disconnected` with `"reconnecting":true`, later `reconnected`) but does not
/// end anything.
async fn forward_events(
    mut events: Events,
    client: crate::connection::WeakClient,
    attention: attention::SharedAttention,
    out: mpsc::Sender<String>,
    quitting: Arc<AtomicBool>,
    ended: watch::Sender<Ended>,
) {
    while let Some(event) = events.recv().await {
        if let ClientEvent::Disconnected {
            reason,
            message,
            reconnecting: false,
        } = &event
        {
            // The disconnect that answers our own quit is not news.
            let ours = *reason == DisconnectReason::Quit && quitting.load(Ordering::SeqCst);
            if !ours {
                let _ = out.send(line(&render::client_event(&event))).await;
            }
            ended.send_replace(Some((*reason, message.clone())));
        } else {
            let mut value = render::client_event(&event);
            // Which kind of conversation a message came in: end-to-end or server-encrypted.
            if let (ClientEvent::Server(conclave_proto::Event::Message(m)), Value::Object(map)) =
                (&event, &mut value)
            {
                let strong = client.upgrade();
                let e2ee = strong.as_ref().is_some_and(|c| c.is_e2ee(&m.conv));
                map.insert("e2ee".into(), e2ee.into());
                // Mentions are found here, after decryption (the server cannot see them).
                attention.annotate(strong.as_ref(), m, map).await;
            }
            let _ = out.send(line(&value)).await;
        }
    }
    ended.send_if_modified(|e| {
        if e.is_none() {
            *e = Some((DisconnectReason::Other, "the connection ended".into()));
            true
        } else {
            false
        }
    });
}

/// The only writer of stdout: whole lines, flushed whenever the queue runs empty.
async fn write_output(
    mut stdout: impl AsyncWrite + Unpin,
    mut lines: mpsc::Receiver<String>,
    failed: CancellationToken,
) -> Result<(), ClientError> {
    let mut result = Ok(());
    while let Some(text) = lines.recv().await {
        let write = async {
            stdout.write_all(text.as_bytes()).await?;
            if lines.is_empty() {
                stdout.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        };
        if let Err(source) = write.await {
            result = Err(source);
            break;
        }
    }
    if result.is_ok() {
        result = stdout.flush().await;
    }
    result.map_err(|source| {
        failed.cancel();
        ClientError::Io {
            what: "could not write to standard output".into(),
            source,
        }
    })
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A line (without its `\n` or `\r\n`) is in the buffer.
    Line,
    /// A line longer than the limit was read and thrown away.
    TooLong { bytes: usize },
}

/// Reads one line into `buf` without ever holding more than `max_bytes` of it. `None` at the
/// end of input.
async fn read_line(
    reader: &mut (impl AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
    max_bytes: usize,
) -> std::io::Result<Option<LineRead>> {
    buf.clear();
    let mut seen_any = false;
    let mut total = 0usize;
    let mut too_long = false;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            if !seen_any {
                return Ok(None);
            }
            break;
        }
        seen_any = true;
        let (used, content, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, &chunk[..i], true),
            None => (chunk.len(), chunk, false),
        };
        total += content.len();
        if !too_long {
            if buf.len() + content.len() > max_bytes {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(content);
            }
        }
        reader.consume(used);
        if done {
            break;
        }
    }
    if too_long {
        return Ok(Some(LineRead::TooLong { bytes: total }));
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Some(LineRead::Line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_line_splits_bounds_and_ends() {
        let input = b"one\r\n\ntoolongline\nlast".as_slice();
        // A small BufReader capacity exercises lines spanning several chunks.
        let mut reader = tokio::io::BufReader::with_capacity(3, input);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        while let Some(r) = read_line(&mut reader, &mut buf, 5).await.unwrap() {
            got.push((r, String::from_utf8(buf.clone()).unwrap()));
        }
        assert_eq!(
            got,
            vec![
                (LineRead::Line, "one".to_string()),
                (LineRead::Line, String::new()),
                (LineRead::TooLong { bytes: 11 }, String::new()),
                (LineRead::Line, "last".to_string()),
            ]
        );
    }

    #[tokio::test]
    async fn output_lines_are_whole_and_in_queue_order() {
        let (tx, rx) = mpsc::channel(4);
        let failed = CancellationToken::new();
        let mut sink = Vec::new();
        let writer = write_output(&mut sink, rx, failed.clone());
        let feeder = async move {
            for i in 0..10 {
                tx.send(line(&serde_json::json!({"n": i, "s": "a\nb"})))
                    .await
                    .unwrap();
            }
        };
        let (written, ()) = tokio::join!(writer, feeder);
        written.unwrap();
        let text = String::from_utf8(sink).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10);
        for (i, l) in lines.iter().enumerate() {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["n"], i);
            assert_eq!(v["s"], "a\nb");
        }
        assert!(!failed.is_cancelled());
    }
}
