#!/usr/bin/env bash
# The fleet scenario of issue 6, end to end on loopback, printing every figure of its targets.
#
#   scripts/bench-fleet.sh [--quick] [--no-bench] [driver options...]
#
# 1. Builds the release binary.
# 2. In process (cargo bench, the summary part of benches/hot_paths.rs): parse and apply rate,
#    scrape encode time, ingestion stall during scrapes, and the naive-way ratios.
# 3. scripts/bench-fleet.py: `onsip-ua-exporter simulate` (the simulator's XMPP face) and the
#    exporter binary logged into it over 127.0.0.1; latency at 10,000 events/s, idle memory,
#    100,000 addresses with 150,000 devices (/metrics p50/p99, gzip, memory), the highest
#    sustained event rate, and start-up with the state file that run leaves.
# --quick: a 10,000-address fleet and short loads (a smoke run, not the figures).
# Needs: cargo, python3 (3.11, standard library); promtool and prometheus if present are used
# to check the output (scripts/test.sh --setup installs them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bench=1
driver_args=()
for arg in "$@"; do
    case "$arg" in
        --no-bench) bench=0 ;;
        --quick) driver_args+=(--addresses 10000 --phones 15000 --scrapes 10 --rate-duration 5 --latency-duration 5) ;;
        *) driver_args+=("$arg") ;;
    esac
done

echo "== machine"
echo "nproc: $(nproc)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
echo "rustc: $(rustc --version)"
echo

echo "== build (release)"
cargo build --release --bin onsip-ua-exporter
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
binary="$target_dir/release/onsip-ua-exporter"

if [ "$bench" -eq 1 ]; then
    echo
    echo "== in process (benches/hot_paths.rs summary; full criterion runs: cargo bench --bench hot_paths)"
    # The filter matches no criterion bench: only the same-run summary runs.
    cargo bench --bench hot_paths -- summary-only 2>&1 | grep -v '^\s*$' | grep -v -e '^Gnuplot' -e '^Benchmarking'
fi

echo
echo "== end to end over loopback XMPP"
python3 scripts/bench-fleet.py --bin "$binary" "${driver_args[@]}"
