"""Open an HTML file in headless Chromium with the network off and report what happened (test helper).

Drives Chromium over ``--remote-debugging-pipe`` with the DevTools protocol (standard library only). The page
is kept offline twice over: CDP network emulation, and a dead proxy (127.0.0.1:9) so that anything escaping the
emulation fails at once. Records every request to a network host, console errors, uncaught exceptions and
JavaScript dialogs (an ``alert`` would mean injected script ran), and describes every Vega chart on the page
once the charts stop changing. After the logic of ``check_html_offline.py`` in the project's shared tools.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PageReport", "check_page", "find_chromium"]

LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider",
    "--no-pings",
    "--mute-audio",
    "--hide-scrollbars",
    "--password-store=basic",
    "--use-mock-keychain",
    "--proxy-server=http://127.0.0.1:9",
    "--remote-debugging-pipe",
]

PROBE_JS = r"""
(() => {
  const charts = [];
  document.querySelectorAll('.vega-embed').forEach(el => {
    const svg = el.querySelector('svg.marks');
    const info = {id: el.id || null, rendered: !!svg, width: 0, height: 0, items: 0, titles: [], axis_titles: []};
    if (svg) {
      const r = svg.getBoundingClientRect();
      info.width = Math.round(r.width); info.height = Math.round(r.height);
      svg.querySelectorAll('g.role-mark').forEach(g => { info.items += g.children.length; });
      info.titles = Array.from(svg.querySelectorAll('g.role-title-text text')).map(t => t.textContent);
      info.axis_titles = Array.from(svg.querySelectorAll('g.role-axis-title text')).map(t => t.textContent);
    }
    charts.push(info);
  });
  // Boxes a reader must scroll sideways inside (a chart wider than its column), besides the page itself.
  const scrolled = Array.from(document.querySelectorAll('.chart, .wide, pre'))
    .filter(el => el.scrollWidth > el.clientWidth + 1)
    .map(el => ({id: el.id || (el.querySelector('[id]') || {}).id || el.className,
                 scroll_width: el.scrollWidth, client_width: el.clientWidth}));
  return {ready: document.readyState, title: document.title, charts: charts, scrolled: scrolled,
          scroll_width: document.documentElement ? document.documentElement.scrollWidth : 0,
          inner_width: window.innerWidth};
})()
"""


def find_chromium() -> str | None:
    """Debian's Chromium binary (bypassing the wrapper script), ``$CHROMIUM_BIN``, or one on PATH."""
    for c in (
        os.environ.get("CHROMIUM_BIN"),
        "/usr/lib/chromium/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


@dataclass
class PageReport:
    """What the page did."""

    external_requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    charts: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""
    scroll_width: int = 0
    inner_width: int = 0
    scrolled: list[dict[str, Any]] = field(default_factory=list)
    load_s: float = 0.0

    @property
    def rendered(self) -> list[dict[str, Any]]:
        return [c for c in self.charts if c["rendered"]]

    @property
    def empty(self) -> list[dict[str, Any]]:
        return [c for c in self.rendered if c["items"] == 0 or not c["width"] or not c["height"]]


class _Browser:
    def __init__(self, binary: str, width: int, height: int) -> None:
        self.profile = tempfile.mkdtemp(prefix="bsprof-browser-")
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def child_fds() -> None:  # in the child, before exec: the DevTools pipe is fds 3 (in) and 4 (out)
            a = fcntl.fcntl(to_r, fcntl.F_DUPFD_CLOEXEC, 10)
            b = fcntl.fcntl(from_w, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._log = open(os.path.join(self.profile, "stderr.log"), "wb")  # closed in close()
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            close_fds=False,
            preexec_fn=child_fds,
            start_new_session=True,
        )
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self.on_event: Any = None

    def _pump(self, timeout: float) -> None:
        r, _, _ = select.select([self._from_r], [], [], max(0.0, timeout))
        if not r:
            return
        chunk = os.read(self._from_r, 1 << 20)
        if not chunk:
            raise RuntimeError("Chromium closed the DevTools pipe")
        self._buf += chunk
        while b"\0" in self._buf:
            raw, self._buf = self._buf.split(b"\0", 1)
            msg = json.loads(raw)
            if "id" in msg:
                self._replies[msg["id"]] = msg
            elif self.on_event:
                self.on_event(msg)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to_w, data) :]
        return self._id

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        mid = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while mid not in self._replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"CDP {method} timed out")
            self._pump(0.1)
        msg = self._replies.pop(mid)
        if "error" in msg:
            raise RuntimeError(f"CDP {method}: {msg['error']}")
        return msg.get("result", {})

    def wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._pump(min(left, 0.1))

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close")
                    self.proc.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group: only this browser
                    self.proc.wait(timeout=5)
        finally:
            for fd in (self._to_w, self._from_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()
            shutil.rmtree(self.profile, ignore_errors=True)


def check_page(
    html: Path,
    *,
    expect_charts: int,
    timeout: float = 30.0,
    settle: float = 0.8,
    width: int = 1280,
    height: int = 900,
    screenshot: Path | None = None,
    chromium: str | None = None,
) -> PageReport:
    """Load ``html`` offline and wait until ``expect_charts`` charts have rendered and stayed unchanged for
    ``settle`` seconds (or ``timeout``, or an error)."""
    binary = chromium or find_chromium()
    if binary is None:
        raise RuntimeError("no Chromium found")
    rep = PageReport()
    sessions: set[str] = set()
    loaded = {"done": False}
    b = _Browser(binary, width, height)

    def on_event(msg: dict[str, Any]) -> None:
        m, p, sid = msg.get("method"), msg.get("params", {}), msg.get("sessionId")
        if sid is not None and sid not in sessions:
            return
        if m == "Network.requestWillBeSent" and not p["request"]["url"].startswith(LOCAL_SCHEMES):
            rep.external_requests.append(p["request"]["url"])
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            rep.console_errors.append(
                " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            )
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            rep.console_errors.append(f"{d.get('text', '')} {(d.get('exception') or {}).get('description', '')}")
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            rep.console_errors.append(p["entry"].get("text", ""))
        elif m == "Page.javascriptDialogOpening":
            rep.dialogs.append(p.get("message", ""))
            b.send("Page.handleJavaScriptDialog", {"accept": True}, sid)
        elif m == "Page.loadEventFired":
            loaded["done"] = True

    b.on_event = on_event
    try:
        target = b.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = b.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        sessions.add(sid)
        for method in ("Page.enable", "Network.enable", "Runtime.enable", "Log.enable"):
            b.call(method, {}, sid)
        b.call(
            "Network.emulateNetworkConditions",
            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
            sid,
        )
        b.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            sid,
        )
        t0 = time.monotonic()
        b.call("Page.navigate", {"url": html.resolve().as_uri()}, sid, timeout=timeout)
        last, stable_since, probe = None, time.monotonic(), {}
        while time.monotonic() - t0 < timeout:
            r = b.call("Runtime.evaluate", {"expression": PROBE_JS, "returnByValue": True}, sid)
            if "exceptionDetails" in r:
                raise RuntimeError(f"chart probe failed: {r['exceptionDetails']}")
            probe = r["result"]["value"]
            sig = json.dumps([(c["rendered"], c["items"], c["width"], c["height"]) for c in probe["charts"]])
            now = time.monotonic()
            if sig != last:
                last, stable_since = sig, now
            done = sum(c["rendered"] for c in probe["charts"]) >= expect_charts or rep.console_errors
            if loaded["done"] and probe["ready"] == "complete" and done and now - stable_since >= settle:
                break
            b.wait(0.15)
        rep.load_s = time.monotonic() - t0
        rep.charts, rep.title = probe.get("charts", []), probe.get("title", "")
        rep.scroll_width, rep.inner_width = probe.get("scroll_width", 0), probe.get("inner_width", 0)
        rep.scrolled = probe.get("scrolled", [])
        if screenshot is not None:
            m = b.call("Page.getLayoutMetrics", {}, sid)
            size = m.get("cssContentSize") or m["contentSize"]
            w, h = max(width, int(size["width"] + 0.999)), min(int(size["height"] + 0.999), 16000)
            b.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False},
                sid,
            )
            b.wait(0.2)
            shot = b.call(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1},
                },
                sid,
                timeout=timeout,
            )
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        b.wait(0.1)
    finally:
        b.close()
    return rep
