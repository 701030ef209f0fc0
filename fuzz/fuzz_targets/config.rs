//! The config file (`conclave.toml`): parsed over the defaults, validated, and turned into the
//! guard's rules and the retention rules, as a start or a reload does.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut config = conclave_server::Config::new("/nonexistent-fuzz-data");
    if config.apply_file(Path::new("conclave.toml"), text).is_err() {
        return;
    }
    if config.validate().is_err() {
        return;
    }
    let _ = config.security.rules(&[], &[]);
    let _ = config.retention.rule_for("r:general");
    let _ = config.retention.enabled();
    let _ = config.limits.handshake_timeout();
    let _ = config.limits.login_timeout();
    let _ = config.limits.idle_timeout();
    let _ = config.files.expiry_ms();
    let _ = conclave_server::files::chunk_size_for(config.limits.max_frame_bytes);
});
