"""Open an HTML file in real headless Chromium and report what a reader would see.

A tiny Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (JSON messages
separated by NUL bytes on file descriptors 3 and 4 of the browser), so no websocket library or
driver download is needed.  :func:`check_page` loads the page, collects console errors,
uncaught exceptions and log errors (failed loads included), asks every ``<img>`` to decode,
and takes a screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

__all__ = ["find_chromium", "check_page", "PageCheck", "BrowserError", "visible"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-extensions", "--mute-audio", "--hide-scrollbars")


class BrowserError(RuntimeError):
    """The browser did not start, answered with an error, or timed out."""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    env = os.environ.get("NORMKIT_CHROMIUM")
    if env and Path(env).is_file():
        return env
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    """What the browser saw.  ``errors`` holds console errors, uncaught exceptions and log
    entries of level error (e.g. a resource that failed to load)."""

    title: str
    errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)  # {alt, decoded, width, height}
    screenshot: bytes = b""
    screenshot_colours: int = 0  # distinct colours in the screenshot (1 = blank)


class _Pipe:
    """CDP over the browser's fds 3 (we write) and 4 (we read)."""

    def __init__(self, argv: list[str], stderr):
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()

        def wire():  # in the child: put the pipe ends on fds 3 and 4
            # Move both above 10 first, so neither dup2 clobbers the other's source fd.
            a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr,
                                     stderr=stderr, preexec_fn=wire, pass_fds=(3, 4))
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            ev = self._read(deadline)
            if ev.get("method") == method:
                return ev
            self.events.append(ev)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("timed out waiting for the browser")
            ready, _, _ = select.select([self._r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise BrowserError(f"the browser exited (code {self.proc.poll()})")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


_IMAGES_JS = """
Promise.all(Array.from(document.images).map(img =>
  img.decode().then(() => true, () => false).then(ok => ({
    alt: img.alt, decoded: ok && img.complete && img.naturalWidth > 0,
    width: img.naturalWidth, height: img.naturalHeight}))))
"""


def _colours(png: bytes) -> int:
    from PIL import Image  # Pillow comes with matplotlib, which the reports need anyway

    with Image.open(io.BytesIO(png)) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 24)
    return len(colours or [])


def check_page(path: str | os.PathLike, width: int = 1200, height: int = 1600,
               timeout: float = 60.0) -> PageCheck:
    """Load ``path`` (a local HTML file) in headless Chromium and inspect it.

    Raises:
        FileNotFoundError: no Chromium on this machine.
        BrowserError: the browser failed or timed out.
    """
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium/google-chrome executable on PATH")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="normkit-chromium-") as profile, \
            tempfile.TemporaryFile() as log:
        argv = [exe, *_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                f"--window-size={width},{height}", "about:blank"]
        pipe = _Pipe(argv, log)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)
            session = pipe.send("Target.attachToTarget",
                                {"targetId": target["targetId"], "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1,
                       "mobile": False}, session=session)
            nav = pipe.send("Page.navigate", {"url": url}, session=session)
            if nav.get("errorText"):
                raise BrowserError(f"navigation to {url} failed: {nav['errorText']}")
            pipe.wait_event("Page.loadEventFired", timeout=timeout)
            images = pipe.send("Runtime.evaluate",
                               {"expression": _IMAGES_JS, "awaitPromise": True,
                                "returnByValue": True}, session=session)["result"]["value"]
            title = pipe.send("Runtime.evaluate", {"expression": "document.title",
                                                   "returnByValue": True},
                              session=session)["result"]["value"]
            shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session,
                             timeout=timeout)
            errors = []
            for ev in pipe.events:
                m, p = ev.get("method"), ev.get("params", {})
                if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    errors.append("console: " + " ".join(
                        str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
                elif m == "Runtime.exceptionThrown":
                    errors.append("exception: " + p["exceptionDetails"].get("text", ""))
                elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                    errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        finally:
            pipe.close()
    png = base64.b64decode(shot["data"])
    return PageCheck(title=title, errors=errors, images=images, screenshot=png,
                     screenshot_colours=_colours(png))


def visible(page: str) -> tuple[str, list[str]]:
    """(the text a reader sees, the elements) of an HTML page, without a browser."""

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.text, self.tags = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

        def handle_data(self, data):
            self.text.append(data)

    c = Collect()
    c.feed(page)
    return "".join(c.text), c.tags
