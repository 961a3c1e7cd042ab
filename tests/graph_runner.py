"""Stage 2 of the tests' in-process ComfyUI host: ComfyUI itself, and graphs run through it.

Nothing here imitates ComfyUI: the tree is ComfyUI 0.3.75 itself (see ``scripts/get-comfyui``),
its built-in nodes are loaded the way ``main.py`` loads them, and graphs run through its own
``execution.PromptExecutor`` after its own ``execution.validate_prompt``. Two small nodes in
``tests/host_nodes.py`` (a zero text conditioning, because the synthetic model has no text
encoder, and an output node that hands a value back to the test) are the only additions, loaded
through ComfyUI's own ``nodes.load_custom_node``.

``get_comfy_host()`` / the ``comfy_host`` fixture is the ~3-8 s part: imports ``comfy.sd``,
``nodes``, ``execution``, ``server``; loads the built-in extra nodes; constructs a
``server.PromptServer`` (never started) so that ``PromptServer.instance`` exists for packs that
register routes at import; loads the test helper nodes. Model folders, input, output, temp and
user directories all live under the per-session temp dir of :func:`host_boot.prepare_early`.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from host_boot import COMFYUI_VERSION, REPO_ROOT, SETUP_HINT, TESTS_DIR, prepare_early
from model_builders import SD15_TE_PREFIX, SD15_UNET_PREFIX, SD15_VAE_PREFIX

HOST_NODES_FILE = TESTS_DIR / "host_nodes.py"

# Node type names of the test helper nodes in tests/host_nodes.py.
ZERO_COND_NODE = "LoraxTestZeroConditioning"
CAPTURE_NODE = "LoraxTestCapture"


def _clean_nodes_module() -> None:
    """Fail clearly if the pack's own ``nodes/`` package took the name ComfyUI needs."""
    mod = sys.modules.get("nodes")
    if mod is None:
        return
    f = getattr(mod, "__file__", None) or ""
    if f.endswith("nodes.py"):
        return
    raise RuntimeError(
        f"`nodes` is already imported from {f or mod!r}, which is not ComfyUI's nodes.py. "
        "The pack's own nodes/ package must not be imported as top-level `nodes` in a "
        "process that hosts ComfyUI: load the pack with host.load_pack() and use its "
        "module, or import the library as `lorax`."
    )


# --------------------------------------------------------------------------------------
# Stage 2: the host itself.
# --------------------------------------------------------------------------------------


