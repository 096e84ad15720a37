#!/usr/bin/env bash
# Throughput, latency and peak memory of the REST API (POST /v1/removebg/process) under 1, 2 and 8
# concurrent clients, for preview and full output, against a throwaway daemon on loopback.
#
# usage: bench/api.sh MODEL IMAGE [REQUESTS_PER_CLIENT]
#   MODEL   isnet | u2netp (or an .onnx path); fetched on first start like `removebgd serve`
#   IMAGE   any JPEG/PNG/WebP, sent base64 in the JSON body
#   REQUESTS_PER_CLIENT  default 4; each run sends clients x this many requests
# env: REMOVEBGD_BIN (default target/release/removebgd), and the daemon's own REMOVEBGD_MODELS_DIR,
#      REMOVEBGD_MODEL_MIRROR, REMOVEBGD_WORKERS, REMOVEBGD_THREADS
# needs: curl, ab (apt-get install apache2-utils)
#
# Columns: req/s from ab; p50/p90/max are nearest-rank over each request's total time (ab -g);
# non2xx/failed from ab (failed = connect, receive or length errors); rss_MiB = highest VmRSS seen
# while the run went on (sampled every 0.25 s); hwm = the daemon's VmHWM so far (peak RSS since start);
# cpu_d%/cpu_o% = share of the whole machine's CPU time (all cores = 100) used by the daemon / by
# everything else (ab, other processes) during the run: a high cpu_o% means the figures are disturbed.
set -euo pipefail
model=${1:?model: isnet or u2netp}
image=$(realpath "${2:?image}")
per_client=${3:-4}
bin=$(realpath "${REMOVEBGD_BIN:-$(dirname "$0")/../target/release/removebgd}")
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
pid=
sampler=
cleanup() {
    if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null || true; fi
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "# model: $model  image: $image ($(stat -c %s "$image") bytes)  requests/client: $per_client"
echo "# daemon: $bin ($("$bin" --version))  load: $(dpkg-query -W -f='apache2-utils ${Version}' apache2-utils 2>/dev/null || echo ab)"

# Rate limits raised so that the limiter never answers 429 in place of the engine.
. bench/daemon.sh
start_daemon --rate-limit 100000 --rate-burst 100000
url=http://$addr/v1/removebg/process

b64=$(base64 -w0 "$image")
for size in preview full; do
    printf '{"image_base64":"%s","output_size":"%s"}' "$b64" "$size" >"$tmp/body-$size.json"
done

# Warm-up (one per size), also a correctness check: each must answer 200.
for size in preview full; do
    code=$(curl -s -o "$tmp/warm.json" -w '%{http_code}' "$url" -H "Authorization: Bearer $key" \
        -H 'Content-Type: application/json' --data-binary "@$tmp/body-$size.json")
    [ "$code" = 200 ] || { echo "warm-up $size: HTTP $code: $(cat "$tmp/warm.json")" >&2; exit 1; }
    echo "# warm-up $size: 200 $(grep -o '"width":[0-9]*,"height":[0-9]*' "$tmp/warm.json")"
done

kib() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$pid/status"; }
# CPU jiffies: machine busy and total (/proc/stat), and the daemon's user+system (/proc/PID/stat).
jiffies() { awk '/^cpu / {printf "%d %d ", $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat
            awk '{print $14 + $15}' "/proc/$pid/stat"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
# Highest VmRSS seen, written to $tmp/rss; builtins only besides sleep, to stay off the CPU.
sample_rss() {
    local max=0 k v _
    while sleep 0.25; do
        while read -r k v _; do
            [ "$k" = VmRSS: ] && [ "$v" -gt "$max" ] && max=$v && echo "$max" >"$tmp/rss"
        done <"/proc/$pid/status"
    done
}

sent=2
printf '%-8s %7s %8s %7s %8s %8s %8s %6s %6s %8s %8s %6s %6s\n' size clients requests 'req/s' \
    'p50_ms' 'p90_ms' 'max_ms' non2xx failed 'rss_MiB' 'hwm_MiB' 'cpu_d%' 'cpu_o%'
for size in preview full; do
    for clients in 1 2 8; do
        n=$((clients * per_client))
        kib VmRSS >"$tmp/rss"
        read -r busy0 total0 daemon0 < <(jiffies)
        sample_rss &
        sampler=$!
        ab -q -k -c "$clients" -n "$n" -p "$tmp/body-$size.json" -T application/json \
            -H "Authorization: Bearer $key" -g "$tmp/ab.tsv" "$url" >"$tmp/ab.txt" 2>&1 ||
            { cat "$tmp/ab.txt" >&2; exit 1; }
        read -r busy1 total1 daemon1 < <(jiffies)
        kill "$sampler"; wait "$sampler" 2>/dev/null || true; sampler=
        sent=$((sent + n))
        rps=$(awk '/^Requests per second/ {print $4}' "$tmp/ab.txt")
        non2xx=$(awk '/^Non-2xx responses/ {print $3}' "$tmp/ab.txt")   # ab prints it only if > 0
        failed=$(awk '/^Failed requests/ {print $3}' "$tmp/ab.txt")
        # ab -g: one line per request after a header; column 5 (ttime) is the total time in ms.
        read -r p50 p90 max < <(tail -n +2 "$tmp/ab.tsv" | cut -f5 | sort -n | awk '
            { t[NR] = $1 }
            function rank(p,  i) { i = int(p * NR); if (i < p * NR) i++; return t[i < 1 ? 1 : i] }
            END { print rank(0.5), rank(0.9), t[NR] }')
        total=$((total1 - total0 > 0 ? total1 - total0 : 1))
        cpu_d=$((100 * (daemon1 - daemon0) / total))
        cpu_o=$((100 * (busy1 - busy0 - daemon1 + daemon0) / total))
        printf '%-8s %7d %8d %7.2f %8d %8d %8d %6d %6d %8s %8s %6d %6d\n' "$size" "$clients" "$n" \
            "$rps" "$p50" "$p90" "$max" "${non2xx:-0}" "$failed" "$(mib "$(cat "$tmp/rss")")" \
            "$(mib "$(kib VmHWM)")" "$cpu_d" "$cpu_o"
    done
done

# Every 200 charges one credit: credits used must equal the requests sent (warm-up included).
used=$(curl -s "http://$addr/v1/removebg/quota" -H "Authorization: Bearer $key" |
    sed -n 's/.*"credits_used":\([0-9]*\).*/\1/p')
echo "# requests sent: $sent  credits used: $used$([ "$used" = "$sent" ] || echo '  MISMATCH')"
echo "# daemon peak RSS (VmHWM): $(mib "$(kib VmHWM)") MiB  (VmRSS now: $(mib "$(kib VmRSS)") MiB)"
# Idle: the activation blocks kept for reuse go back to the kernel 20-25 s after the last inference.
sleep 30
echo "# daemon VmRSS after 30 s idle: $(mib "$(kib VmRSS)") MiB"
