"""Start a ComfyUI server on 127.0.0.1 with this pack linked into a temporary base directory; bounded waits.

Used by tools/snapshot_schemas.py, tools/browser_check.py and tests/integration/test_workflows_comfyui.py.
Nothing is written into the ComfyUI checkout: custom_nodes, models, input, output, temp live in ``base``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACK_LINK = "sae-concept-eraser"  # hyphenated like a clone from the registry


class ServerError(RuntimeError):
    """ComfyUI exited or did not answer in time; the message carries the end of its log."""


def comfyui_path() -> str | None:
    """The ComfyUI checkout named by COMFYUI_PATH, or None when unset or not a checkout (no default location)."""
    path = os.environ.get("COMFYUI_PATH", "")
    return path if path and (pathlib.Path(path) / "main.py").is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, payload, timeout: float = 10):
    """(HTTP status, decoded body) without raising on 4xx."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@contextlib.contextmanager
def comfy_server(base: pathlib.Path, python: str, comfy: str, startup_s: float = 180, extra_args: list[str] = ()):
    """Yield the server URL; ``base`` gets custom_nodes/<PACK_LINK> -> this repo. Terminated in finally.
    ``extra_args`` go to main.py (e.g. ``["--front-end-root", folder]`` to serve another frontend build)."""
    base = pathlib.Path(base)
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_LINK
    if not link.exists():
        os.symlink(ROOT, link)
    port = free_port()
    log_path = base / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--use-pytorch-cross-attention", "--listen", "127.0.0.1", "--port", str(port),
         "--base-directory", str(base), "--disable-auto-launch", *extra_args],
        cwd=comfy, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                get_json(url + "/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise ServerError(f"ComfyUI did not answer within {startup_s} s:\n{log_path.read_text()[-4000:]}") from None
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        with contextlib.suppress(OSError):
            link.unlink()
