#!/usr/bin/env python3
"""Makes the request-side seed folders (everything but image_header) from what the project's own
tests, README, docs/clients.md and systemd/config.example.toml send or show, with small real
photos from fuzz/seeds/image_header (run make_image_seeds.py first). Run from the repository root."""
import base64
import json
import os
import shutil
import urllib.parse

S = "fuzz/seeds"
IMG = f"{S}/image_header"
JPG = open(f"{IMG}/chelsea.jpg", "rb").read()
PNG = open(f"{IMG}/moon-gray.png", "rb").read()
WEBP = open(f"{IMG}/logo-alpha-lossy.webp", "rb").read()
EXIF6 = open(f"{IMG}/chelsea-exif6.jpg", "rb").read()
B64 = base64.b64encode(JPG).decode()
LAN = "http://192.168.1.20"  # the README's example image server


def folder(name):
    path = f"{S}/{name}"
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def write(path, name, data):
    with open(f"{path}/{name}", "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def wrap(text, width):
    return "\n".join(text[i:i + width] for i in range(0, len(text), width))


def base64_seeds():
    p = folder("base64")
    write(p, "jpeg-standard.txt", B64)
    write(p, "jpeg-gnu-wrapped.txt", wrap(B64, 76) + "\n")  # `base64 product.jpg`
    write(p, "png-unpadded.txt", base64.b64encode(PNG).decode().rstrip("="))
    write(p, "webp-urlsafe.txt", base64.urlsafe_b64encode(WEBP).decode())
    write(p, "png-data-uri.txt", "data:image/png;base64," + base64.b64encode(PNG).decode())
    write(p, "exif6-pem-wrapped.txt", wrap(base64.b64encode(EXIF6).decode(), 64).replace("\n", "\r\n"))
    write(p, "not-base64.txt", "%%%")  # tests/api.rs
    write(p, "not-base64-2.txt", "!!!not base64")  # tests/removebg.rs
    write(p, "text.txt", base64.b64encode(b"just some text, not a picture").decode())
    # The second reading (first byte: how a client encodes the rest).
    write(p, "raw-jpeg-mode0.bin", b"\x00" + JPG)
    write(p, "raw-png-mode7.bin", b"\x07" + PNG)


def json_seeds():
    p = folder("json_request")
    url = f"{LAN}/product-photo.jpg"
    bodies = {
        "base64-png.json": {"image_base64": B64, "output_format": "png"},
        "base64-webp-preview-colour.json": {"image_base64": B64, "output_format": "webp", "output_size": "preview",
                                            "bg_color": "#00ff00", "return_base64": True},
        "url-full.json": {"image_url": url, "output_format": "png", "output_size": "full"},
        "empty.json": {},
        "ambiguous.json": {"image_url": "http://x/a.jpg", "image_base64": B64},
        "gif.json": {"image_base64": B64, "output_format": "gif"},
        "huge.json": {"image_base64": B64, "output_size": "huge"},
        "blue-ish.json": {"image_base64": B64, "bg_color": "blue-ish"},
        "bad-base64.json": {"image_base64": "%%%"},
        "crop-margin.json": {"image_url": url, "crop": True, "crop_margin": "12px"},
        "jpg-gradient.json": {"image_url": url, "output_format": "jpg", "bg_gradient": "90deg, #000000, #ffffff"},
        "bg-image-url.json": {"image_url": url, "bg_image_url": f"{LAN}/solid/0000ff.png"},
        "alpha.json": {"image_url": url, "channels": "alpha"},
        "short-gradient.json": {"image_url": url, "bg_gradient": "90deg, #fff"},
        "two-backgrounds.json": {"image_url": url, "bg_color": "#fff", "bg_gradient": "#fff, #000"},
        "rgb.json": {"image_url": url, "channels": "rgb"},
        "wide-margin.json": {"image_url": url, "crop": True, "crop_margin": "wide"},
        "file-url.json": {"image_url": url, "bg_image_url": "file:///etc/passwd"},
        "zip.json": {"image_url": url, "output_format": "zip"},
        "typo.json": {"bg_colour": "#fff"},
        "mqtt-extensions.json": {"image_base64": B64, "output_format": "jpg", "crop": True, "crop_margin": "8px",
                                 "bg_color": "white"},
    }
    for name, body in bodies.items():
        write(p, name, json.dumps(body))
    # `base64 product.jpg` pasted into JSON: raw line breaks (tests/api.rs, jobs::request's tests).
    write(p, "raw-line-breaks.json", '{"image_base64": "%s",\n "output_format": "png"}' % wrap(B64, 76))
    write(p, "data-uri.json", json.dumps({"image_base64": "data:image/jpeg;base64," + B64}))
    write(p, "truncated.json", '{"image_url": ')


def mqtt_seeds():
    p = folder("mqtt_submission")
    url = f"{LAN}/product-photo.jpg"
    bodies = {
        "preview.json": {"image_base64": B64, "output_size": "preview"},
        "ref.json": {"image_base64": B64, "output_size": "preview", "ref": "shot-1"},
        "bad-format-ref.json": {"image_url": "http://10.0.0.1/a.jpg", "output_format": "gif", "ref": "shot-2"},
        "extensions.json": {"image_base64": B64, "output_format": "jpg", "crop": True, "crop_margin": "8px",
                            "bg_color": "white", "ref": "ext-1"},
        "slash-ref.json": {"image_url": url, "ref": "a/b"},
        "url-gradient.json": {"image_url": url, "bg_gradient": "#ff0000, #0000ff", "crop": True, "crop_margin": "5px",
                              "output_format": "jpg", "ref": "job-7"},
    }
    for name, body in bodies.items():
        write(p, name, json.dumps(body))


def multipart_body(boundary, parts):
    out = b""
    for name, value, filename in parts:
        out += f"--{boundary}\r\n".encode()
        if filename is None:
            out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
        else:
            out += (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    "Content-Type: image/jpeg\r\n\r\n").encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def multipart_seeds():
    p = folder("multipart")
    # tests/api.rs (process), tests/removebg.rs (remove.bg's clients), tests/rembg.rs (curl -F).
    cases = {
        "process.bin": ("XbOuNdArY", [("output_size", b"preview", None), ("image_file", JPG, "c.jpg")]),
        "removebg.bin": ("--------------------------1234567890abcdef",
                         [("size", b"full", None), ("image_file", JPG, "photo")]),
        "removebg-type.bin": ("--------------------------1234567890abcdef",
                              [("type_level", b"none", None), ("type", b"product", None), ("image_file", PNG, "photo")]),
        "removebg-bg-file.bin": ("--------------------------1234567890abcdef",
                                 [("size", b"full", None), ("format", b"png", None), ("image_file", JPG, "photo"),
                                  ("bg_image_file", WEBP, "photo")]),
        "removebg-two-sources.bin": ("--------------------------1234567890abcdef",
                                     [("image_url", f"{LAN}/a.jpg".encode(), None), ("image_file", PNG, "photo")]),
        "rembg.bin": ("------------------------d74496d66958873e",
                      [("model", b"u2netp", None), ("a", b"true", None), ("af", b"240", None), ("file", JPG, "in.jpg")]),
        "rembg-om.bin": ("------------------------d74496d66958873e", [("om", b"true", None), ("file", PNG, "in.jpg")]),
    }
    for name, (boundary, parts) in cases.items():
        write(p, name, boundary.encode() + b"\n" + multipart_body(boundary, parts))


def removebg_seeds():
    p = folder("removebg_fields")
    url = f"{LAN}/product-photo.jpg"
    bodies = {
        # npm remove.bg 1.3.0 (docs/clients.md): size, type and crop always sent.
        "npm-url.json": {"size": "preview", "type": "auto", "crop": False, "image_url": url},
        "npm-base64.json": {"size": "preview", "type": "auto", "crop": False, "image_file_b64": B64},
        # tests/removebg.rs
        "ignored-fields.json": {"image_file_b64": B64, "size": "full", "crop": False, "add_shadow": True,
                                "semitransparency": False, "shadow_type": "drop", "shadow_opacity": 50, "bg_color": None},
        "crop-margin.json": {"image_url": url, "size": "full", "crop": True, "crop_margin": "10px 20px"},
        "crop-string.json": {"image_url": url, "size": "full", "crop": "true", "crop_margin": "10%"},
        "roi.json": {"image_url": url, "size": "full", "roi": "0% 0% 50% 100%"},
        "roi-px.json": {"image_url": url, "size": "full", "roi": "10px 10px 5px 20px", "crop": True},
        "scale.json": {"image_url": url, "size": "full", "format": "png", "scale": "50%"},
        "position.json": {"image_url": url, "size": "full", "position": "0% 0%"},
        "bg-image-url.json": {"image_url": url, "size": "full", "bg_image_url": f"{LAN}/solid/ff0000.png"},
        "missing-source.json": {"size": "full"},
        "bad-size.json": {"image_url": url, "size": "huge"},
        "bad-roi.json": {"image_url": url, "roi": "1 2 3"},
        "two-backgrounds.json": {"image_url": url, "bg_color": "red", "bg_image_url": url},
        "bad-b64.json": {"image_file_b64": "!!!not base64"},
    }
    for name, body in bodies.items():
        write(p, name, json.dumps(body))
    # PyPI removebg 0.4: form-urlencoded, legacy size name, base64 percent-encoded.
    write(p, "pypi-url.form", urllib.parse.urlencode({"size": "regular", "bg_color": "81d4fa", "image_url": url}))
    write(p, "pypi-base64.form", urllib.parse.urlencode({"size": "regular", "image_file_b64": base64.b64encode(PNG).decode()}))
    write(p, "unencoded-plus.form", "size=full&image_file_b64=" + base64.b64encode(WEBP).decode())
    # rembg's parameters (tests/rembg.rs), as a form / query string.
    write(p, "rembg.form", "model=u2netp&a=true&af=240&ae=15&bgc=255,0,0,128")
    write(p, "rembg-om.form", "om=Yes&bgc=1,2,3")
    write(p, "rembg-bad.form", "model=xu2netpx&af=300&a=maybe&bgc=red")


def option_seeds():
    p = folder("option_values")
    values = ["#fff", "#f008", "ffffff", "#ffffff80", "81d4fa", "rebeccapurple", "white", "transparent", "beaded",
              "#ggg", "blue-ish", "90deg, #000000, #ffffff", "#ff0000, #0000ff", "linear-gradient(45deg, red, #0af 80%)",
              "90deg, #fff", "10px", "5% 10%", "10px 20px", "1px 2px 3px 4px", "wide", "lots", "0% 0% 50% 100%",
              "10px 10px 5px 20px", "1 2 3", "50%", "5%", "original", "center", "0% 0%", "left", "png", "WEBP", "jpg",
              "gif", "preview", "full", "medium", "true", "Yes", "off", "maybe"]
    for i, v in enumerate(values):
        write(p, f"{i:02}.txt", v)


def cidr_seeds():
    p = folder("cidr")
    # README / config.example.toml: allow list, deny list, an address, this host's addresses.
    cases = {
        "loopback-allowed.txt": "127.0.0.0/8\n\n127.0.0.1\n",
        "deny-lan.txt": "\n192.168.10.0/24, fd00::/8\n192.168.10.7\n192.168.1.2,fe80::1",
        "mapped.txt": "\n10.0.0.0/8\n::ffff:127.0.0.1\n",
        "compatible.txt": "::ffff:10.0.0.0/104\n\n::a00:1\n10.0.0.5",
        "metadata.txt": "\n\n169.254.169.254\n",
        "bad.txt": "10.0.0.0/33,+8\n10.0.0.0/+8\n::1\n",
        "v6.txt": "2001:db8::/32\nfd00::/8\nfd12:3456::1\n2001:db8::5",
        # NAT64 and 6to4 forms (src/fetch.rs's tests): judged by the IPv4 address they carry.
        "nat64-loopback.txt": "\n101::8\n64:ff9b::7f00:1\n",
        "6to4-own.txt": "\n\n2002:c000:202::1\n192.0.2.2",
        "nat64-allowed.txt": "127.0.0.0/8\n\n64:ff9b:1::a9fe:a9fe\n",
    }
    for name, text in cases.items():
        write(p, name, text)


def config_seeds():
    p = folder("config_toml")
    shutil.copy("systemd/config.example.toml", f"{p}/config.example.toml")
    # The example with every line uncommented (its values are the defaults or examples).
    lines = [l[2:] for l in open("systemd/config.example.toml") if l.startswith("# ") and " = " in l
             and l[2:].split(" = ")[0].replace("_", "").isalpha() and l[2:].split(" = ")[0].islower()]
    write(p, "uncommented.toml", "".join(lines))
    # src/config.rs's tests.
    write(p, "flags.toml", 'listen = "127.0.0.1:9000"\nworkers = 3\nresult_ttl = "2h"\n')
    write(p, "mqtt.toml", 'workers = 3\nmqtt_url = "mqtt://rig:secret@127.0.0.1:1884"\nfetch_allow = ["127.0.0.0/8"]\n'
                          'results_min_keep = "90s"\nmin_free_disk_mb = 10\nnode_id = "kiosk-1"\ndrain_timeout = "2m"\n')
    write(p, "unknown-key.toml", 'listen_addr = "0.0.0.0:1"\n')
    write(p, "bad-cidr.toml", 'fetch_allow = ["10.0.0.0/33"]\n')
    write(p, "rembg.toml", 'rembg_account = "shop"\nrembg_require_key = true\nmqtt_url = "mqtts://[::1]:8883"\n'
                           'mqtt_prefix = "removebg"\npublic_url = "http://kiosk-3.lan:8080/"\n')


if __name__ == "__main__":
    base64_seeds()
    json_seeds()
    mqtt_seeds()
    multipart_seeds()
    removebg_seeds()
    option_seeds()
    cidr_seeds()
    config_seeds()
