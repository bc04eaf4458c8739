"""Start a real ComfyUI server (the host installed by scripts/setup_host.sh) for end-to-end tests.

    from devkit.comfy_server import ComfyServer
    from devkit.synthetic_models import ensure_models

    with ComfyServer(ensure_models()) as srv:
        pid = srv.queue_prompt(graph)            # raises PromptRejected on HTTP 400
        entry = srv.wait(pid, timeout=300)       # the /history/<id> entry
        pngs = srv.output_files(entry)

The server runs ``<python> <ComfyUI>/main.py --cpu --listen 127.0.0.1 --port <free port>
--disable-api-nodes`` with its own extra_model_paths YAML, output/input/temp/user folders and
sqlite database in a private temp dir, so several servers can run side by side and nothing is
written into the ComfyUI checkout. The frontend is served from the installed
comfyui-frontend-package (ComfyUI's default). stdout+stderr go to ``<tmp>/comfyui.log``.
The process (and its process group) is always killed on ``stop()``/exit, and at interpreter exit.

Standard library only (urllib, subprocess, socket).

Paths: ComfyUI at env ``LORARAR_COMFY``, python at env ``LORARAR_PYTHON``; by default the host whose python
runs this code, else the default host of devkit/hosts.json (see synthetic_models.comfy_root).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from devkit.synthetic_models import comfy_root, host_python  # one place for the host's paths

REPO = Path(__file__).resolve().parents[1]
# Test-only node packs (devkit/comfy_nodes/README.md): registered as a custom_nodes folder with test_nodes=True.
TEST_NODES = REPO / "devkit" / "comfy_nodes"
PACK_LINK = "ComfyUI-LoRA.rar"  # the host's custom_nodes entry scripts/setup_host.sh links to the checkout
PACK_UNDER_TEST = "lorarar_pack_under_test"  # the name REPO is loaded under when that link points elsewhere

# Model folder types mapped to the same-named subfolder of every models root.
STANDARD_FOLDERS = (
    "checkpoints", "vae", "vae_approx", "loras", "embeddings", "text_encoders", "clip",
    "diffusion_models", "unet", "clip_vision", "controlnet", "upscale_models", "hypernetworks",
    "style_models", "model_patches",
)


def link_pack_under_test(comfy: Path, folder: Path) -> Path | None:
    """When the host's ``custom_nodes/ComfyUI-LoRA.rar`` links to another checkout than REPO (a git worktree's
    run), link REPO as ``folder/lorarar_pack_under_test`` and return ``folder`` (a custom_nodes folder holding this
    checkout's pack only); None when the host's link already is REPO. The caller then loads custom nodes with
    ``--disable-all-custom-nodes --whitelist-custom-nodes lorarar_pack_under_test`` (and ``folder`` registered as a
    custom_nodes folder), so the nodes under test are this checkout's, never a half-edited other one's."""
    if (Path(comfy) / "custom_nodes" / PACK_LINK).resolve() == REPO.resolve():
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / PACK_UNDER_TEST).exists():
        (folder / PACK_UNDER_TEST).symlink_to(REPO, target_is_directory=True)
    return folder


def load_pack_in_process(nodes, folder_paths, args, comfy: Path, folder: Path) -> None:
    """``nodes.init_extra_nodes`` for an in-process ComfyUI (``args``: comfy.cli_args.args), loading this checkout's
    pack even when the host's link names another checkout (link_pack_under_test)."""
    import asyncio

    redirected = link_pack_under_test(comfy, folder)
    if redirected is not None:
        folder_paths.add_model_folder_path("custom_nodes", str(redirected))
        args.disable_all_custom_nodes = True
        args.whitelist_custom_nodes = [PACK_UNDER_TEST]
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))


