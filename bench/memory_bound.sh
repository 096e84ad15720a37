#!/usr/bin/env bash
# Peak memory and wall time of N concurrent POST /v1/removebg/process requests of one image,
# against a throwaway daemon on loopback with --workers 2, with or without a memory limit.
#
# usage: bench/memory_bound.sh MODEL LIMIT_MB|unset IMAGE [N]
#   MODEL     isnet | u2netp (fetched on first start like `removebgd serve`)
#   LIMIT_MB  the daemon's --memory-limit-mb, or `unset` for its default
#   IMAGE     any JPEG/PNG/WebP up to 10 MB, sent base64 in the JSON body
#   N         concurrent requests, default 2
# env: REMOVEBGD_BIN (default target/release/removebgd), and the daemon's own
#      REMOVEBGD_MODELS_DIR, REMOVEBGD_MODEL_MIRROR
# Prints each answer's status and seconds, the daemon's `memory bound` log line, its VmHWM
# (peak RSS since start) and the wall time until every answer was in.
set -euo pipefail
model=${1:?model: isnet or u2netp}
limit=${2:?limit in MB, or unset}
image=$(realpath "${3:?image}")
n=${4:-2}
bin=$(realpath "${REMOVEBGD_BIN:-$(dirname "$0")/../target/release/removebgd}")
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
export REMOVEBGD_DATA_DIR=$tmp/data
mkdir -p "$REMOVEBGD_DATA_DIR"
"$bin" accounts create bench --credits 1000 >/dev/null 2>&1
key=$("$bin" keys create --account bench --scopes removebg:images:process 2>/dev/null | tail -1)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
args=(serve --listen "127.0.0.1:$port" --model "$model" --workers 2)
if [ "$limit" != unset ]; then args+=(--memory-limit-mb "$limit"); fi
"$bin" "${args[@]}" >"$tmp/log" 2>&1 &
pid=$!
for _ in $(seq 600); do
    if curl -sf "127.0.0.1:$port/healthz" >/dev/null; then break; fi
    sleep 0.1
done
python3 -c 'import base64, json, sys; print(json.dumps({"image_base64": base64.b64encode(open(sys.argv[1], "rb").read()).decode()}))' \
    "$image" >"$tmp/body.json"

start=$(date +%s.%N)
clients=()
for i in $(seq "$n"); do
    curl -s -o "$tmp/out$i.json" -w "status %{http_code} after %{time_total} s\n" \
        -H "X-Api-Key: $key" -H 'Content-Type: application/json' --data-binary "@$tmp/body.json" \
        "127.0.0.1:$port/v1/removebg/process" &
    clients+=($!)
done
wait "${clients[@]}"
end=$(date +%s.%N)
grep -o 'memory bound.*' "$tmp/log" || true
grep VmHWM "/proc/$pid/status"
python3 -c "import sys; print(f'wall {float(sys.argv[2]) - float(sys.argv[1]):.2f} s')" "$start" "$end"
