"""The served ComfyUI web UI, in a real headless Chromium, knows every node type the pack's example
workflows use.

A real ComfyUI server (devkit/comfy_server.py) serves its frontend (comfyui-frontend-package);
Debian's /usr/bin/chromium opens it headless and is driven over the Chrome DevTools protocol by the
small client below (aiohttp, which ComfyUI itself requires: no Playwright, no browser download).
Each workflow is loaded with the frontend's own ``app.loadGraphData``; missing node types are taken
from two places that must agree:

* the app's own detection: the list ``loadGraphData`` hands to extensions' ``afterConfigureGraph``
  (the same list its "missing nodes" dialog shows), captured by a tiny extension registered here;
* an independent check of every node ``type`` in the JSON (and in subgraph definitions) against
  ``LiteGraph.registered_node_types``.

A negative control (a fake ``NoSuchNodeXYZ`` node) must be reported missing by both and shown in
the app's dialog, so the check cannot pass vacuously. Missing model FILES are fine here: only node
types are checked. One screenshot per workflow goes to ``<repo>/artifacts/browser/<name>.png``.

Example workflows: ``<repo>/example_workflows/*.json`` (env ``LORARAR_EXAMPLE_WORKFLOWS``: another
folder). Chromium comes from ``scripts/install_browser.sh``; when it is absent the test runs that script,
and skips only when Chromium cannot be installed; with env ``LORARAR_REQUIRE_BROWSER=1`` (set by
``.ci/run``) it fails instead. Binary: env ``LORARAR_CHROMIUM`` or ``/usr/bin/chromium``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from devkit.comfy_server import ComfyServer
from devkit.synthetic_models import ensure_models

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "browser"
# env LORARAR_EXAMPLE_WORKFLOWS: check the *.json of another folder instead (for developing the test)
EXAMPLES_DIR = Path(os.environ.get("LORARAR_EXAMPLE_WORKFLOWS", REPO / "example_workflows"))
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.json"))
CHROMIUM = Path(os.environ.get("LORARAR_CHROMIUM", "/usr/bin/chromium"))
PACK_NODE_TYPES = ("LoraRarHypernetLoader", "LoraRarMerge", "LoraRarSaveMergedLora")
FAKE_NODE_TYPE = "NoSuchNodeXYZ"
VIEWPORT = (1600, 1000)

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--no-default-browser-check",
    "--mute-audio", "--hide-scrollbars", "--remote-allow-origins=*",
    f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}",
    # Nothing but the loopback server: lookups of any other host fail at once instead of timing out.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


# ------------------------------------------------------------------------------------ Chromium

def require_browser() -> bool:
    return os.environ.get("LORARAR_REQUIRE_BROWSER", "").strip().lower() in ("1", "true", "yes")


def ensure_chromium() -> Path:
    """The Chromium binary; runs scripts/install_browser.sh when it is missing. When that cannot
    install it, the test skips, or fails under env LORARAR_REQUIRE_BROWSER=1 (CI)."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    script = REPO / "scripts" / "install_browser.sh"
    if os.environ.get("LORARAR_BROWSER_INSTALL_FAILED"):  # scripts/test.sh tried it just before
        out, rc = "scripts/test.sh already ran it and it failed (see its output above)", "n/a"
    else:
        try:
            proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=900)
            out, rc = proc.stdout, proc.returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            out, rc = str(e), -1
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        reason = (f"Chromium ({CHROMIUM}) is not installed and {script.name} could not install it "
                  f"(rc={rc}):\n{out[-3000:]}")
        if require_browser():
            pytest.fail("LORARAR_REQUIRE_BROWSER=1: " + reason, pytrace=False)
        pytest.skip(reason)
    return CHROMIUM


