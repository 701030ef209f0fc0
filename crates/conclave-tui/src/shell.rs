//! The I/O shell around [`App`]: reads the terminal (on a thread), the client's events and
//! the replies, feeds them to [`App::update`], carries out the [`Action`]s, and draws.
//!
//! Requests are submitted in the order the screen asked for them by one task (so `/join`
//! then a message reach the server in that order) without ever making the screen wait: a
//! reconnect that holds requests back does not freeze typing or scrolling.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use conclave_client::order::{CallOrder, is_conversation_request};
use conclave_client::proto::Request;
use conclave_client::{Client, ClientError, ConnectOptions, Events, Session, TrustError};
use ratatui::crossterm::event::{self, Event};
use tokio::sync::mpsc;

use crate::app::{Action, App, ConnectFailure, Failure, Input};
use crate::terminal::Term;
use crate::{ChatOptions, files, view};

/// Inputs waiting for the screen.
const INPUT_QUEUE: usize = 1024;
/// Requests waiting to be submitted.
const REQUEST_QUEUE: usize = 256;
/// Inputs handled before the screen is drawn again.
const MAX_INPUTS_PER_FRAME: usize = 256;
/// How often the terminal thread checks whether it should stop.
const TERMINAL_POLL: Duration = Duration::from_millis(100);
/// The clock tick (status bar, pings).
const TICK: Duration = Duration::from_secs(1);
/// How long quitting waits for the server to acknowledge.
const QUIT_TIMEOUT: Duration = Duration::from_secs(3);

enum Msg {
    Input(Input),
    Connected(Client, Events, Box<Session>),
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn failure(e: &ClientError) -> Failure {
    Failure {
        code: e.code().to_string(),
        message: e.to_string(),
    }
}

fn connect_failure(e: ClientError) -> ConnectFailure {
    match e {
        ClientError::Trust(TrustError::Unknown { seen, .. }) => {
            ConnectFailure::UnknownServer { fingerprint: seen }
        }
        ClientError::Trust(e @ TrustError::Mismatch { .. }) => ConnectFailure::Mismatch {
            text: e.to_string(),
        },
        ClientError::Server(body) => ConnectFailure::Refused {
            code: body.code.as_str().to_string(),
            message: body.message,
        },
        other => ConnectFailure::Other {
            message: other.to_string(),
        },
    }
}

/// Reads the terminal on a thread (crossterm's reads block) until `stop` is set or the
/// screen is gone.
fn spawn_terminal_reader(tx: mpsc::Sender<Msg>, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match event::poll(TERMINAL_POLL) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the terminal");
                    break;
                }
            }
            let input = match event::read() {
                Ok(Event::Key(key)) => Input::Key(key),
                Ok(Event::Mouse(mouse)) => Input::Mouse(mouse),
                Ok(Event::Paste(text)) => Input::Paste(text),
                Ok(Event::Resize(w, h)) => Input::Resize(w, h),
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the terminal");
                    break;
                }
            };
            if tx.blocking_send(Msg::Input(input)).is_err() {
                break;
            }
        }
    });
}

