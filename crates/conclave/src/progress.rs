//! Progress bars (indicatif) on standard error for the file transfers of `conclave client`,
//! when standard error is a terminal. Standard output stays JSON only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use conclave_client::files::{FileProgress, ProgressFn};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Most bars kept (finished ones are dropped first).
const MAX_BARS: usize = 64;

/// A hook drawing one bar per transfer (file and direction, and peer for direct sends), with
/// rate and ETA.
pub fn bars() -> ProgressFn {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::new(HashMap::new());
    Arc::new(move |p: &FileProgress| {
        let key = format!(
            "{}/{}/{}",
            p.file_id,
            p.direction.as_str(),
            p.peer.as_deref().unwrap_or("")
        );
        let mut bars = bars.lock().unwrap_or_else(|e| e.into_inner());
        if bars.len() >= MAX_BARS {
            bars.retain(|_, b| !b.is_finished());
        }
        let bar = bars.entry(key).or_insert_with(|| {
            let b = multi.add(ProgressBar::new(p.total));
            b.set_style(style.clone());
            let short: String = p.file_id.chars().rev().take(6).collect::<String>();
            let short: String = short.chars().rev().collect();
            let who = p
                .peer
                .as_deref()
                .map(|u| format!(" {u}"))
                .unwrap_or_default();
            b.set_prefix(format!("{} …{short}{who}", p.direction.as_str()));
            b
        });
        bar.set_length(p.total);
        bar.set_position(p.bytes);
        if p.bytes >= p.total {
            bar.finish();
        }
    })
}
