#!/usr/bin/env bash
# Inference speed against onnxruntime on a machine whose speed drifts: alternates `removebgd bench`
# and onnxruntime's ort_bench.py (same model file, image and threads) for several rounds, prints
# each round's medians and ratio, then the median of the per-round ratios.
#
# usage: bench/alternate.sh MODEL IMAGE [THREADS] [ROUNDS] [RUNS]
#   MODEL isnet | u2netp; THREADS default all cores; ROUNDS default 3; RUNS per side default 5
# needs: cargo, python3 with onnxruntime numpy pillow
set -euo pipefail
cd "$(dirname "$0")/.."
shared="$(cd .. && pwd)/shared"
model=${1:?model: isnet or u2netp}; image=${2:?image}; threads=${3:-$(nproc)}; rounds=${4:-3}; runs=${5:-5}
. bench/common.sh
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), model=$model threads=$threads rounds=$rounds runs=$runs"
ratios=()
for round in $(seq "$rounds"); do
    ours=$($bin bench "$image" --model "$model" --threads "$threads" --runs "$runs" 2>/dev/null | awk '/^inference/ {print $3}')
    theirs=$(python3 "$shared/tools/ort_bench.py" "models/$file" "$image" --threads "$threads" --runs "$runs" 2>&1 \
        | grep -o 'infer_median_ms=[0-9.]*' | cut -d= -f2)
    ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN {printf "%.2f", a / b}')
    ratios+=("$ratio")
    echo "round $round: removebgd ${ours} ms  onnxruntime ${theirs} ms  ratio ${ratio}x"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}')
echo "median ratio removebgd/onnxruntime = ${median}x"
