//! The words `conclave chat` uses for the account's devices and their history (issue 21).
//! Pure: no I/O.

use conclave_client::devices::DeviceNotice;

/// What `/approve`, `/reject`, `/backup` and `/restore` ask the shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOp {
    Approve { device: String },
    Reject { device: String },
    Backup { on: bool },
    Restore { key: String },
}

/// The notice for news about a device of the account.
pub fn notice_text(d: &DeviceNotice) -> String {
    match d {
        DeviceNotice::Waiting {
            device,
            safety_number,
            addr,
            ..
        } => format!(
            "a new device of yours asks for your history: {device} from {addr}, safety number {safety_number}. \
             Check that number on that device, then /approve {device} (it gets your end-to-end history) or /reject {device}"
        ),
        DeviceNotice::Decided { device, state } => format!("device {device}: {state}"),
        DeviceNotice::Received {
            conversations,
            messages,
            from,
            safety_number,
            approver_in_group,
        } => match safety_number {
            Some(n) => format!(
                "history received from your device {from} (safety number {n}{}): {messages} messages in {conversations} conversations",
                if *approver_in_group {
                    ", the key your conversations show for it"
                } else {
                    "; not seen in a conversation here: compare it on that device"
                }
            ),
            None => format!(
                "history restored from the {from}: {messages} messages in {conversations} conversations"
            ),
        },
        DeviceNotice::Progress {
            direction,
            device,
            done,
            total,
        } => format!("history {direction} ({device}): {done} of {total} messages"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_device_says_how_to_approve_and_reject_it() {
        let t = notice_text(&DeviceNotice::Waiting {
            device: "ab12".into(),
            safety_number: "0011 2233".into(),
            since_ms: 0,
            addr: "127.0.0.1".into(),
        });
        assert!(t.contains("/approve ab12") && t.contains("/reject ab12"));
        assert!(t.contains("0011 2233") && t.contains("127.0.0.1"));
    }
}