@pytest.mark.parametrize("required", ["1", ""])
def test_missing_chromium_skips_or_fails_when_required(monkeypatch, tmp_path, required):
    """Without Chromium the browser check skips with the reason, and fails under
    LORARAR_REQUIRE_BROWSER=1 (CI), so a broken install cannot pass as a skip there."""
    monkeypatch.setitem(globals(), "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("LORARAR_BROWSER_INSTALL_FAILED", "1")
    monkeypatch.setenv("LORARAR_REQUIRE_BROWSER", required)
    expected = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(expected, match="no-chromium"):
        ensure_chromium()


class CDPError(RuntimeError):
    pass


class Chromium:
    """A headless Chromium process with one page, driven over the DevTools protocol (CDP)."""

    def __init__(self, binary: Path):
        self.binary = binary
        self.tmp = Path(tempfile.mkdtemp(prefix="lorarar-chromium-"))
        self.log_path = self.tmp / "chromium.log"
        self.proc: subprocess.Popen | None = None
        self._session = self._ws = self._reader = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.console: list[str] = []       # console messages and uncaught exceptions, for failures

    async def start(self, timeout: float = 60.0) -> "Chromium":
        import aiohttp

        profile = self.tmp / "profile"
        profile.mkdir()
        cmd = [str(self.binary), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               "--remote-debugging-port=0", "about:blank"]
        self._log_fh = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        port = None
        while port is None:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with {self.proc.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise CDPError(f"chromium wrote no DevToolsActivePort in {timeout:.0f} s\n{self.log_tail()}")
            try:
                port = int(port_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                await asyncio.sleep(0.1)
        page_ws = None
        while page_ws is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    targets = json.loads(r.read())
                page_ws = next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)
            except OSError:
                pass
            if page_ws is None:
                if time.monotonic() > deadline:
                    raise CDPError(f"no page target from chromium\n{self.log_tail()}")
                await asyncio.sleep(0.1)
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(page_ws, max_msg_size=0, autoping=True)
        self._reader = asyncio.ensure_future(self._read())
        for domain in ("Page", "Runtime"):
            await self.send(f"{domain}.enable")
        await self.send("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                        deviceScaleFactor=1, mobile=False)
        return self

    async def _read(self) -> None:
        import aiohttp

        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                fut = self._pending.pop(data.get("id"), None) if "id" in data else None
                if fut is not None and not fut.done():
                    fut.set_result(data)
                elif data.get("method") == "Runtime.consoleAPICalled":
                    p = data["params"]
                    text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                    self.console.append(f"console.{p.get('type')}: {text[:500]}")
                elif data.get("method") == "Runtime.exceptionThrown":
                    d = data["params"]["exceptionDetails"]
                    self.console.append(f"uncaught: {d.get('exception', {}).get('description', d.get('text'))[:800]}")
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(CDPError("DevTools connection closed"))

    async def send(self, method: str, timeout: float = 60.0, **params):
        if self._reader is not None and self._reader.done():
            raise CDPError(f"DevTools connection closed\n{self.log_tail()}")
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        try:
            answer = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(msg_id, None)
            raise CDPError(f"{method}: no answer in {timeout:.0f} s") from None
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    async def eval(self, expression: str, timeout: float = 60.0):
        """Evaluate JS in the page (promises awaited); returns the JSON value or raises CDPError."""
        res = await self.send("Runtime.evaluate", timeout=timeout, expression=expression,
                              awaitPromise=True, returnByValue=True, userGesture=True)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise CDPError("JS error: " + str(d.get("exception", {}).get("description", d.get("text"))))
        return res.get("result", {}).get("value")

    async def call(self, fn: str, *args, timeout: float = 60.0):
        """Call the JS function source ``fn`` with JSON arguments."""
        return await self.eval(f"({fn})({', '.join(json.dumps(a) for a in args)})", timeout=timeout)

    async def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await self.eval(expression, timeout=10)
            except CDPError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                               + "\n".join(self.console[-30:]))
            await asyncio.sleep(0.2)

    async def navigate(self, url: str) -> None:
        res = await self.send("Page.navigate", url=url)
        if res.get("errorText"):
            raise CDPError(f"navigating to {url}: {res['errorText']}")

    async def screenshot(self, path: Path) -> Path:
        res = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(res["data"]))
        return path

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        return "---- chromium log tail ----\n" + "\n".join(lines[-n:])

    async def close(self) -> None:
        try:
            if self._ws is not None:
                await self._ws.close()
            if self._session is not None:
                await self._session.close()
            if self._reader is not None:
                self._reader.cancel()
        finally:
            proc, self.proc = self.proc, None
            if proc is not None:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGTERM)  # its own session: pgid == pid
                        proc.wait(timeout=10)
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        pass
                try:  # renderer/zygote children of the group that outlive the browser process
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                if proc.poll() is None:
                    proc.wait(timeout=10)
            if getattr(self, "_log_fh", None) is not None:
                self._log_fh.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ page JS