def in_process_host(loras: Path, weights: Path, work: Path):
    """ComfyUI imported in this process, on the CPU, with this checkout's pack loaded (as the server loads it) and ``loras`` /
    ``weights`` registered as its LoRA and hypernet folders; returns ComfyUI's ``nodes`` module. ``work``: where a
    custom_nodes folder for this checkout's pack goes when the host links another checkout."""

    root = comfy_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import utils.extra_config  # noqa: F401  (before nodes, as main.py does)
    import folder_paths
    import nodes

    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    folder_paths.add_model_folder_path("lorarar", str(weights))
    load_pack_in_process(nodes, folder_paths, comfy.cli_args.args, root, Path(work) / "custom_nodes")
    if "LoraRarMerge" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError("the pack did not load into ComfyUI (no LoraRarMerge node); see the log above")
    return nodes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class ComfyServerError(RuntimeError):
    """The server failed to start, died, or did not answer in time (message has the log tail)."""


class PromptRejected(RuntimeError):
    """POST /prompt answered an HTTP error (400: validation failed). ``body`` is the JSON answer."""

    def __init__(self, status: int, body):
        self.status = status
        self.body = body
        self.node_errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
        self.error = body.get("error") if isinstance(body, dict) else body
        super().__init__(f"HTTP {status} from /prompt: {json.dumps(body)[:4000]}")


class ExecutionFailed(RuntimeError):
    """The prompt ran but its history entry says status_str == 'error'."""

    def __init__(self, entry: dict):
        self.entry = entry
        msgs = entry.get("status", {}).get("messages", [])
        errors = [m[1] for m in msgs if m and m[0] == "execution_error"]
        super().__init__(f"prompt failed: {json.dumps(errors)[:4000] if errors else entry.get('status')}")


