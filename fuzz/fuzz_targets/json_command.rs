//! The JSON client's command parser: one stdin line from a script (or whatever a bot was fed).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let _ = conclave_client::json::command::parse(line);
});
