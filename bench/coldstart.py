#!/usr/bin/env python3
"""Cold start: time from starting `removebgd serve` to its systemd READY=1 (model loaded and
optimised, database open and migrated, port bound), with the model already on disk.

usage: bench/coldstart.py MODEL [RUNS]     (MODEL: isnet | u2netp; default 5 runs)
env: REMOVEBGD_BIN (default target/release/removebgd) and the daemon's own REMOVEBGD_MODELS_DIR /
     REMOVEBGD_MODEL_MIRROR. Each run uses a fresh data directory, so it includes creating the
     database. Prints each run and the median.
"""
import os, signal, socket, statistics, subprocess, sys, tempfile, time

model = sys.argv[1] if len(sys.argv) > 1 else "isnet"
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
binary = os.environ.get("REMOVEBGD_BIN", os.path.join(root, "target/release/removebgd"))
# Make sure the model is on disk first (a first start would otherwise time the download).
subprocess.run([binary, "models", "fetch", model], check=True, capture_output=True)

times = []
for i in range(runs):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(60)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        start = time.perf_counter()
        proc = subprocess.Popen(
            [binary, "serve", "--listen", "127.0.0.1:0", "--model", model, "--data-dir", os.path.join(tmp, "data")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                msg = sock.recv(4096).decode()
                if "READY=1" in msg.split("\n"):
                    break
            elapsed = (time.perf_counter() - start) * 1000
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            sock.close()
        times.append(elapsed)
        print(f"run {i + 1}: {elapsed:.0f} ms to READY=1")
print(f"cold start model={model} median_ms={statistics.median(times):.0f} min_ms={min(times):.0f} runs={runs}")