class ComfyServer:
    """A ComfyUI server in a subprocess. Use as a context manager, or call start()/stop().

    models_dir, *extra_models_dirs: ComfyUI models-folder roots (subfolders checkpoints/, vae/,
        vae_approx/, loras/, ... ); every standard folder type, and every other subfolder that
        exists at start, is registered from each root through an extra_model_paths YAML.
    folders: extra {folder_type: path or [paths]} entries (e.g. {"loras": tmp_path}).
    output_dir / input_dir: default to folders in the server's private temp dir.
    extra_args: more main.py flags (e.g. ["--disable-all-custom-nodes"]).
    test_nodes: also load the test-only node packs of devkit/comfy_nodes (e.g. LoraRarTestConditioning), through
        the YAML's ``custom_nodes:`` entry, so the host's ComfyUI tree is not touched.

    The pack the server runs is always this checkout's (REPO): the host's ``custom_nodes/ComfyUI-LoRA.rar`` links
    to the checkout that installed the host, so a test run from another one (a git worktree) would otherwise
    exercise that checkout's nodes. When the link points elsewhere, REPO is linked into the private temp dir as
    ``lorarar_pack_under_test`` and main.py gets ``--disable-all-custom-nodes --whitelist-custom-nodes`` naming it
    and the packs of the ``custom_nodes`` folders given here (the host's own link is then skipped). Not done when
    ``extra_args`` already holds ``--disable-all-custom-nodes``.
    """

    def __init__(self, models_dir=None, *extra_models_dirs, folders: dict | None = None,
                 output_dir=None, input_dir=None, extra_args=(), env: dict | None = None,
                 startup_timeout: float = 60.0, comfy: str | os.PathLike | None = None,
                 python: str | os.PathLike | None = None, keep_tmp: bool = False,
                 port: int | None = None, test_nodes: bool = False):
        self.models_dirs = [Path(d).resolve() for d in (models_dir, *extra_models_dirs) if d]
        self.folders = {k: ([v] if isinstance(v, (str, os.PathLike)) else list(v))
                        for k, v in (folders or {}).items()}
        if test_nodes:
            self.folders.setdefault("custom_nodes", []).append(TEST_NODES)
        self.comfy = Path(comfy) if comfy else comfy_root()
        self.python = Path(python) if python else host_python()
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.keep_tmp = keep_tmp
        self.client_id = uuid.uuid4().hex
        self.tmp: Path | None = None
        self._output_dir = output_dir
        self._input_dir = input_dir
        self.output_dir: Path | None = None
        self.input_dir: Path | None = None
        self.log_path: Path | None = None
        self.port: int | None = None
        self._fixed_port = port
        self.proc: subprocess.Popen | None = None
        self._log_fh = None
        self._final_log = ""
        self._pack_args: list[str] = []

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_yaml(self) -> Path:
        lines = []

        def block(name, entries):
            lines.append(f"{name}:")
            for folder_type, paths in entries:
                lines.append(f"  {folder_type}: |")
                lines.extend(f"    {p}" for p in paths)

        for i, root in enumerate(self.models_dirs):
            types = list(STANDARD_FOLDERS)
            if root.is_dir():
                types += sorted(p.name for p in root.iterdir()
                                if p.is_dir() and not p.name.startswith(".") and p.name not in types)
            block(f"lorarar_models_{i}", [(t, [root / t]) for t in types])
        folders = self._folders()
        if folders:
            # is_default: these folders come first, so files saved "into the loras folder" land here
            lines.append("lorarar_folders:")
            lines.append("  is_default: true")
            for folder_type, paths in folders.items():
                lines.append(f"  {folder_type}: |")
                lines.extend(f"    {Path(p).resolve()}" for p in paths)
        path = self.tmp / "extra_model_paths.yaml"
        path.write_text("\n".join(lines) + "\n" if lines else "{}\n")
        return path

    def command(self) -> list[str]:
        cmd = [str(self.python), str(self.comfy / "main.py"),
               "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-api-nodes",
               "--output-directory", str(self.output_dir),
               "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.tmp),          # ComfyUI uses <this>/temp
               "--user-directory", str(self.tmp / "user"),
               "--database-url", f"sqlite:///{self.tmp / 'comfyui.db'}"]
        if self.models_dirs or self._folders():
            cmd += ["--extra-model-paths-config", str(self.tmp / "extra_model_paths.yaml")]
        return cmd + self._pack_args + self.extra_args

    def _folders(self) -> dict:
        """The YAML's folders: ``folders``, and the folder holding this checkout's pack when it is redirected."""
        if not self._pack_args:
            return self.folders
        custom_nodes = [*self.folders.get("custom_nodes", []), self.tmp / "pack"]
        return {**self.folders, "custom_nodes": custom_nodes}

    def _redirect_pack(self) -> None:
        """Load the pack from REPO when the host's link names another checkout (see the class docstring)."""
        self._pack_args = []
        if "--disable-all-custom-nodes" in self.extra_args or link_pack_under_test(self.comfy, self.tmp / "pack") is None:
            return
        names = [PACK_UNDER_TEST]
        for folder in self.folders.get("custom_nodes", []):
            names += sorted(p.name for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
        self._pack_args = ["--disable-all-custom-nodes", "--whitelist-custom-nodes", *names]

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            raise ComfyServerError("already started")
        if not (self.comfy / "main.py").is_file():
            raise ComfyServerError(f"no ComfyUI at {self.comfy} (run scripts/setup_host.sh)")
        if not self.python.exists():
            raise ComfyServerError(f"no python at {self.python} (run scripts/setup_host.sh)")
        self.tmp = Path(tempfile.mkdtemp(prefix="lorarar-comfy-"))
        (self.tmp / "user").mkdir()
        self.output_dir = Path(self._output_dir or self.tmp / "output").resolve()
        self.input_dir = Path(self._input_dir or self.tmp / "input").resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.input_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.tmp / "comfyui.log"
        self._redirect_pack()
        if self.models_dirs or self._folders():
            self._write_yaml()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DO_NOT_TRACK": "1",
               "HF_HUB_OFFLINE": "1", **self.env}
        if self._fixed_port and not port_is_free(self._fixed_port):
            raise ComfyServerError(f"port {self._fixed_port} is taken by another process: choose another port "
                                   "(or none, and a free one is picked)")
        try:
            for attempt in range(3):  # a free port can be taken between probe and bind
                self.port = self._fixed_port or free_port()
                self._log_fh = open(self.log_path, "ab")
                self.proc = subprocess.Popen(self.command(), cwd=str(self.comfy), env=env,
                                             stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                             stderr=subprocess.STDOUT, start_new_session=True)
                _LIVE.add(self)
                try:
                    self._wait_ready()
                    return self
                except ComfyServerError:
                    in_use = "address already in use" in self.log_text().lower()
                    self._kill()
                    if not in_use or attempt == 2 or self._fixed_port:
                        raise
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ComfyServerError(
                    f"ComfyUI exited with {self.proc.returncode} during startup\n{self.log_tail()}")
            try:
                status, stats = self._request("GET", "/system_stats", timeout=2)
                if status == 200 and self._is_ours(stats):
                    return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ComfyServerError(
                    f"ComfyUI did not answer /system_stats within {self.startup_timeout:.0f} s\n"
                    f"{self.log_tail()}")
            time.sleep(0.25)

    def _is_ours(self, stats) -> bool:
        """True when the server answering on our port is the process we started: its argv names our private
        temp dir. Another server that took the port meanwhile is never talked to."""
        argv = stats.get("system", {}).get("argv", []) if isinstance(stats, dict) else []
        return any(str(self.tmp) in str(arg) for arg in argv)

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                    try:
                        os.killpg(proc.pid, sig)  # its own session: pgid == pid
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            else:
                # The main process is gone; make sure no child of its group lingers.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def stop(self) -> None:
        self._kill()
        _LIVE.discard(self)
        if self.tmp is not None and not self.keep_tmp:
            # Keep the log readable after stop(): move it aside before removing the rest.
            if self.log_path is not None and self.log_path.exists():
                self._final_log = self.log_path.read_text(errors="replace")
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------------- logs

    def log_text(self) -> str:
        if self.log_path is not None and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return self._final_log

    def log_tail(self, n: int = 60) -> str:
        lines = self.log_text().splitlines()
        return "---- ComfyUI log tail ----\n" + "\n".join(lines[-n:])

    # ---------------------------------------------------------------- HTTP

    def _request(self, method: str, path: str, body=None, timeout: float = 30):
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw = e.read()
            status = e.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30):
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyServerError(f"GET {path}: HTTP {status}: {body}")
        return body

    def system_stats(self) -> dict:
        return self.get("/system_stats")

    def object_info(self, node_class: str | None = None) -> dict:
        if node_class:
            return self.get("/object_info/" + urllib.parse.quote(node_class), timeout=60)
        return self.get("/object_info", timeout=120)

    def submit(self, graph: dict, extra_data: dict | None = None):
        """POST /prompt; returns (http_status, json_body) without raising."""
        payload = {"prompt": graph, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        return self._request("POST", "/prompt", payload, timeout=60)

    def queue_prompt(self, graph: dict, extra_data: dict | None = None) -> str:
        """Queue an API-format graph; returns its prompt_id. Raises PromptRejected on HTTP errors
        (400 with ``node_errors`` when validation fails)."""
        status, body = self.submit(graph, extra_data)
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        body = self.get("/history/" + urllib.parse.quote(prompt_id))
        return (body or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300, poll: float = 0.2,
             check: bool = False) -> dict:
        """Poll GET /history/<id> until the prompt finished; return its history entry
        (keys: prompt, outputs, status{status_str, completed, messages}, meta).
        check=True raises ExecutionFailed when status_str is 'error'."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                st = entry.get("status") or {}
                if st.get("completed") or st.get("status_str") in ("success", "error"):
                    if check and st.get("status_str") == "error":
                        raise ExecutionFailed(entry)
                    return entry
            if not self.running:
                raise ComfyServerError(f"ComfyUI died while running {prompt_id}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} not finished after {timeout:.0f} s\n"
                                       f"{self.log_tail()}")
            time.sleep(poll)

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """queue_prompt + wait(check=True)."""
        return self.wait(self.queue_prompt(graph), timeout=timeout, check=True)

    def output_files(self, entry: dict, kind: str = "images") -> list[Path]:
        """Files listed under outputs[*][kind] of a history entry (type 'output' or 'temp')."""
        files = []
        for node_out in (entry.get("outputs") or {}).values():
            for item in node_out.get(kind, []) or []:
                base = self.output_dir if item.get("type", "output") == "output" else self.tmp / "temp"
                files.append(Path(base) / item.get("subfolder", "") / item["filename"])
        return files


_LIVE: set = set()


@atexit.register
def _kill_leftovers() -> None:
    for srv in list(_LIVE):
        try:
            srv.stop()
        except Exception:
            pass
