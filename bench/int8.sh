#!/usr/bin/env bash
# int8 inference against onnxruntime's static int8 model and against our own f32, on a machine
# whose speed drifts: alternates `removebgd bench --precision int8`, onnxruntime's ort_bench.py on
# the model ort_quantize.py makes (QDQ, s8 per-channel weights, u8 activations, MinMax) and
# `removebgd bench --precision f32` (same image and threads) for several rounds; prints each
# round's medians and ratios, then the median of the per-round ratios.
#
# usage: bench/int8.sh MODEL IMAGE [THREADS] [ROUNDS] [RUNS]
#   MODEL isnet | u2netp; THREADS default all cores; ROUNDS default 3; RUNS per side default 3
# needs: cargo, python3 with onnxruntime onnx numpy pillow; ../shared/tools (the reference tools)
set -euo pipefail
cd "$(dirname "$0")/.."
shared="$(cd .. && pwd)/shared"
model=${1:?model: isnet or u2netp}; image=${2:?image}; threads=${3:-$(nproc)}; rounds=${4:-3}; runs=${5:-3}
. bench/common.sh
# ort_bench.py picks the pipeline by the file name's start (isnet-*, u2netp*).
qdq="/tmp/${model}-removebgd-qdq.onnx"
if [ ! -s "$qdq" ]; then
    echo "# making onnxruntime's static int8 model: $qdq" >&2
    python3 "$shared/tools/ort_quantize.py" "models/$file" "$qdq" >&2
fi
echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), model=$model threads=$threads rounds=$rounds runs=$runs"
ours() { $bin bench "$image" --model "$model" --precision "$1" --threads "$threads" --runs "$runs" 2>/dev/null | awk '/^inference/ {print $3}'; }
median() { sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
peer=(); gain=()
for round in $(seq "$rounds"); do
    int8=$(ours int8)
    theirs=$(python3 "$shared/tools/ort_bench.py" "$qdq" "$image" --threads "$threads" --runs "$runs" 2>&1 \
        | grep -o 'infer_median_ms=[0-9.]*' | cut -d= -f2)
    f32=$(ours f32)
    p=$(awk -v a="$int8" -v b="$theirs" 'BEGIN {printf "%.2f", a / b}')
    g=$(awk -v a="$f32" -v b="$int8" 'BEGIN {printf "%.2f", a / b}')
    peer+=("$p"); gain+=("$g")
    echo "round $round: removebgd int8 ${int8} ms  onnxruntime int8 ${theirs} ms  removebgd f32 ${f32} ms  int8/onnxruntime ${p}x  f32/int8 ${g}x"
done
echo "median int8/onnxruntime = $(printf '%s\n' "${peer[@]}" | median)x (goal <= 1.0)"
echo "median f32/int8 = $(printf '%s\n' "${gain[@]}" | median)x (goal >= 3)"