/// Submits requests in order, leaving each reply to a task of its own. The requests the
/// library handles for end-to-end encryption run in tasks that take turns, in the order
/// given; while any is under way, the other conversation requests take a turn too.
async fn submit_in_order(
    client: Client,
    mut requests: mpsc::Receiver<(u64, Request, bool)>,
    tx: mpsc::Sender<Msg>,
) {
    let mut order = CallOrder::default();
    while let Some((tag, req, plain)) = requests.recv().await {
        if is_conversation_request(&req) && (order.busy() || (!plain && client.handles_e2ee(&req)))
        {
            // End-to-end conversations: the library encrypts, adds to groups, reads locally.
            let (client, tx) = (client.clone(), tx.clone());
            let mut turn = order.turn();
            tokio::spawn(async move {
                turn.wait().await;
                let result = if plain {
                    client.request(req).await
                } else {
                    client.call(req).await
                };
                let result = result.map_err(|e| failure(&e));
                drop(turn);
                let _ = tx.send(Msg::Input(Input::Reply { tag, result })).await;
            });
            continue;
        }
        match client.submit(req).await {
            Ok(pending) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let result = pending.reply().await.map_err(|e| failure(&e));
                    let _ = tx.send(Msg::Input(Input::Reply { tag, result })).await;
                });
            }
            Err(e) => {
                let result = Err(failure(&e));
                if tx
                    .send(Msg::Input(Input::Reply { tag, result }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

/// Tells the screen which conversations this device reads end to end.
fn refresh_e2ee(app: &mut App, shell: &Shell) {
    if let Some(c) = &shell.client {
        let me = app.me().to_string();
        app.e2ee = c
            .e2ee_convs()
            .iter()
            .map(|conv| crate::buffer::ConvKey::from_conv(conv, &me))
            .collect();
    }
}

struct Shell {
    opts: ChatOptions,
    tx: mpsc::Sender<Msg>,
    client: Option<Client>,
    requests: Option<mpsc::Sender<(u64, Request, bool)>>,
}

impl Shell {
    fn execute(&mut self, action: Action) {
        match action {
            Action::Connect { trust, auth } => {
                let mut connect = ConnectOptions::new(self.opts.server.clone(), auth);
                connect.trust = trust;
                connect.state_dir = self.opts.state_dir.clone();
                let tx = self.tx.clone();
                let state_dir = self
                    .opts
                    .state_dir
                    .clone()
                    .or_else(conclave_client::trust::default_state_dir);
                let password = connect.auth.password().to_string();
                tokio::spawn(async move {
                    let msg = match Client::connect(connect).await {
                        Ok((client, events, session)) => match state_dir {
                            // End-to-end encryption: this device's keys in the state directory.
                            Some(dir) => match client.enable_e2ee(events, &dir, &password).await {
                                Ok(events) => Msg::Connected(client, events, Box::new(session)),
                                Err(e) => {
                                    client.close();
                                    Msg::Input(Input::ConnectFailed(connect_failure(e)))
                                }
                            },
                            None => Msg::Connected(client, events, Box::new(session)),
                        },
                        Err(e) => {
                            tracing::info!(error = %e, "could not connect");
                            Msg::Input(Input::ConnectFailed(connect_failure(e)))
                        }
                    };
                    let _ = tx.send(msg).await;
                });
            }
            Action::Request { tag, req, plain } => {
                let sent = self
                    .requests
                    .as_ref()
                    .map(|r| r.try_send((tag, req, plain)).is_ok())
                    .unwrap_or(false);
                if !sent {
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let result = Err(Failure {
                            code: "disconnected".into(),
                            message: "not connected, or too many requests waiting; try again"
                                .into(),
                        });
                        let _ = tx.send(Msg::Input(Input::Reply { tag, result })).await;
                    });
                }
            }
            Action::Ping => {
                if let Some(client) = self.client.clone() {
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let latency = client.ping().await.ok();
                        let _ = tx.send(Msg::Input(Input::Latency(latency))).await;
                    });
                }
            }
            Action::SendFile { tag, path, target } => {
                let client = self.client.clone();
                let tx = self.tx.clone();
                let report = self.file_report();
                tokio::spawn(async move {
                    let result = match client {
                        Some(c) => files::send_file(&c, &path, &target, report).await,
                        None => Err("not connected".to_string()),
                    };
                    let _ = tx
                        .send(Msg::Input(Input::FileStarted { tag, result }))
                        .await;
                });
            }
            Action::AcceptFile { tag, file_id, dir } => {
                let client = self.client.clone();
                let tx = self.tx.clone();
                let report = self.file_report();
                tokio::spawn(async move {
                    let result = match client {
                        Some(c) => files::accept_file(&c, &file_id, &dir, report).await,
                        None => Err("not connected".to_string()),
                    };
                    let _ = tx
                        .send(Msg::Input(Input::FileStarted { tag, result }))
                        .await;
                });
            }
            Action::CancelFile { tag, file_id } => {
                let client = self.client.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let result = match client {
                        Some(c) => files::cancel_file(&c, &file_id).await,
                        None => Err("not connected".to_string()),
                    };
                    let _ = tx
                        .send(Msg::Input(Input::FileStarted { tag, result }))
                        .await;
                });
            }
            Action::Device { tag, op } => {
                let client = self.client.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let result = match client {
                        Some(c) => device_op(&c, op).await,
                        None => Err("not connected".to_string()),
                    };
                    let _ = tx
                        .send(Msg::Input(Input::FileStarted { tag, result }))
                        .await;
                });
            }
            Action::RememberDirect(list) => {
                if let Some(path) = crate::direct_file(&self.opts)
                    && let Err(e) = crate::remember::save(&path, &list)
                {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remember the direct conversations");
                }
            }
            Action::RememberMuted(list) => {
                if let Some(path) =
                    crate::direct_file(&self.opts).map(|p| crate::remember::muted_path(&p))
                    && let Err(e) = crate::remember::save_muted(&path, &list)
                {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remember the muted conversations");
                }
            }
            // Handled by the loop (it needs to stop).
            Action::Quit => {}
            Action::Bell => {
                use std::io::Write;
                let mut out = std::io::stdout();
                let _ = out.write_all(b"\x07").and_then(|()| out.flush());
            }
            Action::SetTitle(title) => {
                // Made by the screen from names, but sanitized all the same: a title is
                // written inside an escape sequence.
                let title = crate::text::sanitize(&title, false);
                let _ = ratatui::crossterm::execute!(
                    std::io::stdout(),
                    ratatui::crossterm::terminal::SetTitle(title)
                );
            }
        }
    }

    /// Progress and completion of transfers, to the screen. A progress report that finds
    /// the queue full is dropped (another follows).
    fn file_report(&self) -> files::Report {
        let tx = self.tx.clone();
        std::sync::Arc::new(move |event| {
            let _ = tx.try_send(Msg::Input(Input::File(event)));
        })
    }

    fn connected(&mut self, client: Client, mut events: Events) {
        let (requests_tx, requests_rx) = mpsc::channel(REQUEST_QUEUE);
        tokio::spawn(submit_in_order(
            client.clone(),
            requests_rx,
            self.tx.clone(),
        ));
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if tx.send(Msg::Input(Input::Client(event))).await.is_err() {
                    break;
                }
            }
        });
        if let Some(key) = self.opts.recovery_key.take() {
            // `--recovery-key-env`: once, after the first sign-in. The tag is none of the
            // screen's, so the results show as notices.
            let (client, tx) = (client.clone(), self.tx.clone());
            tokio::spawn(async move {
                let say = |result| {
                    Msg::Input(Input::FileStarted {
                        tag: u64::MAX,
                        result,
                    })
                };
                let _ = tx
                    .send(say(Ok(
                        "restoring your history from the backup (--recovery-key-env)…".to_string(),
                    )))
                    .await;
                let result = device_op(&client, crate::devices::DeviceOp::Restore { key }).await;
                let _ = tx.send(say(result)).await;
            });
        }
        self.requests = Some(requests_tx);
        self.client = Some(client);
    }
}

