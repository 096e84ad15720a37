#!/usr/bin/env python3
"""rembg end to end on the same model file removebgd runs: encoded image in, RGBA PNG out.

usage: rembg_bench.py MODEL IMAGE... [--runs N]
  MODEL  isnet | u2netp; the file is found through U2NET_HOME (isnet-general-use.onnx, u2netp.onnx)
  One image: prints the median of N timed calls after one warm-up.
  Several images: one warm-up on the first, then the whole list once, timed (a batch).
Needs: pip install 'rembg[cpu]'. The session is made once, outside the timing.
"""
import argparse, os, resource, statistics, sys, time

p = argparse.ArgumentParser()
p.add_argument("model", choices=["isnet", "u2netp"])
p.add_argument("images", nargs="+")
p.add_argument("--runs", type=int, default=5)
a = p.parse_args()
if "U2NET_HOME" not in os.environ:
    sys.exit("set U2NET_HOME to a folder holding isnet-general-use.onnx and u2netp.onnx")
import rembg  # noqa: E402  (after the environment check: importing it is slow)

t = time.perf_counter()
session = rembg.new_session({"isnet": "isnet-general-use", "u2netp": "u2netp"}[a.model])
load_ms = (time.perf_counter() - t) * 1000
blobs = [open(f, "rb").read() for f in a.images]
rembg.remove(blobs[0], session=session)  # warm-up
if len(blobs) == 1:
    times = []
    for _ in range(a.runs):
        t = time.perf_counter()
        rembg.remove(blobs[0], session=session)
        times.append((time.perf_counter() - t) * 1000)
    print(f"rembg model={a.model} load_ms={load_ms:.0f} end_to_end_median_ms={statistics.median(times):.0f} "
          f"min_ms={min(times):.0f} runs={a.runs} peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}")
else:
    cpu0, t = time.process_time(), time.perf_counter()
    for b in blobs:
        rembg.remove(b, session=session)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
    print(f"rembg model={a.model} batch images={len(blobs)} wall_s={wall:.1f} images_per_min={len(blobs) * 60 / wall:.1f} "
          f"cpu_percent={100 * cpu / wall:.0f} peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}")
