#!/usr/bin/env bash
# Fuzzes the render stage (YAML/JSON decoding, List expansion, object checks) for a
# bounded time: `agent/fuzz/run.sh [SECONDS]` (default 300). Needs the nightly
# toolchain; installs cargo-fuzz if missing. Fails on any panic, on an input that takes
# over 10 s, or on one that needs over 1 GiB. New inputs that reach new code land in
# corpus/render/; the seeds there are the YAML parity cases of tests/data/yaml-parity/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-300}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p corpus/render
if [ -z "$(ls -A corpus/render)" ]; then
    for case in ../../tests/data/yaml-parity/*.yaml; do cp "$case" corpus/render/; done
fi
cargo +nightly fuzz run render corpus/render -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -max_len=65536 -print_final_stats=1
# Keep the corpus small: only inputs that add coverage.
cargo +nightly fuzz cmin render corpus/render
