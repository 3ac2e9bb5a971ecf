#!/usr/bin/env bash
# Runs the cargo-fuzz target `stanza` (fuzz/fuzz_targets/stanza.rs: bytes → stanzas →
# stanza::parse_event & co. → State, checked against a reference model) for a bounded time,
# then prints the executions and the corpus size.
#
# Usage: scripts/fuzz.sh [SECONDS]     default 60 (or $FUZZ_SECONDS)
#
# - Installs cargo-fuzz (from crates.io) when it is missing.
# - Only the stable toolchain is needed: cargo-fuzz passes nightly-only -Z flags
#   (-Zsanitizer=address, …), which stable rustc accepts with RUSTC_BOOTSTRAP=1. If the
#   AddressSanitizer build fails anyway, it falls back to `--sanitizer none` (libFuzzer's
#   coverage guidance still works; only ASan's memory checks are lost) and says so.
# - The fuzz project is its own workspace with its own target directory (fuzz/target): the
#   first build compiles the exporter's dependency tree with sanitizer flags (about 10 minutes
#   on 2 cores), later runs reuse it.
# - Inputs: fuzz/seeds/stanza/ (committed seeds: the seed document's stanzas and hostile
#   variants) and fuzz/corpus/stanza/ (the growing working corpus, not committed).
#   Dictionary: fuzz/stanza.dict.
# - A crash, a leak or a timeout fails the run (exit 1): the reproducer is written under
#   fuzz/artifacts/stanza/. Copy it to fuzz/regressions/stanza/ to have tests/hostile.rs
#   replay it forever (test `fuzz_seeds_and_regressions_replay`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_TO_RUN="${1:-${FUZZ_SECONDS:-60}}"
case "$SECONDS_TO_RUN" in
'' | *[!0-9]*) echo "scripts/fuzz.sh: SECONDS must be a whole number, got '$SECONDS_TO_RUN'" >&2; exit 2 ;;
esac

TARGET=stanza
FUZZ_DIR="$(pwd)/fuzz"
CORPUS="$FUZZ_DIR/corpus/$TARGET"
SEEDS="$FUZZ_DIR/seeds/$TARGET"
ARTIFACTS="$FUZZ_DIR/artifacts/$TARGET"
DICT="$FUZZ_DIR/$TARGET.dict"
LOG="$(mktemp -t fuzz-$TARGET.XXXXXX.log)"
mkdir -p "$CORPUS" "$ARTIFACTS"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
SANITIZER=address
echo "==> building fuzz target '$TARGET' (sanitizer: $SANITIZER)" >&2
if ! (cd "$FUZZ_DIR" && cargo fuzz build --sanitizer "$SANITIZER" "$TARGET"); then
    SANITIZER=none
    echo "==> the AddressSanitizer build failed; building without a sanitizer" >&2
    (cd "$FUZZ_DIR" && cargo fuzz build --sanitizer "$SANITIZER" "$TARGET")
fi

corpus_files_before=$(find "$CORPUS" -type f | wc -l)
echo "==> fuzzing '$TARGET' for ${SECONDS_TO_RUN}s (corpus: $corpus_files_before files + $(find "$SEEDS" -type f | wc -l) seeds)" >&2
status=0
(cd "$FUZZ_DIR" && cargo fuzz run --sanitizer "$SANITIZER" "$TARGET" "$CORPUS" "$SEEDS" -- \
    -dict="$DICT" \
    -max_total_time="$SECONDS_TO_RUN" \
    -max_len=65536 \
    -timeout=10 \
    -rss_limit_mb=2048 \
    -print_final_stats=1 \
    -artifact_prefix="$ARTIFACTS/") 2>&1 | tee "$LOG" | grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse)' || status=$?
# A failed pipeline reports grep's status when the fuzzer printed nothing else: take
# cargo fuzz's own verdict from the log instead.
if grep -q -E '^==[0-9]+== ?ERROR|^SUMMARY: |deadly signal|ERROR: libFuzzer' "$LOG"; then
    status=1
fi

executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG" | tail -1)
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$LOG" | tail -1)
peak_rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$LOG" | tail -1)
corpus_files=$(find "$CORPUS" -type f | wc -l)
corpus_kib=$(du -sk "$CORPUS" | cut -f1)
coverage=$(grep -E '^#[0-9]+' "$LOG" | tail -1 | sed -n 's/.*cov: \([0-9]*\).*ft: \([0-9]*\).*/\1 edges, \2 features/p')
echo
echo "fuzz $TARGET: sanitizer=$SANITIZER time=${SECONDS_TO_RUN}s executions=${executions:-?} exec/s=${rate:-?}" \
    "corpus=${corpus_files} files (${corpus_kib} KiB, $((corpus_files - corpus_files_before)) new)" \
    "coverage=${coverage:-?} peak_rss=${peak_rss:-?}MB"
if [ "$status" -ne 0 ]; then
    echo "fuzz $TARGET: FAILED — reproducer(s) in $ARTIFACTS:" >&2
    ls -1 "$ARTIFACTS" >&2 || true
    echo "replay: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $SANITIZER $TARGET $ARTIFACTS/<file>)" >&2
    echo "keep it: cp $ARTIFACTS/<file> fuzz/regressions/$TARGET/ (replayed by tests/hostile.rs)" >&2
    exit 1
fi
rm -f "$LOG"
