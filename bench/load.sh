#!/usr/bin/env bash
# Load: 200 concurrent clients for 60 s against one daemon (u2netp, --workers 2) on loopback,
# mixing process (URL, base64, multipart), batch submit and polls, quota, results, remove.bg's
# v1.0 calls, wrong keys, bad and oversize bodies; then the ledger audit. It is tests/load.rs at
# bench size (CI runs it at 40 clients for 15 s): it prints p50/p99 per operation, statuses,
# requests/s and the daemon's RSS over time, and fails on any 5xx, transport error, undocumented
# status or ledger mismatch. Stops by itself (60 s of load plus draining, start-up and audit).
#
# usage: bench/load.sh [CLIENTS [SECONDS]]     (defaults 200 and 60)
# env:   REMOVEBGD_MODEL_MIRROR  a folder with u2netp.onnx (e.g. ../shared/models) so the test
#                                does not fetch the model from the registries; needed offline
#        REMOVEBGD_LOAD_SEED     another mix of operations (default fixed)
# The test raises its own RLIMIT_NOFILE soft limit to the hard limit (the daemon inherits it);
# 200 clients need a few hundred descriptors on each side, so the hard limit (`ulimit -Hn`)
# must be at least a couple of thousand.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${REMOVEBGD_MODEL_MIRROR:-}" ]; then
    echo "note: REMOVEBGD_MODEL_MIRROR is not set; the models come from the registries (npm/pip)" >&2
fi
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt 2048 ]; then
    echo "the hard descriptor limit is $(ulimit -Hn); 200 clients need at least 2048" >&2
    exit 2
fi
# REMOVEBGD_LOAD_SETTLE: after the run, wait up to 40 s for the daemon to release the big blocks
# it keeps for reuse after a quiet spell (src/memory.rs), and report its idle RSS then.
REMOVEBGD_LOAD_CLIENTS=${1:-200} REMOVEBGD_LOAD_SECS=${2:-60} REMOVEBGD_LOAD_SETTLE=${REMOVEBGD_LOAD_SETTLE:-40} \
    cargo test --release --locked --test load -- --nocapture