/// Runs the screen until the user quits.
pub async fn run(opts: ChatOptions, terminal: &mut Term, mut app: App) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Msg>(INPUT_QUEUE);
    let stop = Arc::new(AtomicBool::new(false));
    spawn_terminal_reader(tx.clone(), stop.clone());
    let ticker = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                interval.tick().await;
                if tx.send(Msg::Input(Input::Tick)).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut shell = Shell {
        opts,
        tx,
        client: None,
        requests: None,
    };
    for action in app.start() {
        shell.execute(action);
    }
    let result = loop {
        app.now_ms = now_ms();
        app.next_attempt_ms = shell.client.as_ref().and_then(Client::next_attempt_ms);
        refresh_e2ee(&mut app, &shell);
        if let Err(e) = terminal.draw(|f| view::render(f, &app)) {
            break Err(e);
        }
        let Some(first) = rx.recv().await else {
            break Ok(());
        };
        let mut next = Some(first);
        let started = Instant::now();
        for _ in 0..MAX_INPUTS_PER_FRAME {
            let Some(msg) = next.take() else { break };
            app.now_ms = now_ms();
            let input = match msg {
                // A reply (a join, say) may follow the library's end-to-end work: the screen
                // decides with what it knows now.
                Msg::Input(input @ Input::Reply { .. }) => {
                    refresh_e2ee(&mut app, &shell);
                    input
                }
                Msg::Input(input) => input,
                Msg::Connected(client, events, session) => {
                    shell.connected(client, events);
                    Input::Connected(session)
                }
            };
            for action in app.update(input) {
                shell.execute(action);
            }
            if app.quit || started.elapsed() > TICK / 10 {
                break;
            }
            next = rx.try_recv().ok();
        }
        if app.quit {
            break Ok(());
        }
    };
    stop.store(true, Ordering::Relaxed);
    ticker.abort();
    if let Some(client) = shell.client.take() {
        if tokio::time::timeout(QUIT_TIMEOUT, client.quit())
            .await
            .is_err()
        {
            tracing::info!("the server did not acknowledge the quit in time");
        }
        client.close();
    }
    result
}

/// Runs `/approve`, `/reject`, `/backup`, `/restore`: the sentence to show.
async fn device_op(c: &Client, op: crate::devices::DeviceOp) -> Result<String, String> {
    use crate::devices::DeviceOp;
    match op {
        DeviceOp::Approve { device } => c
            .approve_device(&device, |_, _| {})
            .await
            .map(|r| {
                format!(
                    "approved {}: sent {} messages of {} conversations, sealed to it",
                    r.device, r.messages, r.conversations
                )
            })
            .map_err(|e| e.to_string()),
        DeviceOp::Reject { device } => c
            .reject_device(&device)
            .await
            .map(|()| {
                format!(
                    "removed {device} from your account: it gets no history, cannot sign in again, \
                     and leaves your end-to-end conversations (it reads nothing sent from now on)"
                )
            })
            .map_err(|e| e.to_string()),
        DeviceOp::Backup { on: true } => c
            .backup_enable()
            .await
            .map(|key| {
                format!(
                    "backup on. Your recovery key (shown once, write it down): {key}  \
                     With it, /restore (or --recovery-key-env) brings your history to a new device"
                )
            })
            .map_err(|e| e.to_string()),
        DeviceOp::Backup { on: false } => c
            .backup_disable()
            .await
            .map(|()| "backup off, and deleted from the server".to_string())
            .map_err(|e| e.to_string()),
        DeviceOp::Restore { key } => c
            .restore_backup(&key, |_| {})
            .await
            .map(|(convs, messages)| {
                format!("restored {messages} messages of {convs} conversations from the backup")
            })
            .map_err(|e| e.to_string()),
    }
}
