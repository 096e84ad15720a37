#!/usr/bin/env python3
"""Cutout quality against ground truth: alpha and foreground colour known by construction.

usage: bench/quality.py [--mp 1 12] [--variant NAME="CUT ARGS"]... [--peer] [--out DIR]
                        [--removebgd PATH] [--model isnet|u2netp]

No labelled matting set reaches us, so the subject is drawn: a body textured from a real
photo (the suit in testdata astronaut.png), with a crisp anti-aliased outline, a soft (blurred) stretch
of edge, small holes near the edge, ~200 hair-like strands drawn at twice the size and
reduced (so their alpha is fractional), and a semi-transparent veil. Its alpha A and colour
F are exact. It is composited onto 5 backgrounds (saturated green, saturated red, a
gradient, two busy photos), I = A*F + (1-A)*B, and each composite is cut by:

  * each --variant: `removebgd cut` with the given arguments (default: today's pipeline,
    `--refine off`, and the refinement, `--refine fast`), transparent PNG;
  * with --peer, rembg's alpha matting (rembg.bg.alpha_matting_cutout, pymatting's
    closed-form matting and foreground estimation, rembg's defaults 240/10/10) applied to
    the same model mask the `off` variant produced: rembg's `alpha_matting=True`.

In the edge band (ground-truth alpha strictly between 0 and 1, dilated by 1% of the long
side) it measures: alpha SAD (sum |a-A| / 1000), MSE, gradient error (sum of squared
differences of Gaussian-derivative magnitudes / 1000); the colour error ΔE2000 of the
recomposite onto white and onto a gradient (mean and 99th percentile); spill (mean ΔE onto
white for the green and red backgrounds); and background-swap stability (the mean over the
band of the standard deviation, across the 5 backgrounds, of alpha and of alpha-weighted F).
Prints one markdown table per size: medians over the backgrounds, and the time per cutout.

Needs: pip install numpy scipy pillow scikit-image rembg pymatting (the last two for --peer).
"""
import argparse, os, shlex, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import deltaE_ciede2000, rgb2lab

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("REMOVEBGD_SHARED", ROOT.parent / "shared"))
IMAGES = SHARED / "testdata" / "images"


def photo(name, size, box=None):
    """A testdata photo (or its `box`) scaled to cover `size` (w, h), centred, as float RGB 0..1."""
    im = Image.open(IMAGES / name).convert("RGB")
    if box:
        im = im.crop(box)
    w, h = size
    s = max(w / im.width, h / im.height)
    im = im.resize((max(w, round(im.width * s)), max(h, round(im.height * s))), Image.LANCZOS)
    l, t = (im.width - w) // 2, (im.height - h) // 2
    return np.asarray(im.crop((l, t, l + w, t + h)), dtype=np.float32) / 255