UI_SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 0}

APP_READY = """(() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
    && LiteGraph.registered_node_types && Object.keys(LiteGraph.registered_node_types).length > 50
    && document.querySelector('canvas#graph-canvas')))()"""

# An extension that records the missing-node list loadGraphData passes to afterConfigureGraph.
INSTALL_HOOK = """async () => {
    window.__lorarar = {missing: null, loads: 0};
    window.app.registerExtension({
        name: "lorarar.e2e.missingNodeTypes",
        async afterConfigureGraph(missing) {
            window.__lorarar.loads += 1;
            window.__lorarar.missing = (missing || []).map(m => typeof m === "string" ? m : m.type);
        },
    });
    return true;
}"""

UNREGISTERED = """(types) => types.filter(t => !(t in LiteGraph.registered_node_types))"""

# Close the dialogs an earlier load left open (missing nodes / models); true once none is left.
CLOSE_DIALOGS = """() => {
    const open = document.querySelectorAll('.p-dialog');
    open.forEach(d => d.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()));
    return open.length === 0;
}"""

LOAD_WORKFLOW = """async (wf, name) => {
    window.__lorarar.missing = null;
    const before = window.__lorarar.loads;
    await window.app.loadGraphData(wf, true, true, name);
    const types = [];
    for (const n of wf.nodes || []) types.push(n.type);
    for (const sg of (wf.definitions && wf.definitions.subgraphs) || [])
        for (const n of sg.nodes || []) types.push(n.type);
    const registered = LiteGraph.registered_node_types;
    await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
    return {
        hooked: window.__lorarar.loads > before,
        app_missing: window.__lorarar.missing,
        unregistered: [...new Set(types.filter(t => !(t in registered)))],
        types: [...new Set(types)],
        graph_nodes: window.app.graph.nodes.length,
        error_nodes: window.app.graph.nodes.filter(n => n.has_errors).map(n => n.type),
    };
}"""

# Where the app tells the user about missing nodes: a dialog (frontend 1.32, ComfyUI 0.3.75) or an
# error toast (frontend 1.49, ComfyUI 0.33).
DIALOG_TEXT = """() => {
    const parts = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText);
    for (const e of document.querySelectorAll('span, p'))
        if (e.children.length === 0 && /missing node/i.test(e.innerText || '')) parts.push(e.innerText);
    return parts.join('\\n');
}"""


# ------------------------------------------------------------------------------------ workflows