class ComfyExecutionError(AssertionError):
    """A prompt failed validation or execution in ComfyUI; ``details`` holds ComfyUI's message."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class ComfyHost:
    """The in-process ComfyUI: modules, folders and helpers. Get it with ``get_comfy_host()``."""

    def __init__(self, tree: Path, base_dir: Path):
        self.tree = tree
        self.base_dir = base_dir
        self._packs: dict[str, dict[str, type]] = {}
        self._bootstrap()

    # -- setup ---------------------------------------------------------------------
    def _bootstrap(self) -> None:
        _clean_nodes_module()
        import folder_paths
        import utils.extra_config  # noqa: F401  (ComfyUI's utils/ package, before nodes.py puts comfy/ on sys.path)
        import comfy.model_management
        import comfy.sd
        import comfy.utils
        import comfy.model_patcher
        import execution
        import nodes
        import server

        self.folder_paths = folder_paths
        self.comfy = sys.modules["comfy"]
        self.model_management = comfy.model_management
        self.execution = execution
        self.nodes = nodes
        self.server_module = server

        # Folders, created so ComfyUI's listings find them.
        models = Path(folder_paths.models_dir)
        self.folders = {
            "checkpoints": models / "checkpoints",
            "diffusion_models": models / "diffusion_models",
            "loras": models / "loras",
            "vae": models / "vae",
            "text_encoders": models / "text_encoders",
            "custom_nodes": self.base_dir / "custom_nodes",
            "input": Path(folder_paths.get_input_directory()),
            "output": Path(folder_paths.get_output_directory()),
            "temp": Path(folder_paths.get_temp_directory()),
            "user": Path(folder_paths.get_user_directory()),
        }
        for p in self.folders.values():
            p.mkdir(parents=True, exist_ok=True)
        for name in ("checkpoints", "diffusion_models", "loras"):
            paths = [Path(p).resolve() for p in folder_paths.get_folder_paths(name)]
            if self.folders[name].resolve() not in paths:
                raise RuntimeError(f"ComfyUI's {name} folder is not under the session temp dir: {paths}")

        # Built-in extra nodes, as main.py loads them (no API nodes: they only call web
        # services; no external custom nodes folder: packs are loaded explicitly).
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))

        # A real PromptServer (never started), so that PromptServer.instance exists for
        # packs that register routes, and so the executor talks to the real class.
        self.loop = asyncio.new_event_loop()
        self.server = server.PromptServer(self.loop)

        self.load_pack(HOST_NODES_FILE)
        for n in (ZERO_COND_NODE, CAPTURE_NODE):
            if n not in nodes.NODE_CLASS_MAPPINGS:
                raise RuntimeError(f"test helper node {n} did not register")

    # -- packs ---------------------------------------------------------------------
    def load_pack(self, path: str | os.PathLike = REPO_ROOT, *, force: bool = False) -> dict[str, type]:
        """Load a custom node pack (folder with ``__init__.py``, or a ``.py`` file) the way
        ComfyUI does: ``nodes.load_custom_node(path, module_parent="custom_nodes")``.

        Returns the ``{node type: class}`` entries the pack registered. Raises
        AssertionError with ComfyUI's logged traceback when ComfyUI reports failure.
        Cached per path unless ``force``, which imports the pack afresh, as a new ComfyUI
        process would: its modules are dropped from ``sys.modules`` first (re-executing only
        its ``__init__.py`` would give a package object without its submodule attributes).
        """
        path = str(Path(path).resolve())
        if path in self._packs and not force:
            return self._packs[path]
        if force:
            key = self._module_key(path)
            for name in [m for m in sys.modules if m == key or m.startswith(key + ".")]:
                del sys.modules[name]
        records: list[str] = []

        class _Grab(logging.Handler):
            def emit(self, record):
                records.append(self.format(record))

        grab = _Grab(level=logging.WARNING)
        root = logging.getLogger()
        root.addHandler(grab)
        try:
            ok = asyncio.run(self.nodes.load_custom_node(path, module_parent="custom_nodes"))
        finally:
            root.removeHandler(grab)
        if not ok:
            raise AssertionError(f"ComfyUI could not load the custom node pack {path}:\n" + "\n".join(records))
        # What the pack itself declares and the host now serves.
        declared = self.declared_nodes(self.pack_module(path))
        added = {k: v for k, v in declared.items() if self.nodes.NODE_CLASS_MAPPINGS.get(k) is v}
        self._packs[path] = added
        return added

    @staticmethod
    def declared_nodes(module) -> dict[str, type]:
        """``{node id: class}`` a loaded pack declares: its ``NODE_CLASS_MAPPINGS`` (V1), else the
        node list of the ``ComfyExtension`` its ``comfy_entrypoint`` returns (V3, asked again here
        as ComfyUI asked it; the classes are the module's own, so they are the ones registered)."""
        mapping = getattr(module, "NODE_CLASS_MAPPINGS", None)
        if mapping is not None:
            return dict(mapping)
        entry = getattr(module, "comfy_entrypoint", None)
        if entry is None:
            return {}

        async def ask():
            extension = entry()
            if asyncio.iscoroutine(extension):
                extension = await extension
            return await extension.get_node_list()

        return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(ask())}

    def pack_module(self, path: str | os.PathLike = REPO_ROOT):
        """The module object ComfyUI made for a loaded pack (``sys.modules`` key is the path)."""
        return sys.modules[self._module_key(str(Path(path).resolve()))]

    @staticmethod
    def _module_key(path: str) -> str:
        """The ``sys.modules`` name ``nodes.load_custom_node`` gives a pack at ``path``."""
        return path.replace(".", "_x_") if os.path.isdir(path) else os.path.splitext(path)[0]

    # -- running graphs ------------------------------------------------------------
    def new_executor(self):
        """A fresh ``execution.PromptExecutor`` (classic cache, as ComfyUI's default).

        The executor has no public constructor helper, so this is the one private call the tests
        make; ``cache_args`` carries every key any supported host reads (0.3.75 reads ``lru`` and
        ``ram``; 0.33 also ``ram_inactive`` on every execution), zero meaning "no RAM headroom"."""
        return self.execution.PromptExecutor(self.server, cache_type=False,
                                             cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    def run_prompt(self, prompt: Mapping[str, Any], *, executor=None,
                   outputs: Sequence[str] | None = None) -> dict[str, dict[str, list]]:
        """Validate and execute an API-format prompt with ComfyUI's own code.

        ``prompt`` is ``{node_id: {"class_type": ..., "inputs": {...}}}`` with links as
        ``[node_id, output_index]``. Output nodes (``OUTPUT_NODE = True``) are executed
        (only those in ``outputs`` if given), exactly like a queued prompt. Returns each
        executed output node's UI dict (``history["outputs"]``), e.g.
        ``run_prompt(p)["cap"]["value"][0]`` for a ``LoraxTestCapture`` node ``"cap"``.

        A fresh executor is used per call unless ``executor`` (see ``new_executor``) is
        passed, which keeps ComfyUI's node output cache between runs.
        Raises ``ComfyExecutionError`` (an AssertionError) with ComfyUI's message.
        """
        execution = self.execution
        prompt = copy.deepcopy(dict(prompt))
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, list(outputs) if outputs else None))
        if not valid[0]:
            err = valid[1] or {}
            lines = [f"ComfyUI rejected the prompt: {err.get('message')}: {err.get('details')}"]
            for nid, ne in (valid[3] or {}).items():
                for e in ne.get("errors", []):
                    lines.append(f"  node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
            raise ComfyExecutionError("\n".join(lines), {"error": err, "node_errors": valid[3]})
        ex = executor if executor is not None else self.new_executor()
        try:
            ex.execute(prompt, prompt_id, {}, valid[2])
        finally:
            self._drain_server_messages()
        if not ex.success:
            msgs = [d for (ev, d) in ex.status_messages if ev in ("execution_error", "execution_interrupted")]
            d = msgs[-1] if msgs else {}
            tb = "".join(d.get("traceback") or [])
            raise ComfyExecutionError(
                f"ComfyUI execution failed in node {d.get('node_id')} ({d.get('node_type')}): "
                f"{d.get('exception_type')}: {d.get('exception_message')}\n{tb}",
                d,
            )
        return ex.history_result["outputs"]

    def _drain_server_messages(self) -> None:
        # PromptServer.send_sync queues callbacks on its (never started) loop; run them
        # and drop the messages so nothing accumulates across runs.
        try:
            self.loop.run_until_complete(asyncio.sleep(0))
            q = self.server.messages
            while not q.empty():
                q.get_nowait()
        except Exception:
            pass

    # -- files ---------------------------------------------------------------------
    def _save(self, folder: str, sd: Mapping[str, Any], name: str, metadata: dict | None) -> str:
        from safetensors.torch import save_file

        path = self.folders[folder] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
        return name

    def save_unet(self, sd: Mapping[str, Any], name: str = "mini_sd15.safetensors",
                  metadata: dict | None = None) -> str:
        """Save a UNet state dict (ComfyUI's key names) into ``diffusion_models``; returns
        the ``unet_name`` for ``UNETLoader``."""
        return self._save("diffusion_models", sd, name, metadata)

    def save_checkpoint(self, sd: Mapping[str, Any], name: str = "mini_sd15_ckpt.safetensors",
                        metadata: dict | None = None) -> str:
        """Save as a checkpoint (keys prefixed ``model.diffusion_model.``, no VAE/CLIP) into
        ``checkpoints``; returns the ``ckpt_name`` for ``CheckpointLoaderSimple``."""
        return self._save("checkpoints", {"model.diffusion_model." + k: v for k, v in sd.items()}, name, metadata)

    def save_lora(self, sd: Mapping[str, Any], name: str = "test_lora.safetensors",
                  metadata: dict | None = None) -> str:
        """Save a LoRA state dict into ``loras``; returns the ``lora_name``."""
        return self._save("loras", sd, name, metadata)

    # -- models --------------------------------------------------------------------
    def unload_all(self) -> None:
        """``comfy.model_management.unload_all_models()`` + gc: unpatches models ComfyUI loaded."""
        import gc

        self.model_management.unload_all_models()
        gc.collect()
        self.model_management.soft_empty_cache()

    def patched_weights(self, model, keys: Iterable[str] | None = None) -> dict[str, Any]:
        """The weights a ``ModelPatcher`` computes when ComfyUI patches it, as CPU float
        copies keyed like ``diffusion_model.input_blocks...``.

        Uses ComfyUI's own path: ``clone().patch_model(cpu)``, copy, ``unpatch_model()``.
        Unloads ComfyUI's loaded models first so no other patcher holds the weights.
        """
        import torch

        self.unload_all()
        m = model.clone()
        m.patch_model(device_to=torch.device("cpu"))
        try:
            sd = m.model.state_dict()
            wanted = list(keys) if keys is not None else list(sd.keys())
            return {k: sd[k].detach().to("cpu", copy=True) for k in wanted}
        finally:
            m.unpatch_model(device_to=torch.device("cpu"))


_HOST: ComfyHost | None = None


def load_bench(filename: str):
    """A script of ``bench/`` imported as a module (the benchmarks are scripts, not a package)."""
    name = "lorax_bench_" + filename.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is being made
    spec.loader.exec_module(module)
    return module


def node_inputs(cls) -> dict[str, Any]:
    """A node's inputs in V1 form, without the hidden ones. The V3 base class's ``INPUT_TYPES``
    takes ``include_hidden`` on 0.3.75 and no argument on 0.33 (which leaves hidden inputs in)."""
    try:
        spec = cls.INPUT_TYPES(include_hidden=False)
    except TypeError:
        spec = cls.INPUT_TYPES()
    return {section: value for section, value in spec.items() if section != "hidden"}


def get_comfy_host() -> ComfyHost:
    """Bootstrap (once per process) and return the in-process ComfyUI host.

    Raises RuntimeError telling to run scripts/setup when no ComfyUI tree is found.
    """
    global _HOST
    if _HOST is not None:
        return _HOST
    early = prepare_early()
    if early["tree"] is None:
        raise RuntimeError(f"No ComfyUI {COMFYUI_VERSION} tree found ({early['how']}): {SETUP_HINT}.")
    if early["base_dir"] is None:
        raise RuntimeError("comfy was imported before tests/host.py prepared the host; "
                           "import tests/host.py (conftest does) before any comfy import")
    _HOST = ComfyHost(early["tree"], early["base_dir"])
    return _HOST


def run_prompt(prompt: Mapping[str, Any], **kw) -> dict[str, dict[str, list]]:
    """``get_comfy_host().run_prompt(prompt, **kw)``."""
    return get_comfy_host().run_prompt(prompt, **kw)


def load_pack(path: str | os.PathLike = REPO_ROOT, **kw) -> dict[str, type]:
    """``get_comfy_host().load_pack(path, **kw)``: load a custom node pack into the host."""
    return get_comfy_host().load_pack(path, **kw)


# --------------------------------------------------------------------------------------
# Graph builders.
# --------------------------------------------------------------------------------------


def zero_cond(context_dim: int = 768, tokens: int = 77) -> dict[str, Any]:
    """Prompt node: the test-only zero text conditioning ``[1, tokens, context_dim]``."""
    return {"class_type": ZERO_COND_NODE, "inputs": {"context_dim": context_dim, "tokens": tokens}}


def capture(link: list) -> dict[str, Any]:
    """Prompt node: an output node handing ``link``'s value back in ``run_prompt(...)[id]["value"][0]``."""
    return {"class_type": CAPTURE_NODE, "inputs": {"value": link}}


def unet_ksampler_prompt(unet_name: str, *, seed: int = 0, steps: int = 1, cfg: float = 1.0,
                         width: int = 64, height: int = 64, sampler_name: str = "euler",
                         scheduler: str = "normal", denoise: float = 1.0,
                         model_link: list | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """UNETLoader -> KSampler (zero conditioning, EmptyLatentImage) -> capture.

    Node ids: "unet", "pos", "neg", "latent", "sampler", "out" (capture of the sampled
    LATENT). ``model_link`` replaces the model input of the sampler (e.g. ``["lora", 0]``
    with the node given in ``extra``); ``extra`` adds/overrides nodes.
    """
    p: dict[str, Any] = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "pos": zero_cond(),
        "neg": zero_cond(),
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": model_link or ["unet", 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": sampler_name, "scheduler": scheduler, "positive": ["pos", 0],
            "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": denoise}},
        "out": capture(["sampler", 0]),
    }
    if extra:
        p.update(copy.deepcopy(dict(extra)))
    return p


def _save_full_checkpoint(self: "ComfyHost", sd: Mapping[str, Any], name: str,
                          metadata: dict | None = None) -> str:
    """``comfy_host.save_full_checkpoint(sd, name)``: save an already-prefixed checkpoint state
    dict (e.g. :func:`build_full_sd15_checkpoint`) into ``checkpoints`` as it is; returns the
    ``ckpt_name`` for ``CheckpointLoaderSimple``. (``save_checkpoint`` prefixes a UNet instead.)"""
    bad = [k for k in sd if not k.startswith((SD15_UNET_PREFIX, SD15_TE_PREFIX, SD15_VAE_PREFIX))]
    if bad:
        raise ValueError(f"not a checkpoint key: {bad[0]!r}")
    return self._save("checkpoints", sd, name, metadata)


ComfyHost.save_full_checkpoint = _save_full_checkpoint