def subject(w, h, seed=7):
    """Ground truth (A, F) for a w x h canvas."""
    rng = np.random.default_rng(seed)
    u = min(w, h) / 1000  # one unit: a thousandth of the short side
    # Supersampled 2x for everything drawn, then reduced by box averaging.
    W, H = 2 * w, 2 * h
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    cx, cy = W * 0.5, H * 0.55
    # Body: a union of ellipses, with a wobbly outline.
    ang = np.arctan2(yy - cy, xx - cx)
    wob = 1 + 0.04 * np.sin(5 * ang) + 0.02 * np.sin(11 * ang + 1)
    r = np.hypot((xx - cx) / (0.30 * W), (yy - cy) / (0.36 * H)) / wob
    body = (r < 1).astype(np.float32)
    head = (np.hypot((xx - cx) / (0.14 * W), (yy - (cy - 0.40 * H)) / (0.16 * H)) < 1).astype(np.float32)
    body = np.maximum(body, head)
    # Holes near the edge.
    for _ in range(14):
        a = rng.uniform(0, 2 * np.pi)
        hr = rng.uniform(6, 14) * u * 2
        px, py = cx + np.cos(a) * 0.25 * W, cy + np.sin(a) * 0.30 * H
        body[np.hypot(xx - px, yy - py) < hr] = 0
    A2 = body
    # A soft stretch of edge: the right side blurred.
    soft = ndimage.gaussian_filter(body, sigma=10 * u * 2)
    right = np.clip((xx - cx - 0.15 * W) / (0.05 * W), 0, 1)
    A2 = A2 * (1 - right) + soft * right
    # Colour: the astronaut photo (its own colours, so F is natural) plus the veil and strands.
    # (The suit only: a photo with its own background inside the outline would not be one
    # subject to a segmentation model.)
    tex = photo("astronaut.png", (W, H), box=(60, 330, 460, 512))
    F2 = tex.copy()
    # Veil: semi-transparent (alpha 0.45), pale blue, on the upper left.
    veil = ((xx - (cx - 0.33 * W)) ** 2 / (0.12 * W) ** 2 + (yy - (cy - 0.25 * H)) ** 2 / (0.10 * H) ** 2 < 1)
    veil &= A2 < 0.5
    F2[veil] = [0.75, 0.85, 0.95]
    A2 = np.where(veil, 0.45, A2)
    # Strands: quadratic curves from the top and left outline, 1-3 units wide.
    strands = np.zeros((H, W), np.float32)
    colours = np.zeros((H, W, 3), np.float32)
    for _ in range(200):
        a = rng.uniform(-np.pi * 0.95, -np.pi * 0.35)
        x0, y0 = cx + np.cos(a) * 0.28 * W, cy + np.sin(a) * 0.34 * H
        ln = rng.uniform(40, 120) * u * 2
        bend = rng.uniform(-0.6, 0.6)
        x1, y1 = x0 + np.cos(a + bend) * ln * 0.5, y0 + np.sin(a + bend) * ln * 0.5
        x2, y2 = x0 + np.cos(a) * ln, y0 + np.sin(a) * ln
        width = rng.uniform(1.0, 3.0) * u * 2
        col = np.array([0.35, 0.22, 0.12]) * rng.uniform(0.6, 1.6)
        for t in np.linspace(0, 1, int(ln)):
            px = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * x1 + t * t * x2
            py = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * y1 + t * t * y2
            ix, iy = int(px), int(py)
            rr = int(width) + 2
            ys, xs = slice(max(iy - rr, 0), min(iy + rr + 1, H)), slice(max(ix - rr, 0), min(ix + rr + 1, W))
            d = np.hypot(xx[ys, xs] - px, yy[ys, xs] - py)
            cover = np.clip(width / 2 + 0.5 - d, 0, 1)
            new = cover > strands[ys, xs]
            strands[ys, xs] = np.where(new, cover, strands[ys, xs])
            colours[ys, xs][new] = np.clip(col, 0, 1)
    outside = strands * (1 - A2)
    F2 = (F2 * A2[..., None] + colours * outside[..., None]) / np.maximum(A2 + outside, 1e-6)[..., None]
    A2 = A2 + outside
    # Reduce 2x: alpha by box average, F alpha-weighted.
    def reduce(x):
        return x.reshape(h, 2, w, 2, *x.shape[2:]).mean(axis=(1, 3))
    A = reduce(A2)
    F = reduce(F2 * A2[..., None]) / np.maximum(A, 1e-6)[..., None]
    F = np.where(A[..., None] > 0, F, tex.reshape(h, 2, w, 2, 3).mean(axis=(1, 3)))
    return np.clip(A, 0, 1).astype(np.float32), np.clip(F, 0, 1).astype(np.float32)


def gradient(size, c0, c1):
    w, h = size
    t = (np.arange(w, dtype=np.float32) / max(w - 1, 1))[None, :, None]
    return np.broadcast_to(np.array(c0) * (1 - t) + np.array(c1) * t, (h, w, 3)).astype(np.float32)


def backgrounds(size):
    w, h = size
    flat = lambda c: np.broadcast_to(np.array(c, np.float32), (h, w, 3))
    return {
        "green": flat([0x20 / 255, 0xC0 / 255, 0x20 / 255]),
        "red": flat([0xD0 / 255, 0x20 / 255, 0x20 / 255]),
        "gradient": gradient(size, [0.95, 0.75, 0.2], [0.2, 0.3, 0.8]),
        "coffee": photo("coffee.png", size),
        "motorcycle": photo("motorcycle_left.png", size),
    }


def to_u8(x):
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def grad_mag(a):
    return np.hypot(ndimage.gaussian_filter(a, 1.4, order=(0, 1)), ndimage.gaussian_filter(a, 1.4, order=(1, 0)))


def delta_e(x, y, mask):
    return deltaE_ciede2000(rgb2lab(x[mask]), rgb2lab(y[mask]))


def metrics(A, F, a, f, band, size, hit):
    """`hit`: the band's pixels where the model's own mask is within 0.5 of the truth (the
    rest are its misses: parts of the subject it dropped or background it kept)."""
    d = a[band] - A[band]
    out = {
        "sad": np.abs(a - A)[band].sum() / 1000,
        "mse": float((d * d).mean()),
        "grad": ((grad_mag(a) - grad_mag(A))[band] ** 2).sum() / 1000,
    }
    white = np.ones_like(F)
    for name, B in [("white", white), ("gradient", gradient(size, [0.1, 0.6, 0.9], [0.95, 0.3, 0.5]))]:
        truth = A[..., None] * F + (1 - A[..., None]) * B
        got = a[..., None] * f + (1 - a[..., None]) * B
        e = delta_e(truth, got, band)
        out[f"de_{name}_mean"], out[f"de_{name}_p99"] = float(e.mean()), float(np.percentile(e, 99))
        if name == "white":
            e = delta_e(truth, got, hit)
            out["de_hit_mean"], out["de_hit_p99"] = float(e.mean()), float(np.percentile(e, 99))
    return out


