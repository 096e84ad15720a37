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
args=(--workers 2)
if [ "$limit" != unset ]; then args+=(--memory-limit-mb "$limit"); fi
. bench/daemon.sh
start_daemon "${args[@]}"
printf '{"image_base64":"%s"}' "$(base64 -w0 "$image")" >"$tmp/body.json"

start=$(date +%s.%N)
clients=()
for i in $(seq "$n"); do
    curl -s -o "$tmp/out$i.json" -w "status %{http_code} after %{time_total} s\n" \
        -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
        --data-binary "@$tmp/body.json" "http://$addr/v1/removebg/process" &
    clients+=($!)
done
wait "${clients[@]}"
end=$(date +%s.%N)
grep '"memory bound"' "$tmp/daemon.log" || true
grep VmHWM "/proc/$pid/status"
python3 -c "import sys; print(f'wall {float(sys.argv[2]) - float(sys.argv[1]):.2f} s')" "$start" "$end"
