//! Fuzz target: bytes → stanzas (as inside a client XML stream) →
//! `stanza::parse_event` / `parse_items_reply` / `parse_authorize_reply` /
//! `parse_subscribe_reply` → `State`, checked against a reference model
//! after every stanza; then metrics and status page rendered. See
//! `fuzz/common/harness.rs`. Run with `scripts/fuzz.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/harness.rs"]
mod harness;

/// The exporter parses stanzas on tokio worker threads, whose stack is
/// 2 MiB: run each input on such a stack, so that deep recursion in a parser
/// shows as the crash it would be in the exporter.
const WORKER_STACK: usize = 2 * 1024 * 1024;

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    let run = std::thread::Builder::new()
        .stack_size(WORKER_STACK)
        .spawn(move || harness::run_one(&data))
        .expect("spawn a worker-sized thread");
    if let Err(panic) = run.join() {
        std::panic::resume_unwind(panic);
    }
});
