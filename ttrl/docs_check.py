"""`make docs-check`: open the built docs site in headless Chromium and check that its pages render.

    python -m ttrl.docs_check [--site site] [--out outputs/docs-check] [--browser /usr/bin/chromium]

Serves `site/` (what `make docs` built) on a loopback port, drives a fresh
headless Chromium over the DevTools protocol (a websocket: no driver binary,
no browser download), and for each checked page: waits for the load event
and for every image to settle, fails on an image that did not decode
(naturalWidth 0), on fewer images than the page is known to hold, on a
missing title or on an uncaught script error, and writes a screenshot to
`--out`. Without Chromium on the machine (CI has none) it says so and exits
0: the strict build in CI still catches broken links and missing pages.

It never reaches beyond loopback (the browser is started with its background
networking off and a throwaway profile) and never modifies the site. No ray,
vllm, deepspeed or torch here.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# (name, path under the site, the images it must show by file name, text its <h1> must hold).
# The logo is an <img> on every page; the home and results pages add plots.
PAGES = [
    ("home", "", ("logo.svg", "label_free_rewards.png"), "ttrl"),
    ("config-reference", "reference/config/", ("logo.svg",), "Configuration reference"),
    ("results", "results/", ("logo.svg", "label_free_rewards.png", "ppo_grpo_ser.png"), "Results and history"),
]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The flags the check launches Chromium with: headless, no sandbox (root in
# containers), nothing fetched on its own behalf, a profile of its own.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1280,900"]
TIMEOUT_S = 60.0


class CheckError(RuntimeError):
    """A page that did not render as it should; the message names the page and what failed."""


def find_browser(path: str | None = None) -> str | None:
    """$TTRL_CHROMIUM, else the first Chromium on PATH (or on `path`), else None."""
    explicit = os.environ.get("TTRL_CHROMIUM")
    if explicit:
        return explicit
    for name in BROWSERS:
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


# ── the site, served on loopback ───────────────────────────────────────────
class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # The browser drops connections it no longer needs (a navigation away
        # mid-download): not a failure of the page, and no traceback to print.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve_site(site: Path) -> tuple[ThreadingHTTPServer, str]:
    """A static server of `site` on 127.0.0.1 (any free port), running in a thread; (server, base URL)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


