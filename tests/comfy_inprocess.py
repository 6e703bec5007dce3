"""Run API-format workflows through ComfyUI's real executor, in this process (no HTTP server).

Used by the tests when ``COMFYUI_ROOT`` points at a ComfyUI checkout (0.3.64 verified). The
recipe follows research/comfyui.md §6h: parse ``--cpu`` before ComfyUI reads its arguments,
import ``utils.extra_config`` before ``nodes``, load the built-in nodes and then this pack
through ComfyUI's own custom-node loader (from a folder named ``editkit`` that links to the
repository, so the module name does not depend on where the repository was cloned), then
``execution.validate_prompt`` and ``execution.PromptExecutor``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_FOLDERS = ("diffusers", "diffusion_models", "vae", "text_encoders", "background_removal", "clip_vision",
                 "style_models")


class _StubServer:
    """What PromptExecutor needs from PromptServer when nobody listens."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.events: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))


@dataclass
class ComfyRun:
    success: bool
    ui: dict  # node id -> ui outputs (history "outputs")
    messages: list  # (event, data) status messages: execution_start, execution_error, ...
    executor: object

    def output(self, node_id: str, slot: int = 0):
        """A node's raw output value (first list item), from the executor's cache."""
        return self.executor.caches.outputs.get(node_id)[slot][0]

    def error(self) -> dict | None:
        for event, data in self.messages:
            if event in ("execution_error", "execution_interrupted"):
                return {"event": event, **data}
        return None


class ComfyInProcess:
    """One ComfyUI instance per process (ComfyUI keeps global state), with EditKit loaded."""

    _instance: ComfyInProcess | None = None

    @classmethod
    def get(cls, comfy_root: str | os.PathLike) -> ComfyInProcess:
        if cls._instance is None:
            cls._instance = cls(Path(comfy_root))
        return cls._instance

    def __init__(self, comfy_root: Path):
        if not (comfy_root / "execution.py").is_file():
            raise RuntimeError(f"COMFYUI_ROOT={comfy_root} is not a ComfyUI checkout (no execution.py)")
        self.scratch = Path(tempfile.mkdtemp(prefix="editkit-comfy-"))
        sys.path.insert(0, str(comfy_root))
        saved_argv = sys.argv
        sys.argv = [str(comfy_root / "main.py"), "--cpu", "--disable-api-nodes"]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            # isort: off
            import utils.extra_config  # noqa: F401  (must precede "import nodes", research §6h)
            import comfy.utils
            import execution
            import folder_paths
            import nodes

            # isort: on
        finally:
            sys.argv = saved_argv
        self.execution = execution
        self.folder_paths = folder_paths
        self.nodes = nodes
        self.comfy_utils = comfy.utils
        folder_paths.set_output_directory(str(self.scratch / "output"))
        folder_paths.set_temp_directory(str(self.scratch / "temp"))
        # An empty input folder at start-up, as on a fresh install: the pack copies its example pictures there.
        self.startup_input_dir = self.scratch / "input"
        folder_paths.set_input_directory(str(self.startup_input_dir))
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        custom = self.scratch / "custom_nodes"
        custom.mkdir()
        (custom / "editkit").symlink_to(ROOT, target_is_directory=True)
        before = set(nodes.NODE_CLASS_MAPPINGS)
        ok = asyncio.run(nodes.load_custom_node(str(custom / "editkit"), ignore=before, module_parent="custom_nodes"))
        if not ok:
            raise RuntimeError("ComfyUI failed to import the EditKit pack (see the log above)")
        self.pack_nodes = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
        self.pack_module_name = str(custom / "editkit").replace(".", "_x_")  # how ComfyUI names it
        self.progress: list[tuple[int, int, bool]] = []
        comfy.utils.set_progress_bar_global_hook(self._on_progress)

    def _on_progress(self, value, total, preview, node_id=None):
        self.progress.append((value, total, preview is not None))

    def use_models(self, models_root: Path) -> None:
        """Make ``models_root`` (a ComfyUI-style tree) the first place every model folder is searched."""
        for name in MODEL_FOLDERS:
            self.folder_paths.add_model_folder_path(name, str(models_root / name), is_default=True)
        for name in ("diffusion_models", "vae", "text_encoders", "background_removal"):
            self.folder_paths.filename_list_cache.pop(name, None)

    def use_inputs(self, input_dir: Path) -> None:
        self.folder_paths.set_input_directory(str(input_dir))

    def pack_submodule(self, name: str):
        """A module of the pack as ComfyUI loaded it, e.g. ``nodes.comfy_bridge``."""
        import importlib

        return importlib.import_module(f"{self.pack_module_name}.{name}")

    def node_class(self, name: str):
        return self.nodes.NODE_CLASS_MAPPINGS[name]

    def validate(self, prompt: dict):
        """ComfyUI's own validation: (ok, error, outputs, node_errors)."""
        return asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict) -> ComfyRun:
        ok, error, outputs, node_errors = self.validate(prompt)
        if not ok:
            raise AssertionError(f"ComfyUI rejected the workflow: {error} {node_errors}")
        server = _StubServer()
        executor = self.execution.PromptExecutor(server, cache_type=self.execution.CacheType.CLASSIC)
        self.progress.clear()
        executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
        ui = executor.history_result.get("outputs", {}) if executor.success else {}
        return ComfyRun(executor.success, ui, list(executor.status_messages), executor)

    def output_dir(self) -> Path:
        return Path(self.folder_paths.get_output_directory())
