"""Headless Chromium driven over the DevTools protocol: open a page, wait for text, screenshot.

The MLflow UI is a React app: its content exists only after scripts ran and fetched data,
so tests poll the rendered text (document.body.innerText) instead of reading the HTML.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import websocket  # websocket-client, a test extra

from tests.services import chromium_binary, stop, wait_until

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0", "--window-size=1400,900"]


class Browser:
    def __init__(self, log: Path):
        self.profile = Path(tempfile.mkdtemp(prefix="mnist-mlflow-chromium-"))
        with open(log, "w") as out:
            self.proc = subprocess.Popen([chromium_binary(), *FLAGS, f"--user-data-dir={self.profile}",
                                          "about:blank"], stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            port_file = self.profile / "DevToolsActivePort"
            port = wait_until(lambda: port_file.exists() and port_file.read_text().split()[0],
                              60, "Chromium's DevTools port", self.proc, log)
            pages = wait_until(lambda: [t for t in json.load(urllib.request.urlopen(
                f"http://127.0.0.1:{port}/json/list", timeout=5)) if t["type"] == "page"],
                30, "Chromium's first tab", self.proc, log)
            self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                                  suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self.ids = itertools.count(1)

    def send(self, method: str, **params) -> dict:
        """One DevTools command; events that arrive meanwhile are dropped."""
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        """The page's text once every needle is in it; fails with what the page shows."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in text]
                raise AssertionError(f"not on the page after {timeout:.0f} s: {missing}\n"
                                     f"page text:\n{text[:3000]}")
            time.sleep(0.5)

    def click(self, selector_js: str) -> None:
        """A real mouse click (pressed, released) at the centre of what a JS expression finds."""
        box = self.evaluate(f"(() => {{ const e = {selector_js}; if (!e) return null; "
                            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
                            "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if not box:
            raise AssertionError(f"nothing to click: {selector_js}\npage text:\n{self.text()[:3000]}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def press(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=key,
                      windowsVirtualKeyCode=code)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        stop(self.proc, timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)
