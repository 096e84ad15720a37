#!/usr/bin/env python3
"""Makes fuzz/seeds/image_header/ from the project's own test photos (tests/fixtures), small so
that each decode is quick: JPEG (baseline, progressive, gray, CMYK, EXIF orientations 1-8, a
restart-interval one), PNG (RGB, RGBA, gray, gray+alpha, 16-bit, palette with transparency,
interlaced, with an eXIf orientation) and WebP (lossy, lossless, lossy with alpha, with an EXIF
orientation). Needs Pillow with WebP. Run from the repository root."""
import os
import shutil
import struct
import zlib
from PIL import Image

FIX = "tests/fixtures"
OUT = "fuzz/seeds/image_header"


def small(path, size=(48, 36), box=None, mode=None):
    im = Image.open(path)
    im.load()
    if box:
        im = im.crop(box)
    im = im.resize(size, Image.LANCZOS) if im.mode not in ("P",) else im.resize(size)
    return im.convert(mode) if mode else im


def exif(orientation):
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def save(name, im, **kw):
    im.save(os.path.join(OUT, name), **kw)


def png_rgb(im, depth, interlace):
    """A plain RGB PNG (filter 0 on every row), 8 or 16 bits, Adam7-interlaced or not."""
    w, h = im.size
    px = im.load()

    def sample(v):
        return bytes([v]) if depth == 8 else bytes([v, v])  # 16-bit: v * 257

    def rows(x0, y0, dx, dy):
        out = b""
        for y in range(y0, h, dy):
            if x0 >= w:
                break
            out += b"\0" + b"".join(sample(c) for x in range(x0, w, dx) for c in px[x, y])
        return out

    if interlace:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        raw = b"".join(rows(*p) for p in passes)
    else:
        raw = rows(0, 0, 1, 1)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, 2, 0, 0, 1 if interlace else 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    chelsea = small(f"{FIX}/chelsea.jpg", (48, 32))
    rocket = small(f"{FIX}/images/rocket.jpg", (40, 27))
    astronaut = small(f"{FIX}/images/astronaut.png", (32, 32))
    logo = small(f"{FIX}/calibration/logo.png", (32, 32))  # RGBA
    moon = small(f"{FIX}/calibration/moon.png", (32, 32))  # L
    # JPEG
    save("chelsea.jpg", chelsea, quality=80)
    save("rocket-progressive.jpg", rocket, quality=75, progressive=True)
    save("rocket-420.jpg", rocket, quality=60, subsampling=2)
    save("moon-gray.jpg", moon, quality=80)
    save("chelsea-cmyk.jpg", small(f"{FIX}/chelsea-cmyk.jpg", (48, 32)), quality=80)
    save("chelsea-restart.jpg", chelsea, quality=80, restart_marker_blocks=1)
    for o in range(1, 9):
        save(f"chelsea-exif{o}.jpg", small(f"{FIX}/chelsea.jpg", (24, 16)), quality=70, exif=exif(o))
    # The real EXIF block of the fixture (orientation 6), on a smaller picture.
    real = Image.open(f"{FIX}/chelsea-exif6.jpg")
    save("chelsea-exif6-fixture.jpg", small(f"{FIX}/chelsea-exif6.jpg", (20, 30)), quality=70, exif=real.info["exif"])
    # PNG
    save("astronaut.png", astronaut, optimize=True)
    save("logo-rgba.png", logo, optimize=True)
    save("moon-gray.png", moon, optimize=True)
    save("logo-gray-alpha.png", logo.convert("LA"), optimize=True)
    save("moon-16bit.png", moon.convert("I;16"))
    save("logo-palette-trns.png", logo.convert("RGBA").quantize(16), transparency=0)
    # Pillow writes neither Adam7 nor 16-bit RGB: written by hand below.
    with open(os.path.join(OUT, "astronaut-interlaced.png"), "wb") as f:
        f.write(png_rgb(astronaut.convert("RGB"), depth=8, interlace=True))
    with open(os.path.join(OUT, "astronaut-16bit-rgb.png"), "wb") as f:
        f.write(png_rgb(small(f"{FIX}/images/astronaut.png", (16, 16)).convert("RGB"), depth=16, interlace=False))
    save("chelsea-exif6.png", chelsea, exif=exif(6))
    save("rocket-exif8.png", rocket, exif=exif(8))
    # WebP
    save("chelsea-lossy.webp", chelsea, quality=60)
    save("astronaut-lossless.webp", astronaut, lossless=True)
    save("logo-alpha-lossy.webp", logo, quality=60)
    save("logo-alpha-lossless.webp", logo, lossless=True)
    save("chelsea-exif6.webp", chelsea, quality=60, exif=exif(6))
    save("rocket-exif3-lossless.webp", rocket, lossless=True, exif=exif(3))


if __name__ == "__main__":
    main()