# ── the browser, over the DevTools protocol ────────────────────────────────
class Browser:
    """One headless Chromium with one page, driven over its DevTools websocket."""

    def __init__(self, executable: str):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="ttrl-docs-check-")
        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port = self._port()
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            pages = [t for t in targets if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not pages:
            raise CheckError("Chromium started but opened no page to drive")
        # Screenshots come back base64 in one message: allow more than the 1 MiB default.
        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(
            connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=TIMEOUT_S))
        self._id = 0
        self.events: list[dict[str, Any]] = []
        for method in ("Page.enable", "Runtime.enable"):
            self.call(method)
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)

    def _port(self) -> int:
        """The DevTools port Chromium chose, from the DevToolsActivePort file it writes in its profile."""
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
                raise CheckError(f"Chromium exited at start with status {self.proc.returncode}: {err[-500:]}")
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            time.sleep(0.1)
        raise CheckError(f"Chromium did not open its DevTools port within {TIMEOUT_S:.0f} s")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept in `events`."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckError(f"no answer to {method} within {TIMEOUT_S:.0f} s")
            msg = json.loads(self._recv(left, method))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise CheckError(f"{method} failed: {msg['error'].get('message')}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not any(e.get("method") == event for e in self.events):
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckError(f"no {event} within {TIMEOUT_S:.0f} s")
            self.events.append(json.loads(self._recv(left, event)))

    def _recv(self, timeout: float, waiting_for: str) -> str:
        try:
            return self.ws.recv(timeout=timeout)
        except TimeoutError:
            raise CheckError(f"no {waiting_for} within {TIMEOUT_S:.0f} s") from None

    def evaluate(self, expression: str) -> Any:
        out = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in out:
            raise CheckError(f"script failed: {out['exceptionDetails'].get('text')}")
        return out["result"].get("value")

    def close(self) -> None:
        try:
            self._stack.close()
        except Exception:  # noqa: BLE001 - closing a socket the browser may have dropped already
            pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


# Resolves once every <img> has loaded or failed (lazy images are made eager first).
_IMAGES_SETTLED = """
Promise.all([...document.images].map(img => {
  img.loading = 'eager';
  return img.complete ? true : new Promise(done => { img.onload = img.onerror = () => done(true); });
})).then(() => JSON.stringify({
  title: document.title,
  h1: (document.querySelector('article h1, h1') || {}).textContent || '',
  height: Math.ceil(document.documentElement.scrollHeight),
  images: [...document.images].map(i => ({src: i.currentSrc || i.src, width: i.naturalWidth, alt: i.alt})),
}))
"""


@dataclass
class PageResult:
    name: str
    url: str
    screenshot: Path
    images: list[dict[str, Any]]


def check_page(browser: Browser, name: str, url: str, required: tuple[str, ...], heading: str,
               out: Path) -> PageResult:
    """Load one page, check it, write its screenshot; CheckError names what failed."""
    status = urllib.request.urlopen(url, timeout=10).status
    if status != 200:
        raise CheckError(f"{name}: {url} answered HTTP {status}")
    browser.events.clear()
    browser.call("Page.navigate", url=url)
    browser.wait_for("Page.loadEventFired")
    info = json.loads(browser.evaluate(_IMAGES_SETTLED))
    errors = [e["params"]["exceptionDetails"].get("text", "?") for e in browser.events
              if e.get("method") == "Runtime.exceptionThrown"]
    broken = [i["src"] for i in info["images"] if not i["width"]]
    problems = []
    if heading not in info["h1"]:
        problems.append(f"its heading is {info['h1']!r}, not {heading!r}")
    shown = {Path(urllib.parse.urlsplit(i["src"]).path).name for i in info["images"]}
    missing = [f for f in required if f not in shown]
    if missing:
        problems.append(f"it shows no {', '.join(missing)} (its images: {', '.join(sorted(shown)) or 'none'})")
    if broken:
        problems.append(f"broken images (naturalWidth 0): {', '.join(broken)}")
    if errors:
        problems.append(f"script errors: {'; '.join(errors)}")
    # The whole page up to 6000 px (the reference is far longer: its first screens show the tables).
    height = min(info["height"], 6000)
    browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=height, deviceScaleFactor=1, mobile=False)
    shot = browser.call("Page.captureScreenshot", format="png")
    browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
    path = out / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    if problems:
        raise CheckError(f"{name} ({url}): " + "; ".join(problems) + f" (screenshot: {path})")
    return PageResult(name, url, path, info["images"])


def run_check(site: Path, out: Path, browser_path: str) -> list[PageResult]:
    if not (site / "index.html").exists():
        raise CheckError(f"{site}/index.html does not exist: build the site first (make docs)")
    out.mkdir(parents=True, exist_ok=True)
    server, base = serve_site(site)
    browser = None
    try:
        browser = Browser(browser_path)
        return [check_page(browser, name, base + path, n, heading, out) for name, path, n, heading in PAGES]
    finally:
        if browser is not None:
            browser.close()
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ttrl.docs_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", type=Path, default=Path("site"), help="the built site (make docs)")
    ap.add_argument("--out", type=Path, default=Path("outputs/docs-check"), help="where the screenshots go")
    ap.add_argument("--browser", default=None, help="Chromium's executable (default: $TTRL_CHROMIUM, else PATH)")
    args = ap.parse_args(argv)
    browser = args.browser or find_browser()
    if browser is None:
        print("docs-check: skipped: no Chromium on this machine (apt-get install chromium, or set "
              "TTRL_CHROMIUM); the site was built but not opened in a browser.", file=sys.stderr)
        return 0
    if not Path(browser).exists() and shutil.which(browser) is None:
        print(f"docs-check: {browser}: no such browser executable", file=sys.stderr)
        return 2
    try:
        results = run_check(args.site, args.out, browser)
    except CheckError as err:
        print(f"docs-check: {err}", file=sys.stderr)
        return 1
    for r in results:
        shown = ", ".join(f"{Path(i['src']).name} {i['width']}px" for i in r.images)
        print(f"docs-check: {r.name}: {len(r.images)} images, all decoded ({shown}); screenshot {r.screenshot}")
    print(f"docs-check: {len(results)} pages rendered with their images in {browser}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