def pack_workflow() -> dict:
    """A small UI-format workflow (as ComfyUI saves it) with stock nodes and the pack's three nodes:
    CheckpointLoaderSimple -> LoraRarMerge (+ LoraRarHypernetLoader) -> LoraRarSaveMergedLora."""
    def node(id_, type_, pos, size, inputs=(), outputs=(), widgets=(), order=0):
        return {"id": id_, "type": type_, "pos": list(pos), "size": list(size), "flags": {},
                "order": order, "mode": 0, "inputs": list(inputs), "outputs": list(outputs),
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}

    def out(name, type_, links):
        return {"name": name, "type": type_, "links": links}

    def inp(name, type_, link):
        return {"name": name, "type": type_, "link": link}

    nodes = [
        node(1, "CheckpointLoaderSimple", (40, 120), (320, 100), order=0,
             outputs=[out("MODEL", "MODEL", [1]), out("CLIP", "CLIP", [2]), out("VAE", "VAE", None)],
             widgets=["lorarar-synthetic-sdxl-family.safetensors"]),
        node(2, "LoraRarHypernetLoader", (40, 300), (320, 60), order=1,
             outputs=[out("hypernet", "LORARAR_HYPERNET", [3])], widgets=["auto"]),
        node(3, "LoraRarMerge", (420, 120), (360, 330), order=2,
             inputs=[inp("model", "MODEL", 1), inp("hypernet", "LORARAR_HYPERNET", 3),
                     inp("clip", "CLIP", 2)],
             outputs=[out("model", "MODEL", None), out("clip", "CLIP", None),
                      out("merged_lora", "LORARAR_MERGED_LORA", [4]), out("report", "STRING", None)],
             widgets=["subject.safetensors", "style.safetensors", 1.0, 1.0, 1.0, 1.0, "lorarar", "sum"]),
        node(4, "LoraRarSaveMergedLora", (840, 120), (320, 130), order=3,
             inputs=[inp("merged_lora", "LORARAR_MERGED_LORA", 4)],
             outputs=[out("path", "STRING", None)], widgets=["lorarar/merged", "fp16", "add number"]),
    ]
    links = [[1, 1, 0, 3, 0, "MODEL"], [2, 1, 1, 3, 2, "CLIP"], [3, 2, 0, 3, 1, "LORARAR_HYPERNET"],
             [4, 3, 2, 4, 0, "LORARAR_MERGED_LORA"]]
    return {"last_node_id": 4, "last_link_id": 4, "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def fake_node_workflow() -> dict:
    wf = pack_workflow()
    wf["nodes"].append({"id": 5, "type": FAKE_NODE_TYPE, "pos": [840, 320], "size": [300, 80],
                        "flags": {}, "order": 4, "mode": 0, "inputs": [], "outputs": [],
                        "properties": {}, "widgets_values": []})
    wf["last_node_id"] = 5
    return wf


# ------------------------------------------------------------------------------------ the check

def _run(coro):
    return asyncio.run(coro)


async def _browser_check(srv: ComfyServer, binary: Path, workflows: dict[str, dict]) -> dict:
    # A fresh user: mark the first-run tutorial as done so no template browser covers the graph,
    # and keep node text drawn at any zoom (no low-detail boxes in the screenshots).
    status, body = srv._request("POST", "/settings", UI_SETTINGS)
    assert status == 200, f"POST /settings: HTTP {status}: {body}"
    browser = await Chromium(binary).start()
    try:
        await browser.navigate(srv.url + "/")
        await browser.wait_for(APP_READY, 90, "the ComfyUI app (window.app, LiteGraph, graph canvas)")
        await browser.call(INSTALL_HOOK)
        result = {
            "frontend": await browser.eval("window.__COMFYUI_FRONTEND_VERSION__ || null"),
            "pack_unregistered": await browser.call(UNREGISTERED, list(PACK_NODE_TYPES)),
            "workflows": {},
        }
        for name, wf in workflows.items():
            # A dialog still closing swallows the next one with the same key: wait until none is left.
            await browser.wait_for(f"({CLOSE_DIALOGS})()", 15, "earlier dialogs to close")
            res = await browser.call(LOAD_WORKFLOW, wf, name + ".json", timeout=120)
            await asyncio.sleep(0.5)  # let the canvas and dialogs paint
            res["dialog_text"] = await browser.call(DIALOG_TEXT)
            if res["unregistered"] and not res["dialog_text"].strip():
                try:  # the app's missing-nodes dialog (or toast) is expected: give it time to show its text
                    res["dialog_text"] = await browser.wait_for(f"({DIALOG_TEXT})().trim()", 10, "a dialog")
                except CDPError:
                    pass
            res["screenshot"] = str(await browser.screenshot(ARTIFACTS / f"{name}.png"))
            result["workflows"][name] = res
        result["console"] = browser.console[-40:]
        return result
    finally:
        await browser.close()


@pytest.fixture(scope="module")
def browser_result():
    binary = ensure_chromium()
    workflows = {"lorarar-pack-nodes": pack_workflow()}
    for path in EXAMPLES:
        workflows["example-" + path.stem] = json.loads(path.read_text())
    workflows["negative-control-" + FAKE_NODE_TYPE] = fake_node_workflow()  # last: leaves a dialog open
    with tempfile.TemporaryDirectory(prefix="lorarar-browser-") as tmp, \
            ComfyServer(ensure_models(), workflow_files(Path(tmp), workflows), input_dir=Path(tmp) / "input") as srv:
        try:
            return _run(_browser_check(srv, binary, workflows))
        except CDPError as e:
            pytest.fail(f"browser check failed: {e}\n{srv.log_tail(30)}", pytrace=False)


def workflow_files(root: Path, workflows: dict[str, dict]) -> Path:
    """A models root (and ``root/input``) holding every file the workflows name, as links to the synthetic
    models and LoRAs or small PNGs: the current frontend marks nodes whose combo files the server lacks,
    and a workflow must load without any node error on both hosts."""
    synthetic = ensure_models()
    checkpoint = next((synthetic / "checkpoints").glob("*.safetensors"))
    lora = next((synthetic / "loras").glob("*.safetensors"), None) or _a_lora(root)
    targets = {"CheckpointLoaderSimple": ("checkpoints", checkpoint), "LoraRarMerge": ("loras", lora),
               "LoraRarCompare": ("loras", lora),
               "LoadImage": ("input", None)}
    for wf in workflows.values():
        for node in wf.get("nodes", []):
            folder, source = targets.get(node["type"], (None, None))
            for value in node.get("widgets_values") or []:
                if folder and isinstance(value, str) and value.endswith((".safetensors", ".png")):
                    path = root / folder / value
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if path.exists():
                        continue
                    if source is None:
                        Image.new("RGB", (64, 64), (120, 160, 200)).save(path)
                    else:
                        path.symlink_to(source)
    return root


def _a_lora(root: Path) -> Path:
    from hypernet.base_models import UNetLayout
    from devkit.loras import random_lora, write_lora
    from devkit.synthetic_models import UNET_CONFIG

    layout = UNetLayout.from_unet_config("synthetic", UNET_CONFIG)
    return write_lora(root / "source_lora.safetensors", random_lora(layout, rank=4, seed=7))


def _explain(res: dict, console) -> str:
    return json.dumps({k: v for k, v in res.items() if k != "dialog_text"}, indent=1) \
        + "\n---- browser console ----\n" + "\n".join(console)


def test_pack_node_types_registered_in_frontend(browser_result):
    assert browser_result["pack_unregistered"] == [], (
        f"the served UI lacks the pack's node types {browser_result['pack_unregistered']}")


def test_pack_workflow_has_no_missing_nodes(browser_result):
    res = browser_result["workflows"]["lorarar-pack-nodes"]
    assert res["hooked"] and res["app_missing"] is not None, _explain(res, browser_result["console"])
    assert set(PACK_NODE_TYPES) <= set(res["types"])
    assert res["app_missing"] == [] and res["unregistered"] == [], _explain(res, browser_result["console"])
    assert res["graph_nodes"] == 4 and res["error_nodes"] == []
    assert Path(res["screenshot"]).stat().st_size > 10_000


@pytest.mark.parametrize("path", EXAMPLES or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"no *.json in {EXAMPLES_DIR} yet"))], ids=lambda p: p.stem if p else "none")
def test_example_workflow_has_no_missing_nodes(browser_result, path):
    res = browser_result["workflows"]["example-" + path.stem]
    assert res["hooked"] and res["app_missing"] is not None, _explain(res, browser_result["console"])
    assert res["types"], f"{path.name} has no nodes"
    assert res["app_missing"] == [], (
        f"{path.name}: the UI reports missing node types {res['app_missing']}\n"
        + _explain(res, browser_result["console"]))
    assert res["unregistered"] == [], (
        f"{path.name}: node types not registered in the frontend {res['unregistered']}\n"
        + _explain(res, browser_result["console"]))
    assert res["error_nodes"] == [], (
        f"{path.name}: the UI marks nodes with errors {res['error_nodes']} (files it names are on the server)\n"
        + _explain(res, browser_result["console"]))
    assert Path(res["screenshot"]).stat().st_size > 10_000


def test_negative_control_fake_node_is_reported_missing(browser_result):
    res = browser_result["workflows"]["negative-control-" + FAKE_NODE_TYPE]
    assert res["hooked"], _explain(res, browser_result["console"])
    assert res["app_missing"] == [FAKE_NODE_TYPE], _explain(res, browser_result["console"])
    assert res["unregistered"] == [FAKE_NODE_TYPE], _explain(res, browser_result["console"])
    assert FAKE_NODE_TYPE in res["dialog_text"]
    assert res["error_nodes"] == [FAKE_NODE_TYPE]
