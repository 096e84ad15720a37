#!/usr/bin/env bash
# What each output format costs: alternates `removebgd bench` over png, jpg, webp and zip for
# several rounds (the machine's speed drifts), and prints each format's median encode and total
# time and its file size.
#
# usage: bench/formats.sh IMAGE [MODEL] [ROUNDS] [RUNS]
#   IMAGE   e.g. a 12 MP JPEG from `bench/compare.sh --make-12mp OUT.jpg`
#   MODEL   isnet | u2netp (default u2netp: the format's cost does not depend on the model)
# needs: cargo
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?image}; model=${2:-u2netp}; rounds=${3:-3}; runs=${4:-3}
cargo build --release --quiet
bin=target/release/removebgd
formats=(png jpg webp zip)
declare -A encode total size
for round in $(seq "$rounds"); do
    for f in "${formats[@]}"; do
        out=$($bin bench "$image" --model "$model" --format "$f" --runs "$runs" 2>/dev/null)
        encode[$f]+="$(awk '/^encode/ {print $3}' <<<"$out") "
        total[$f]+="$(awk '/^total/ {print $3}' <<<"$out") "
        size[$f]=$(grep -o '[0-9]* bytes' <<<"$out" | cut -d' ' -f1)
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
echo "# $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $image; model=$model rounds=$rounds runs=$runs"
printf '%-5s %12s %12s %12s\n' format encode_ms total_ms bytes
for f in "${formats[@]}"; do
    printf '%-5s %12s %12s %12s\n' "$f" "$(median <<<"${encode[$f]}")" "$(median <<<"${total[$f]}")" "${size[$f]}"
done
