#!/usr/bin/env bash
# Side-by-side speed: removebgd vs onnxruntime (the runtime under rembg/imgly) on the same model
# file, image and thread count, in one sitting. Prints both medians and the ratios.
#
# usage: bench/compare.sh MODEL IMAGE [THREADS] [RUNS]
#   MODEL   isnet | u2netp (installed in ./models, or fetched; REMOVEBGD_MODEL_MIRROR is honoured)
#   IMAGE   any JPEG/PNG/WebP; `bench/compare.sh --make-12mp OUT.jpg` writes a 12 MP test JPEG
# needs: cargo, python3 with onnxruntime numpy pillow (pip install onnxruntime numpy pillow);
#        with rembg installed (pip install 'rembg[cpu]') and THREADS = all cores, rembg too
set -euo pipefail
cd "$(dirname "$0")/.."
shared="$(cd .. && pwd)/shared"

if [ "${1:-}" = "--make-12mp" ]; then
    # coffee.png upscaled to 4032x3024-class 12 MP, stored with EXIF orientation 6 like a phone photo
    python3 - tests/fixtures/images/coffee.png "$2" <<'PY'
import sys
from PIL import Image
im = Image.open(sys.argv[1]).convert('RGB').resize((4032, 2688), Image.LANCZOS)
ex = Image.Exif(); ex[0x0112] = 6
im.transpose(Image.Transpose.ROTATE_90).save(sys.argv[2], quality=92, exif=ex.tobytes())
PY
    exit 0
fi

model=${1:?model: isnet or u2netp}; image=${2:?image}; threads=${3:-$(nproc)}; runs=${4:-5}
. bench/common.sh
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), threads=$threads runs=$runs"
ours=$($bin bench "$image" --model "$model" --threads "$threads" --runs "$runs" 2>/dev/null)
echo "$ours"
theirs=$(python3 "$shared/tools/ort_bench.py" "models/$file" "$image" --threads "$threads" --runs "$runs" --end-to-end "$out/ort.png")
echo "$theirs"

ours_inf=$(echo "$ours" | awk '/^inference/ {print $3}')
ours_tot=$(echo "$ours" | awk '/^total/ {print $3}')
ort_inf=$(echo "$theirs" | grep -o 'infer_median_ms=[0-9.]*' | cut -d= -f2)
ort_tot=$(echo "$theirs" | grep -o 'end_to_end_median_ms=[0-9.]*' | cut -d= -f2)
awk -v a="$ours_inf" -v b="$ort_inf" -v c="$ours_tot" -v d="$ort_tot" 'BEGIN {
    printf "ratio inference  removebgd/onnxruntime = %.2fx (%.0f ms vs %.0f ms)\n", a / b, a, b
    printf "ratio end-to-end removebgd/onnxruntime = %.2fx (%.0f ms vs %.0f ms)\n", c / d, c, d
}'

# rembg, the tool a user would otherwise pick, on the same model file. It runs onnxruntime on
# every core, so it is only comparable when THREADS is the core count.
if [ "$threads" = "$(nproc)" ] && python3 -c 'import rembg' 2>/dev/null; then
    mkdir "$out/u2net_home"
    ln -s "$PWD/models/$file" "$out/u2net_home/$([ "$model" = isnet ] && echo isnet-general-use.onnx || echo u2netp.onnx)"
    peer=$(U2NET_HOME="$out/u2net_home" python3 bench/rembg_bench.py "$model" "$image" --runs "$runs")
    echo "$peer"
    peer_tot=$(echo "$peer" | grep -o 'end_to_end_median_ms=[0-9.]*' | cut -d= -f2)
    awk -v c="$ours_tot" -v d="$peer_tot" 'BEGIN {
        printf "ratio end-to-end removebgd/rembg       = %.2fx (%.0f ms vs %.0f ms)\n", c / d, c, d
    }'
else
    echo "# rembg skipped (needs THREADS = $(nproc) and: pip install 'rembg[cpu]')"
fi
