"""The HTML report in a real headless Chromium, driven over the DevTools protocol on a pipe.

Checks: no console errors or exceptions, every image decodes, no request leaves the file, the
screenshot is not blank, and hostile module / config names are shown as text, never run.
Skipped without Chromium unless VANISHING_REQUIRE_BROWSER=1 (CI), where its absence fails.
"""

import base64
import contextlib
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vanishing
from helpers import train
from vanishing.report.html import write_report

EVIL = "<script>alert(1)</script>"
CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def _chromium():
    for c in CANDIDATES:
        path = shutil.which(c) or (c if os.path.isfile(c) and os.access(c, os.X_OK) else None)
        if path:
            return path
    if os.environ.get("VANISHING_REQUIRE_BROWSER") == "1":
        pytest.fail(
            "VANISHING_REQUIRE_BROWSER=1 but no Chromium found (install the chromium package)"
        )
    pytest.skip("Chromium not installed")


class Browser:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fds 3 and 4,
    NUL-delimited JSON): no websocket library needed."""

    def __init__(self, exe, profile):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)

        def child():
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--remote-debugging-pipe",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-sync",
                "--disable-component-update",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=child,
            close_fds=False,
        )
        for fd in (to_chrome_r, from_chrome_w, a, b):
            os.close(fd)
        self._buf = b""
        self._id = 0
        self.events = []
        self.session = None

    def _read_message(self, deadline):
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from Chromium")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method, params=None, *, session=True, timeout=30):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method, timeout=30):
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + timeout
        while True:
            e = self._read_message(deadline)
            self.events.append(e)
            if e.get("method") == method:
                return e

    def open(self, url):
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.send(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=False,
        )
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        self.events.clear()
        self.send("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")
        time.sleep(0.3)  # let late console messages arrive
        self.send("Runtime.evaluate", {"expression": "1"})  # drains pending events

    def evaluate(self, expression):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def close(self):
        with contextlib.suppress(Exception):  # closing anyway
            self.send("Browser.close", session=False, timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report of a run whose module and config names are hostile HTML."""
    tmp = tmp_path_factory.mktemp("browser")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layers = {EVIL: nn.Linear(5, 8), "a1": nn.Sigmoid()}
            for i in range(2, 6):
                layers[f"h{i}"] = nn.Linear(8, 8)
                layers[f"a{i}"] = nn.Sigmoid()
            layers["out"] = nn.Linear(8, 3)
            self.blocks = nn.ModuleDict(layers)

        def forward(self, x):
            for m in self.blocks.values():
                x = m(x)
            return x

    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    run = tmp / "run"
    with vanishing.watch(model, optimizer=opt, run_dir=run, flush_every=5):
        train(model, opt, steps=12)
    (run / "config.json").write_text(
        json.dumps(
            {"name": '<img src=x onerror="window.pwned=1">', "seed": 0, "model": {"note": EVIL}}
        )
    )
    return write_report(run)


@pytest.fixture(scope="module")
def page(report, tmp_path_factory):
    browser = Browser(_chromium(), tmp_path_factory.mktemp("profile"))
    try:
        browser.open(report.resolve().as_uri())
        yield browser
    finally:
        browser.close()


def test_loads_without_console_errors(page):
    def is_error(m, p):
        return (
            m in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening")
            or (m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"))
            or (m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error")
        )

    errors = [e for e in page.events if is_error(e.get("method"), e.get("params", {}))]
    assert errors == []


def test_every_image_decodes(page):
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
    )
    assert len(images) >= 6
    assert all(done and w > 0 and h > 0 for done, w, h in images), images


def test_no_request_leaves_the_file(page, report):
    urls = [
        e["params"]["request"]["url"]
        for e in page.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    own = report.resolve().as_uri()
    assert own in urls
    assert all(u == own or u.startswith("data:") for u in urls), urls


def test_screenshot_is_not_blank(page):
    from PIL import Image

    shot = page.send("Page.captureScreenshot", {"format": "png"})
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("L"), float)
    assert img.shape[0] >= 500 and img.shape[1] >= 1000
    assert img.std() > 10  # text, tables and plots, not a blank page
    assert (img < 100).mean() > 0.005  # some dark ink


def test_hostile_names_are_text_not_markup(page):
    assert page.evaluate("document.querySelectorAll('script').length") == 0
    assert page.evaluate("window.pwned === undefined")
    assert (
        page.evaluate("document.querySelectorAll('img:not([src^=\"data:image/png\"])').length") == 0
    )
    text = page.evaluate("document.body.innerText")
    assert f"blocks.{EVIL}" in text
    assert '<img src=x onerror="window.pwned=1">' in text
    assert Path(page.evaluate("location.pathname")).name == "report.html"
