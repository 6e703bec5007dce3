"""Headless Chromium driven over the Chrome DevTools Protocol, for the experiments page's browser test.

The protocol is JSON over one WebSocket, which aiohttp (already a client dependency) speaks, so the test
needs nothing from the package registries beyond Debian's ``chromium``: no driver binary, no Node.js.
Only the few commands the test uses are wrapped: navigate, evaluate JavaScript, wait for a condition,
set a file input's files, set the viewport and take a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with a fresh profile in ``profile`` and one page."""

    def __init__(self, executable: str, profile: Path):
        self.executable = executable
        self.profile = Path(profile)
        self.proc: subprocess.Popen | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws = None
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.events: list[dict] = []
        self.reader: asyncio.Task | None = None

    async def __aenter__(self) -> Browser:
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([self.executable, *FLAGS, f"--user-data-dir={self.profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BrowserError(f"chromium did not start (exit status {self.proc.poll()})")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        self.session = aiohttp.ClientSession()
        for _ in range(100):
            async with self.session.get(f"http://127.0.0.1:{port}/json/list") as answer:
                pages = [t for t in await answer.json() if t.get("type") == "page"]
            if pages:
                break
            await asyncio.sleep(0.1)
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self.reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def __aexit__(self, *exc) -> None:
        if self.reader:
            self.reader.cancel()
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            future = self.pending.pop(data.get("id"), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[message_id] = future
        await self.ws.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, 60)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def viewport(self, width: int, height: int) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)

    async def goto(self, url: str) -> None:
        self.events.clear()
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def js(self, expression: str):
        """The value of a JavaScript expression (promises awaited); a thrown error raises here."""
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = (details.get("exception") or {}).get("description") or details.get("text")
            raise BrowserError(f"{expression[:80]}: {text}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0, why: str = ""):
        """Poll until the expression is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"waited {timeout:g} s for {why or expression}")
            await asyncio.sleep(0.1)

    async def click(self, selector: str) -> None:
        await self.js(f"document.querySelector({json.dumps(selector)}).click()")

    async def type_into(self, selector: str, value) -> None:
        """Set an input's value as typing would, so the page's input listeners run."""
        await self.js(f"(() => {{ const el = document.querySelector({json.dumps(selector)}); "
                      f"el.value = {json.dumps(str(value))}; el.dispatchEvent(new Event('input', {{bubbles: true}})); }})()")

    async def set_files(self, selector: str, paths: list[Path]) -> None:
        """What picking files in the file dialog does (the input's change event included)."""
        document = await self.send("DOM.getDocument", depth=-1)
        node = await self.send("DOM.querySelector", nodeId=document["root"]["nodeId"], selector=selector)
        if not node.get("nodeId"):
            raise BrowserError(f"no element matches {selector}")
        await self.send("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(Path(p).resolve()) for p in paths])

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        Path(path).write_bytes(base64.b64decode(shot["data"]))
        return Path(path)
