//! The supervisor: one task per session that owns its connections. It sends the periodic
//! acknowledgements, and when a connection ends decides whether that is final and, if not,
//! reconnects with back-off and logs in again with the cursors as `resume`.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conclave_proto::{DisconnectReason, ErrorCode};
use tokio::sync::mpsc;

use super::link::{Cause, Ended, Live, open};
use super::{ClientEvent, Core, login_frame};
use crate::error::ClientError;
use crate::handshake::is_trust_failure;
use crate::options::MIN_ACK_INTERVAL;

/// Whether a failed reconnect attempt means giving up (retrying will not help).
pub(super) fn attempt_is_final(e: &ClientError) -> bool {
    match e {
        ClientError::Server(body) => !matches!(
            body.code,
            ErrorCode::RateLimited | ErrorCode::ShuttingDown | ErrorCode::Internal
        ),
        ClientError::Trust(_)
        | ClientError::Version { .. }
        | ClientError::NotConclave { .. }
        | ClientError::BadAddress(_)
        | ClientError::TooLarge { .. }
        | ClientError::UnexpectedReply { .. }
        | ClientError::E2ee { .. } => true,
        ClientError::Tls { .. } => is_trust_failure(e),
        ClientError::Resolve { .. }
        | ClientError::Connect { .. }
        | ClientError::ConnectTimeout { .. }
        | ClientError::HandshakeTimeout { .. }
        | ClientError::Disconnected { .. }
        | ClientError::Timeout { .. }
        | ClientError::NotConnected { .. }
        | ClientError::Io { .. }
        | ClientError::NoServer { .. }
        | ClientError::File { .. } => false,
    }
}

/// A random number for the back-off's jitter: std's hash keys are random per `RandomState`.
pub(super) fn jitter() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Owns the session's connections: acknowledgements, drops, reconnects.
pub(super) async fn supervise(core: Arc<Core>, mut live: Live, events: mpsc::Sender<ClientEvent>) {
    let mut acks = tokio::time::interval(core.opts.ack_interval.max(MIN_ACK_INTERVAL));
    acks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ended = run_connection(&core, &mut live, &mut acks).await;
        let again = !ended.is_final()
            && !core.close.is_cancelled()
            && !core.lock().quitting
            && core.opts.reconnect.allows(0, Duration::ZERO);
        tracing::info!(
            reason = ended.reason.as_str(),
            message = %ended.message,
            reconnect = again,
            "connection ended"
        );
        core.connection_lost(live.generation, &ended, again);
        if !again {
            return core.finish(ended.reason, ended.message, events).await;
        }
        let notice = ClientEvent::Disconnected {
            reason: ended.reason,
            message: ended.message.clone(),
            reconnecting: true,
        };
        tokio::select! {
            _ = core.close.cancelled() => {
                let (reason, message) = closed_by_us();
                return core.finish(reason, message, events).await;
            }
            _ = events.send(notice) => {}
        }
        match reconnect(&core, &ended, &events).await {
            Ok(next) => {
                live = next;
                restore_away(&core);
            }
            Err((reason, message)) => return core.finish(reason, message, events).await,
        }
    }
}

/// Sets this session's away message again on the new connection (the server cleared it if
/// the account was offline meanwhile; setting the same text again changes nothing).
fn restore_away(core: &Arc<Core>) {
    let text = core.away.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(text) = text {
        let core = core.clone();
        tokio::spawn(async move {
            let req = conclave_proto::Request::Away { text: Some(text) };
            if let Err(e) = core.request(req).await {
                tracing::info!(error = %e, "could not set the away message again after a reconnect");
            }
        });
    }
}

pub(super) fn closed_by_us() -> (DisconnectReason, String) {
    (
        DisconnectReason::Quit,
        "the connection was closed by this client".to_string(),
    )
}

/// Waits for the connection to end, acknowledging meanwhile; closes it when the session is
/// closed.
pub(super) async fn run_connection(
    core: &Arc<Core>,
    live: &mut Live,
    acks: &mut tokio::time::Interval,
) -> Ended {
    let mut closing = false;
    loop {
        tokio::select! {
            ended = &mut live.reader => {
                return ended.unwrap_or_else(|e| Ended {
                    reason: DisconnectReason::Other,
                    message: format!("the connection's reader failed: {e}"),
                    cause: Cause::Broken,
                });
            }
            _ = core.close.cancelled(), if !closing => {
                closing = true;
                core.final_ack(&live.outbound);
                live.cancel.cancel();
            }
            _ = acks.tick() => core.spawn_ack(),
        }
    }
}

