# Sourced by the bench scripts: the model file for MODEL, a release build, the model installed.
# Sets `file` (the .onnx name under models/) and `bin`.
case "$model" in
    isnet) file=isnet-medium.onnx ;;
    u2netp) file=u2netp.onnx ;;
    *) echo "unknown model $model" >&2; exit 2 ;;
esac
cargo build --release --locked --quiet
bin=target/release/removebgd
$bin models fetch "$model" >/dev/null 2>&1 || true
