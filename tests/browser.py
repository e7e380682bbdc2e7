"""Headless Chromium as a user's browser: a fresh profile per page, driven over the DevTools protocol (aiohttp's
websocket client), so a test can read the text a user sees on the first screen, not only what the page holds."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.services import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1600, 1000
"""The window: what a laptop's browser shows at once."""

# The text a user sees, line by line in reading order (top to bottom, left to right): text nodes inside the window,
# neither clipped away nor covered; pieces of one run of text (a bold word, a link) join into one line, table cells
# stay apart.
VISIBLE_TEXT = """(() => {
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const pieces = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (!node.textContent.trim()) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    const boxes = range.getClientRects();  // one per line the text wraps onto
    if (!boxes.length) continue;
    const box = boxes[0], end = boxes[boxes.length - 1];
    if (!(box.width > 0 && box.height > 0 && box.bottom > 0 && box.right > 0 && box.top < innerHeight
          && box.left < innerWidth)) continue;
    // what is drawn at the text's first characters: the text itself, not a box clipping or covering it
    const x = Math.min(Math.max(box.left + 2, 0), innerWidth - 1);
    const y = Math.min(Math.max(box.top + 2, 0), innerHeight - 1);
    const top = document.elementFromPoint(x, y), parent = node.parentElement;
    if (top && (top === parent || parent.contains(top) || top.contains(parent)))
      pieces.push({text: node.textContent, top: box.top, left: box.left, endTop: end.top, endRight: end.right});
  }
  pieces.sort((a, b) => Math.abs(a.top - b.top) < 4 ? a.left - b.left : a.top - b.top);
  const lines = [];
  let last = null;
  for (const piece of pieces) {
    if (last && Math.abs(piece.top - last.endTop) < 4 && piece.left - last.endRight < 3)
      lines[lines.length - 1] += piece.text;
    else lines.push(piece.text);
    last = piece;
  }
  return lines.map(line => line.replace(/\\s+/g, " ").trim()).join("\\n");
})()"""


def first_screen(url: str, until: tuple[str, ...], *, screenshot: Path | None = None, timeout: float = 90) -> str:
    """The text a fresh browser shows in its window at `url` once each of `until` is among its lines (AssertionError
    with what it showed instead after `timeout` seconds); optionally saves the window as a PNG."""
    port, profile = free_port(), tempfile.mkdtemp(prefix="agch-chromium-")
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync", "--no-first-run",
                             f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}",
                             f"--remote-debugging-port={port}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return asyncio.run(_read(port, url, until, screenshot, timeout))
    finally:
        proc.kill()
        proc.wait(30)
        shutil.rmtree(profile, ignore_errors=True)


async def _read(port: int, url: str, until: tuple[str, ...], screenshot: Path | None, timeout: float) -> str:
    import aiohttp

    deadline = time.monotonic() + timeout
    while True:  # Chromium answers on its port once it has started
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                page = next(t for t in json.load(response) if t["type"] == "page")
            break
        except (OSError, StopIteration):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as session, session.ws_connect(page["webSocketDebuggerUrl"],
                                                                      max_msg_size=0) as ws:
        ids = iter(range(1, 1 << 30))

        async def call(method: str, **params: object) -> dict:
            number = next(ids)
            await ws.send_json({"id": number, "method": method, "params": params})
            while True:
                message = await ws.receive_json()
                if message.get("id") == number:
                    return message.get("result", {})

        await call("Page.navigate", url=url)
        text = ""
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            text = (await call("Runtime.evaluate", expression=VISIBLE_TEXT, returnByValue=True)).get(
                "result", {}).get("value") or ""
            if all(any(line.startswith(wanted) for line in text.splitlines()) for wanted in until):
                await asyncio.sleep(1.0)  # let the rest of the page settle
                text = (await call("Runtime.evaluate", expression=VISIBLE_TEXT, returnByValue=True))["result"]["value"]
                if screenshot is not None:
                    import base64

                    shot = await call("Page.captureScreenshot", format="png")
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                return text
    raise AssertionError(f"{until!r} never showed at {url}; the window showed:\n{text}")
