#!/usr/bin/env bash
# A local cluster in one command: an exchange, a launcher and two workers as
# separate processes on loopback, with the example pipeline launched on them.
# Ctrl-C stops everything. Ports: exchange 50051, launcher 50052.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p academy-exchange -p academy-launcher -p academy-cli -p academy-examples
bin=target/release
export ACADEMY_EXCHANGE_URL=http://127.0.0.1:50051 ACADEMY_LAUNCHER_URL=http://127.0.0.1:50052
export RUST_LOG=${RUST_LOG:-warn}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

"$bin/academy-exchange" --listen 127.0.0.1:50051 & pids+=($!)
"$bin/academy-launcher" --listen 127.0.0.1:50052 --exchange "$ACADEMY_EXCHANGE_URL" & pids+=($!)
for i in 1 2; do
  "$bin/worker" --launcher "$ACADEMY_LAUNCHER_URL" --name "worker-$i" --capacity 8 --label "zone=z$i" & pids+=($!)
done
for _ in $(seq 100); do
  [ "$("$bin/academy" --json workers list 2>/dev/null | wc -l)" = 2 ] && break
  sleep 0.1
done

echo "== workers"; "$bin/academy" workers list
echo; echo "== the pipeline, launched on the workers"
"$bin/pipeline" --exchange "$ACADEMY_EXCHANGE_URL" --launcher "$ACADEMY_LAUNCHER_URL"
echo; echo "== agents"; "$bin/academy" agents list
cat <<HELP

The cluster runs until Ctrl-C. In another terminal:
  $bin/academy agents list          $bin/academy agents watch
  $bin/academy workers list         $bin/academy discover example.Analyser
  $bin/academy agents launch example.Crashy --config '{"fail_after_ms": 2000}' --retries 2
  kill -9 <a worker's pid: ${pids[2]} or ${pids[3]}>   (its agents move to the other worker)
HELP
wait