def run_cut(binary, model_args, args, src, dst):
    cmd = [binary, "cut", str(src), "-o", str(dst), "--format", "png", *model_args, *shlex.split(args)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def read_cutout(path):
    x = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32) / 255
    return x[..., 3], x[..., :3]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mp", type=float, nargs="+", default=[1.0])
    p.add_argument("--variant", action="append", default=[])
    p.add_argument("--peer", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--removebgd", default=str(ROOT / "target" / "release" / "removebgd"))
    p.add_argument("--model", default="isnet")
    a = p.parse_args()
    variants = dict(v.split("=", 1) for v in a.variant) or {"today": "--refine off", "refine": "--refine fast"}
    model_args = ["--model", a.model]
    out = Path(a.out or tempfile.mkdtemp(prefix="quality-"))
    out.mkdir(parents=True, exist_ok=True)
    for mp in a.mp:
        w = int(round((mp * 1e6 * 4 / 3) ** 0.5))
        h = int(round(w * 3 / 4))
        t = time.perf_counter()
        A, F = subject(w, h)
        edge = (A > 0) & (A < 1)
        band = ndimage.binary_dilation(edge, iterations=max(1, round(0.01 * max(w, h))))
        print(f"\n## {w}x{h} ({w * h / 1e6:.1f} MP): band {band.mean() * 100:.1f}% of the image, "
              f"subject drawn in {time.perf_counter() - t:.1f} s", flush=True)
        rows = {}
        alphas = {}
        misses = []
        for bg_name, B in backgrounds((w, h)).items():
            I = A[..., None] * F + (1 - A[..., None]) * B
            src = out / f"{w}x{h}-{bg_name}.png"
            Image.fromarray(to_u8(I)).save(src)
            results = {}
            for name, args in variants.items():
                dst = out / f"{w}x{h}-{bg_name}-{name}.png"
                secs = run_cut(a.removebgd, model_args, args, src, dst)
                results[name] = (*read_cutout(dst), secs)
            # The model's own mask (the refinement's input, and the peer's).
            mask_path = out / f"{w}x{h}-{bg_name}-mask.png"
            run_cut(a.removebgd, model_args, "--refine off --mask-only", src, mask_path)
            if a.peer:
                from rembg.bg import alpha_matting_cutout
                img, mask = Image.open(src).convert("RGB"), Image.open(mask_path).convert("L")
                t = time.perf_counter()
                cut = alpha_matting_cutout(img, mask, 240, 10, 10)
                secs = time.perf_counter() - t
                cut.save(out / f"{w}x{h}-{bg_name}-rembg_am.png")
                x = np.asarray(cut.convert("RGBA"), dtype=np.float32) / 255
                results["rembg alpha matting (+ matting time only)"] = (x[..., 3], x[..., :3], secs)
            model = np.asarray(Image.open(mask_path).convert("L"), dtype=np.float32) / 255
            hit = band & (np.abs(model - A) <= 0.5)
            misses.append(1 - hit.sum() / band.sum())
            for name, (ah, fh, secs) in results.items():
                m = metrics(A, F, ah, fh, band, (w, h), hit)
                m["secs"] = secs
                rows.setdefault(name, {})[bg_name] = m
                alphas.setdefault(name, []).append((ah, fh))
                print(f"  {bg_name:<10} {name:<12} SAD {m['sad']:8.2f}  MSE {m['mse']:.5f}  "
                      f"dE white {m['de_white_mean']:.2f}/{m['de_white_p99']:.1f}  {secs:.2f} s", flush=True)
        print(f"\nthe model's misses (its mask off by more than 0.5): "
              f"{', '.join(f'{n} {m * 100:.1f}%' for n, m in zip(backgrounds((1, 1)), misses))} of the band")
        print("\n| variant | alpha SAD | alpha MSE | grad err | ΔE white mean / p99 | ΔE gradient mean / p99 "
              "| spill ΔE green / red | ΔE white outside the model's misses, mean / p99 "
              "| swap σ(alpha) | swap σ(F) | s per cutout |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, per_bg in rows.items():
            med = lambda k: float(np.median([m[k] for m in per_bg.values()]))
            stack_a = np.stack([x[0] for x in alphas[name]])
            stack_f = np.stack([x[0][..., None] * x[1] for x in alphas[name]])
            sa = float(stack_a.std(axis=0)[band].mean())
            sf = float(stack_f.std(axis=0)[band].mean())
            print(f"| {name} | {med('sad'):.2f} | {med('mse'):.5f} | {med('grad'):.2f} | "
                  f"{med('de_white_mean'):.2f} / {med('de_white_p99'):.1f} | "
                  f"{med('de_gradient_mean'):.2f} / {med('de_gradient_p99'):.1f} | "
                  f"{per_bg['green']['de_white_mean']:.2f} / {per_bg['red']['de_white_mean']:.2f} | "
                  f"{med('de_hit_mean'):.2f} / {med('de_hit_p99'):.1f} | "
                  f"{sa:.4f} | {sf:.4f} | {med('secs'):.2f} |", flush=True)
    print(f"\nfiles in {out}")


if __name__ == "__main__":
    sys.exit(main())