/// Tries to connect and log in again until it works, the policy gives up, or the session is
/// closed. Returns the new connection, or why the session ends.
pub(super) async fn reconnect(
    core: &Arc<Core>,
    dropped: &Ended,
    events: &mpsc::Sender<ClientEvent>,
) -> Result<Live, (DisconnectReason, String)> {
    let policy = &core.opts.reconnect;
    let started = Instant::now();
    let servers = &core.servers;
    let count = servers.len();
    // The address after the one that dropped comes first, then the rest in turn.
    let first = core.current_index() + 1;
    let mut last_errors: Vec<Option<String>> = vec![None; count];
    let mut attempt = 0u32;
    // Bounded by the policy: a number of attempts, and a time.
    while policy.allows(attempt, started.elapsed()) {
        let index = (first + attempt as usize) % count;
        let addr = servers.get(index);
        // The back-off grows with each round of the list, so moving to the next node is
        // quick while a whole cluster that is down is not hammered.
        let round = attempt / u32::try_from(count).unwrap_or(u32::MAX);
        let delay = policy.delay(round, jitter());
        core.set_next_attempt(Some(delay));
        tokio::select! {
            _ = core.close.cancelled() => {
                core.set_next_attempt(None);
                return Err(closed_by_us());
            }
            _ = tokio::time::sleep(delay) => {}
        }
        core.set_next_attempt(None);
        let resume = core.lock().cursors.resume();
        let id = core.next_id();
        let frame = login_frame(id, &core.opts, |r| core.opts.auth.to_login(r), &resume)
            .map_err(|e| (DisconnectReason::Other, e.to_string()))?;
        let result = tokio::select! {
            _ = core.close.cancelled() => return Err(closed_by_us()),
            result = open(servers, index, &core.opts, id, frame) => result,
        };
        match result {
            Ok(opened) => {
                tracing::info!(attempt, server = %addr, cursors = resume.len(), "reconnected");
                return Ok(core.go_live(opened, events.clone(), true).await);
            }
            Err(e) if attempt_is_final(&e) => {
                let through = if count > 1 {
                    format!(" through {addr}")
                } else {
                    String::new()
                };
                return Err((
                    DisconnectReason::Other,
                    format!("could not get back in{through} after the connection dropped: {e}"),
                ));
            }
            Err(e) => {
                tracing::info!(attempt, server = %addr, error = %e, "reconnect attempt failed");
                last_errors[index] = Some(crate::error::naming(addr, &e));
                attempt += 1;
            }
        }
    }
    let last: Vec<String> = last_errors.into_iter().flatten().collect();
    let last = match last.len() {
        0 => "(last error: none)".to_string(),
        1 => format!("(last error: {})", last.join("")),
        _ => format!("(last errors: {})", last.join("; ")),
    };
    Err((
        dropped.reason,
        format!(
            "{}; gave up reconnecting after {attempt} attempt(s) in {} s {last}",
            dropped.message,
            started.elapsed().as_secs()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use conclave_proto::ErrorBody;

    #[test]
    fn which_reconnect_failures_are_final() {
        let server = |code| ClientError::Server(ErrorBody::new(code, "x"));
        assert!(attempt_is_final(&server(ErrorCode::AuthFailed)));
        assert!(attempt_is_final(&server(ErrorCode::ServerPassword)));
        assert!(!attempt_is_final(&server(ErrorCode::ShuttingDown)));
        assert!(!attempt_is_final(&server(ErrorCode::RateLimited)));
        let refused = ClientError::Connect {
            server: "h:1".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert!(!attempt_is_final(&refused));
        assert!(attempt_is_final(&ClientError::Version {
            server_version: 9,
            client_version: 1
        }));
        let tls = |message: &str| ClientError::Tls {
            server: "h:1".into(),
            message: message.into(),
        };
        assert!(!attempt_is_final(&tls("the server closed the connection")));
        assert!(attempt_is_final(&tls(
            "the server's certificate was refused (x)"
        )));
    }

    #[test]
    fn jitter_varies() {
        let draws: std::collections::HashSet<u64> = (0..16).map(|_| jitter()).collect();
        assert!(draws.len() > 1);
    }
}
