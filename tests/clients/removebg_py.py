"""Drives the PyPI `removebg` client (unchanged) the way its README does, and prints what it
got as one JSON line per call for tests/clients.rs to check.

Its endpoint is the module global `removebg.removebg.API_ENDPOINT`, read at call time, so one
assignment points it at the daemon."""
import base64
import json
import os
import shutil
import sys

import removebg.removebg
from removebg import RemoveBg

removebg.removebg.API_ENDPOINT = os.environ["REMOVEBG_BASE"] + "/v1.0/removebg"

photo, url, out_dir = sys.argv[1:4]
key = os.environ["REMOVEBG_KEY"]


def report(name, call):
    try:
        call()
        print(json.dumps({"name": name, "ok": True}), flush=True)
    except Exception as e:  # the client raises requests' HTTPError on any status >= 400
        status = getattr(getattr(e, "response", None), "status_code", None)
        print(json.dumps({"name": name, "ok": False, "status": status, "error": str(e)}), flush=True)


rmbg = RemoveBg(key, None)
# Multipart upload; the client writes "<input>_no_bg.png" next to the input.
local = os.path.join(out_dir, "py-input.jpg")
shutil.copy(photo, local)
report("file", lambda: rmbg.remove_background_from_img_file(local))
# Form-urlencoded URL, full size on a colour name.
report("url", lambda: rmbg.remove_background_from_img_url(
    url, size="full", new_file_name=os.path.join(out_dir, "py-url.img"), bg_color="red"))
# Form-urlencoded base64 ("+", "/" and "=" percent-encoded by the client).
with open(photo, "rb") as f:
    b64 = base64.b64encode(f.read()).decode()
report("base64", lambda: rmbg.remove_background_from_base64_img(
    b64, new_file_name=os.path.join(out_dir, "py-b64.img")))
# A wrong key.
report("bad_key", lambda: RemoveBg("wrong", None).remove_background_from_img_url(
    url, new_file_name=os.path.join(out_dir, "py-bad.img")))
