"""A real ComfyUI host for the tests, run in-process.

Nothing here imitates ComfyUI: the tree is ComfyUI 0.3.75 itself (see
``scripts/get-comfyui``), its built-in nodes are loaded the way ``main.py`` loads them,
and graphs run through its own ``execution.PromptExecutor`` after its own
``execution.validate_prompt``. Two small nodes in ``tests/host_nodes.py`` (a zero text
conditioning, because the synthetic model has no text encoder, and an output node that
hands a value back to the test) are the only additions, loaded through ComfyUI's own
``nodes.load_custom_node``.

Two stages:

* ``prepare_early()`` -- cheap (torch import + argparse), run by ``tests/conftest.py`` at
  import time so that it precedes any ``comfy`` import a test module might make:
  declares the two ``torchvision`` op schemas (the CUDA-only torchvision wheel cannot
  load its C extension on CPU torch), puts the ComfyUI tree first on ``sys.path``, and
  parses ComfyUI's command line as ``--cpu --base-directory <per-session temp dir>``.
* ``get_comfy_host()`` / the ``comfy_host`` fixture -- the ~3-8 s part: imports
  ``comfy.sd``, ``nodes``, ``execution``, ``server``; loads the built-in extra nodes;
  constructs a ``server.PromptServer`` (never started) so that ``PromptServer.instance``
  exists for packs that register routes at import; loads the test helper nodes.

Model folders ("checkpoints", "diffusion_models", "loras", ...), input, output, temp and
user directories all live under the per-session temp dir (``--base-directory``), which is
removed at exit.

Also here, needing no ComfyUI import: ``build_mini_sd15_unet`` (a synthetic SD1.5-layout
UNet that ComfyUI detects as SD15), ``fine_tune`` and a few LoRA key helpers.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import importlib.machinery
import importlib.util
import logging
import math
import os
import shutil
import sys
import tempfile
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
HOST_NODES_FILE = TESTS_DIR / "host_nodes.py"

# Node type names of the test helper nodes in tests/host_nodes.py.
ZERO_COND_NODE = "LoraxTestZeroConditioning"
CAPTURE_NODE = "LoraxTestCapture"

SETUP_HINT = "run `scripts/setup` (or set COMFYUI_PATH to a ComfyUI checkout)"

# --------------------------------------------------------------------------------------
# Locating the tree: the same rules as scripts/get-comfyui (loaded from that file).
# --------------------------------------------------------------------------------------


def _get_comfyui_module():
    path = REPO_ROOT / "scripts" / "get-comfyui"
    loader = importlib.machinery.SourceFileLoader("_lorax_get_comfyui", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


_GET_COMFYUI = _get_comfyui_module()
COMFYUI_VERSION = _GET_COMFYUI.COMFYUI_VERSION


def locate_comfyui() -> tuple[Path | None, str]:
    """``(tree, how)`` by the rules of scripts/get-comfyui, or ``(None, why)``. Never downloads."""
    return _GET_COMFYUI.locate(REPO_ROOT)


# --------------------------------------------------------------------------------------
# Stage 1: before any comfy import.
# --------------------------------------------------------------------------------------

# The torchvision op library. Must stay referenced for the whole process: if this
# object is garbage-collected, the op schemas vanish and `import torchvision` breaks.
_TV = None

_early: dict[str, Any] = {}


def _host_boot_module():
    """The pack's lorax_cli/host_boot.py, loaded by path (it imports nothing from ComfyUI): the
    repository need not be on ``sys.path`` (test_pack_startup's probe keeps it off)."""
    path = REPO_ROOT / "lorax_cli" / "host_boot.py"
    spec = importlib.util.spec_from_file_location("_lorax_host_boot", str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def declare_torchvision_schemas() -> bool:
    """See lorax_cli/host_boot.py: the same declaration the command line uses."""
    global _TV
    declared = _HOST_BOOT.declare_torchvision_schemas()
    _TV = _HOST_BOOT._TORCHVISION_LIB
    return declared


_HOST_BOOT = _host_boot_module()


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


def prepare_early() -> dict[str, Any]:
    """Stage 1 (idempotent, cheap). Returns a dict with tree, how, base_dir (tree may be None)."""
    if _early:
        return _early
    declare_torchvision_schemas()
    tree, how = locate_comfyui()
    _early.update(tree=tree, how=how, base_dir=None)
    if tree is None:
        return _early

    base = Path(tempfile.mkdtemp(prefix="lorax-comfy-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    _early["base_dir"] = base

    tree_s = str(tree)
    if tree_s in sys.path:
        sys.path.remove(tree_s)
    sys.path.insert(0, tree_s)

    if "comfy.cli_args" in sys.modules:
        # Someone imported comfy before us; only acceptable if it runs on CPU.
        from comfy.cli_args import args

        if not args.cpu:
            raise RuntimeError("comfy was imported before tests/host.py could pass --cpu to it")
        _early["base_dir"] = None
        return _early

    saved = sys.argv
    sys.argv = [saved[0] if saved else "comfyui", "--cpu", "--base-directory", str(base)]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # parses sys.argv now, once  # noqa: F401
    finally:
        sys.argv = saved
    return _early


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
# Synthetic models (no ComfyUI import needed).
# --------------------------------------------------------------------------------------


def _gen(seed: int, key: str):
    import torch

    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1))
    return g


def power_law_matrix(rows: int, cols: int, *, seed: int = 0, key: str = "", decay: float = 0.8,
                     gain: float = 1.0):
    """``U diag(s) V^T`` with random orthonormal U, V and ``s_i ∝ i^-decay``, scaled so
    ``||W||_F = gain * sqrt(rows)`` (the Frobenius norm of iid N(0, gain²/cols) entries).
    float32, deterministic in (seed, key)."""
    import torch

    g = _gen(seed, key)
    r = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=g))
    s = torch.arange(1, r + 1, dtype=torch.float64).pow(-decay)
    s = (s * (gain * math.sqrt(rows) / s.norm())).to(torch.float32)
    return (u * s) @ v.T


def unet_layout(*, model_channels: int, channel_mult: Sequence[int], num_res_blocks: int,
                transformer_depth: Sequence[int], context_dim: int, in_channels: int, out_channels: int,
                transformer_depth_middle: int | None = None, transformer_depth_output: Sequence[int] | None = None,
                use_linear_in_transformer: bool = False,
                adm_in_channels: int | None = None) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) for a UNet of ComfyUI/ldm ``openaimodel.UNetModel`` with
    ``use_spatial_transformer``, in order. kind: 'linear', 'conv', 'norm_w', 'norm_b', 'bias'.

    Defaults give SD1.x (conv proj_in/proj_out, no label embedding, the output blocks of a level
    as deep as its input blocks, a middle transformer as deep as the last level, at least 1).
    SDXL-family models: ``use_linear_in_transformer=True``, ``adm_in_channels=2816``, and per level
    ``transformer_depth`` / ``transformer_depth_output`` (ComfyUI's detection reads the input
    side; the middle and output depths are free).
    """
    mc = model_channels
    ted = mc * 4
    out: list[tuple[str, tuple[int, ...], str]] = []
    td_out = list(transformer_depth if transformer_depth_output is None else transformer_depth_output)
    td_mid = max(1, transformer_depth[-1]) if transformer_depth_middle is None else transformer_depth_middle

    def lin(p, o, i, bias=True):
        out.append((f"{p}.weight", (o, i), "linear"))
        if bias:
            out.append((f"{p}.bias", (o,), "bias"))

    def conv(p, o, i, k):
        out.append((f"{p}.weight", (o, i, k, k), "conv"))
        out.append((f"{p}.bias", (o,), "bias"))

    def norm(p, c):
        out.append((f"{p}.weight", (c,), "norm_w"))
        out.append((f"{p}.bias", (c,), "norm_b"))

    def resblock(p, ci, co):
        norm(f"{p}.in_layers.0", ci)
        conv(f"{p}.in_layers.2", co, ci, 3)
        lin(f"{p}.emb_layers.1", co, ted)
        norm(f"{p}.out_layers.0", co)
        conv(f"{p}.out_layers.3", co, co, 3)
        if ci != co:
            conv(f"{p}.skip_connection", co, ci, 1)

    def proj(p, c):
        if use_linear_in_transformer:
            lin(p, c, c)
        else:
            conv(p, c, c, 1)

    def transformer(p, c, depth):
        norm(f"{p}.norm", c)
        proj(f"{p}.proj_in", c)
        for d in range(depth):
            b = f"{p}.transformer_blocks.{d}"
            for a, kv in (("attn1", c), ("attn2", context_dim)):
                lin(f"{b}.{a}.to_q", c, c, bias=False)
                lin(f"{b}.{a}.to_k", c, kv, bias=False)
                lin(f"{b}.{a}.to_v", c, kv, bias=False)
                lin(f"{b}.{a}.to_out.0", c, c)
            lin(f"{b}.ff.net.0.proj", c * 8, c)
            lin(f"{b}.ff.net.2", c, c * 4)
            for n in ("norm1", "norm2", "norm3"):
                norm(f"{b}.{n}", c)
        proj(f"{p}.proj_out", c)

    lin("time_embed.0", ted, mc)
    lin("time_embed.2", ted, ted)
    if adm_in_channels is not None:
        lin("label_emb.0.0", ted, adm_in_channels)
        lin("label_emb.0.2", ted, ted)
    conv("input_blocks.0.0", mc, in_channels, 3)
    chans = [mc]
    ch = mc
    idx = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{idx}.0", ch, mult * mc)
            ch = mult * mc
            if transformer_depth[level] > 0:
                transformer(f"input_blocks.{idx}.1", ch, transformer_depth[level])
            chans.append(ch)
            idx += 1
        if level != len(channel_mult) - 1:
            conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            chans.append(ch)
            idx += 1
    resblock("middle_block.0", ch, ch)
    if td_mid > 0:
        transformer("middle_block.1", ch, td_mid)
    resblock("middle_block.2" if td_mid > 0 else "middle_block.1", ch, ch)
    idx = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            skip = chans.pop()
            resblock(f"output_blocks.{idx}.0", ch + skip, mc * mult)
            ch = mc * mult
            sub = 1
            if td_out[level] > 0:
                transformer(f"output_blocks.{idx}.1", ch, td_out[level])
                sub = 2
            if level and i == num_res_blocks:
                conv(f"output_blocks.{idx}.{sub}.conv", ch, ch, 3)
            idx += 1
    norm("out.0", ch)
    conv("out.2", out_channels, mc, 3)
    return out


def build_mini_sd15_unet(seed: int = 0, *, model_channels: int = 320,
                         channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1,
                         transformer_depth: int | Sequence[int] = 1, context_dim: int = 768,
                         in_channels: int = 4, out_channels: int = 4, decay: float = 0.8,
                         bias_std: float = 0.01) -> dict[str, Any]:
    """A synthetic SD1.5-layout UNet state dict with ComfyUI's internal key names.

    Defaults: model_channels 320, context_dim 768, channel_mult (1, 2), one res block and
    one transformer block per level -- ~107M parameters, which ComfyUI's
    ``model_detection`` identifies as ``SD15`` (it keys on context_dim 768 and
    model_channels 320). ``channel_mult`` sets the depth (number of levels), e.g.
    ``(1,)`` for a reduced variant; ``transformer_depth`` is per level (0 = no attention).

    Linear and conv weights (conv flattened to ``[out, in*k*k]``) are
    ``power_law_matrix``: singular values ∝ i^-decay with random orthonormal singular
    vectors, Frobenius norm of an iid 1/sqrt(fan_in) init. Norm weights are ones, norm
    biases zeros, other biases N(0, bias_std²). float32; deterministic per (seed, key),
    so variants of different depth share the tensors they have in common.
    """
    import torch

    td = ([transformer_depth] * len(channel_mult) if isinstance(transformer_depth, int)
          else list(transformer_depth))
    if len(td) != len(channel_mult):
        raise ValueError("transformer_depth must have one entry per channel_mult level")
    layout = unet_layout(model_channels=model_channels, channel_mult=tuple(channel_mult),
                          num_res_blocks=num_res_blocks, transformer_depth=td,
                          context_dim=context_dim, in_channels=in_channels, out_channels=out_channels)
    sd: dict[str, Any] = {}
    for key, shape, kind in layout:
        if kind in ("linear", "conv"):
            rows, cols = shape[0], int(math.prod(shape[1:]))
            sd[key] = power_law_matrix(rows, cols, seed=seed, key=key, decay=decay).reshape(shape)
        elif kind == "norm_w":
            sd[key] = torch.ones(shape)
        elif kind == "norm_b":
            sd[key] = torch.zeros(shape)
        else:
            sd[key] = torch.randn(shape, generator=_gen(seed, key)) * bias_std
    return sd


def fine_tune(sd: Mapping[str, Any], seed: int, strength: float = 0.05, *, rank: int = 8,
              dense_fraction: float = 0.5) -> dict[str, Any]:
    """A perturbed copy of ``sd`` standing in for a fine-tuned model.

    Each weight with ndim >= 2 (as a matrix ``[out, in*k*k]``) gets ``W + D`` with
    ``||D||_F = strength * ||W||_F``; D mixes a random rank-``rank`` part and a dense
    Gaussian part (``dense_fraction`` of the energy), as real fine-tunes move weights
    mostly along a few directions. 1-D tensors get ``+ strength * 0.1 * N(0, 1)``.
    Deterministic per (seed, key); the input is not modified.
    """
    import torch

    out: dict[str, Any] = {}
    for key, w in sd.items():
        g = _gen(seed + 7919, key)
        if w.ndim >= 2:
            m = w.reshape(w.shape[0], -1).to(torch.float32)
            r = min(rank, *m.shape)
            low = torch.randn(m.shape[0], r, generator=g) @ torch.randn(r, m.shape[1], generator=g)
            dense = torch.randn(m.shape, generator=g)
            d = (math.sqrt(1 - dense_fraction) * low / low.norm()
                 + math.sqrt(dense_fraction) * dense / dense.norm())
            d = d * (strength * m.norm() / d.norm())
            out[key] = (m + d).reshape(w.shape).to(w.dtype)
        else:
            out[key] = (w + strength * 0.1 * torch.randn(w.shape, generator=g)).to(w.dtype)
    return out


def count_params(sd: Mapping[str, Any]) -> int:
    return sum(int(v.numel()) for v in sd.values())


def kohya_lora_prefix(unet_key: str) -> str:
    """``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight`` ->
    ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`` (ComfyUI maps this
    kohya-style name onto ``diffusion_model.<key>``)."""
    k = unet_key[: -len(".weight")] if unet_key.endswith(".weight") else unet_key
    return "lora_unet_" + k.replace(".", "_")


def make_kohya_lora(targets: Mapping[str, tuple[Any, Any]], alpha: float | None = None) -> dict[str, Any]:
    """``{unet_key: (up [out, r], down [r, in])}`` -> kohya LoRA state dict with
    ``.lora_up.weight``, ``.lora_down.weight`` and ``.alpha`` (default alpha = rank).
    ComfyUI applies ``up @ down * alpha / rank`` (times the loader strength)."""
    import torch

    lora: dict[str, Any] = {}
    for key, (up, down) in targets.items():
        p = kohya_lora_prefix(key)
        lora[f"{p}.lora_up.weight"] = up.contiguous()
        lora[f"{p}.lora_down.weight"] = down.contiguous()
        lora[f"{p}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    return lora


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


# --------------------------------------------------------------------------------------
# Full synthetic SD1.5 checkpoints: UNet + CLIP-L text encoder + VAE.
# --------------------------------------------------------------------------------------

#: Checkpoint key prefixes of an SD1.x checkpoint (what ComfyUI's SD15 config reads).
SD15_UNET_PREFIX = "model.diffusion_model."
SD15_TE_PREFIX = "cond_stage_model."
SD15_VAE_PREFIX = "first_stage_model."

#: The ddconfig ``comfy.sd.VAE`` uses for SD1.x/SD2.x VAEs (its "default SD1.x/SD2.x VAE
#: parameters" branch, ComfyUI 0.3.75 comfy/sd.py); with ``post_quant_conv`` in the state dict
#: it builds ``AutoencoderKL(ddconfig=..., embed_dim=4)``.
SD1_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                    "dropout": 0.0}

_SD15_LAYOUT: dict[str, dict[str, tuple[int, ...]]] = {}


def sd15_te_vae_layout() -> dict[str, dict[str, tuple[int, ...]]]:
    """``{"text_encoder": {key: shape}, "vae": {key: shape}}`` with checkpoint key names.

    Taken from ComfyUI's own classes, instantiated on the ``meta`` device (no memory, ~10 ms):
    the SD15 model config's clip target (``sd1_clip.SD1ClipModel``, CLIP-L) whose state dict
    goes through ``SD15.process_clip_state_dict_for_saving`` -- exactly what ComfyUI's
    CheckpointSave writes (``cond_stage_model.transformer.text_model.*``; ``text_projection``
    and ``logit_scale`` are dropped, as in real SD1.5 checkpoints) -- and
    ``comfy.ldm.models.autoencoder.AutoencoderKL`` with :data:`SD1_VAE_DDCONFIG`, prefixed with
    the config's ``vae_key_prefix`` (``first_stage_model.``).
    Needs the ComfyUI tree (calls :func:`prepare_early`); cached per process.
    """
    if _SD15_LAYOUT:
        return _SD15_LAYOUT
    early = prepare_early()
    if early["tree"] is None:
        raise RuntimeError(f"No ComfyUI {COMFYUI_VERSION} tree found ({early['how']}): {SETUP_HINT}.")
    import torch
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = comfy.supported_models.SD15({})
    target = config.clip_target()
    with torch.device("meta"):
        te = target.clip(device="meta", dtype=torch.float32)
        vae = AutoencoderKL(ddconfig=dict(SD1_VAE_DDCONFIG), embed_dim=4)
    te_sd = config.process_clip_state_dict_for_saving(dict(te.state_dict()))
    (vae_prefix,) = config.vae_key_prefix
    _SD15_LAYOUT["text_encoder"] = {k: tuple(v.shape) for k, v in te_sd.items()}
    _SD15_LAYOUT["vae"] = {vae_prefix + k: tuple(v.shape) for k, v in vae.state_dict().items()}
    bad = [k for k in _SD15_LAYOUT["text_encoder"] if not k.startswith(SD15_TE_PREFIX)]
    if bad or vae_prefix != SD15_VAE_PREFIX:
        raise RuntimeError(f"unexpected SD15 checkpoint layout in this ComfyUI: {bad[:3]} {vae_prefix!r}")
    return _SD15_LAYOUT


def spectral_matrix(rows: int, cols: int, *, seed: int = 0, key: str = "", decay: float = 0.8,
                    gain: float = 1.0):
    """Like :func:`power_law_matrix` (``U diag(s) Vᵀ``, ``s_i ∝ i^-decay``, ``‖W‖_F = gain·√rows``)
    but with structured orthonormal factors, built in O(rows·cols·log) instead of QR + matmul.

    ``U = D_r C_rᵀ P_r``, ``V = D_c C_cᵀ P_c``: orthonormal DCT-II bases ``C`` with random column
    permutations ``P`` and random row signs ``D``, so ``W = D_r · idct2(S) · D_c`` where ``S``
    holds the singular values on randomly permuted positions. The singular values are exact and
    the singular vectors are delocalised (every entry ±O(1/√n)), like a random basis, and
    different (seed, key) give incoherent bases. Used for the text encoder (72 matrices, ~1 s in
    all) where QR-based construction takes 10-30 s on a busy 2-core machine. float32.
    """
    import numpy as np
    import scipy.fft
    import torch

    g = _gen(seed, key)
    r = min(rows, cols)
    s = torch.arange(1, r + 1, dtype=torch.float64).pow(-decay)
    s = s * (gain * math.sqrt(rows) / s.norm())
    pr = torch.randperm(rows, generator=g)[:r].numpy()
    pc = torch.randperm(cols, generator=g)[:r].numpy()
    dr = (torch.randint(0, 2, (rows, 1), generator=g) * 2 - 1).numpy()
    dc = (torch.randint(0, 2, (1, cols), generator=g) * 2 - 1).numpy()
    S = np.zeros((cols, rows), dtype=np.float32)  # transposed: scipy's DCT is ~4× faster along
    S[pc, pr] = s.numpy()                         # the last axis, so keep the long one there
    Wt = scipy.fft.idctn(S, type=2, norm="ortho") * dc.T * dr.T
    return torch.from_numpy(np.ascontiguousarray(Wt.T, dtype=np.float32))


def build_sd15_text_encoder(seed: int = 0, *, dtype=None, decay: float = 0.8, bias_std: float = 0.01,
                            token_std: float = 0.02, position_std: float = 0.01) -> dict[str, Any]:
    """A CLIP-L text encoder for SD1.5 with random weights, keyed ``cond_stage_model.*``.

    Keys and shapes from :func:`sd15_te_vae_layout` (ComfyUI's own ``SD1ClipModel``). Linear
    weights (attention q/k/v/out, MLP fc1/fc2) are :func:`spectral_matrix` (power-law spectrum
    with the norm of an iid ``1/√fan_in`` init, so subspace similarity behaves as for trained
    weights); layer norms are weight 1 / bias 0; biases N(0, bias_std²); token embeddings
    N(0, token_std²), position embeddings N(0, position_std²). The pre-LN transformer keeps
    every activation finite. ``dtype`` (default float32) is the stored dtype; ComfyUI runs the
    text encoder in float16 on CPU anyway. ~123M parameters; deterministic per (seed, key).
    """
    import torch

    dtype = dtype or torch.float32
    out: dict[str, Any] = {}
    for key, shape in sd15_te_vae_layout()["text_encoder"].items():
        if "layer_norm" in key:
            t = torch.ones(shape) if key.endswith(".weight") else torch.zeros(shape)
        elif key.endswith("token_embedding.weight"):
            t = torch.randn(shape, generator=_gen(seed, key)) * token_std
        elif key.endswith("position_embedding.weight"):
            t = torch.randn(shape, generator=_gen(seed, key)) * position_std
        elif len(shape) == 2:
            t = spectral_matrix(shape[0], shape[1], seed=seed, key=key, decay=decay)
        elif key.endswith(".bias"):
            t = torch.randn(shape, generator=_gen(seed, key)) * bias_std
        else:
            raise RuntimeError(f"no initialisation rule for text-encoder key {key} {shape}")
        out[key] = t.to(dtype)
    return out


def build_sd15_vae(seed: int = 0, *, dtype=None, bias_std: float = 0.01) -> dict[str, Any]:
    """The SD1.x VAE (``AutoencoderKL``, ch 128, ch_mult 1-2-4-4, ~84M parameters) with random
    weights, keyed ``first_stage_model.*``: conv weights N(0, 1/fan_in), group norms weight 1 /
    bias 0, biases N(0, bias_std²). GroupNorm in every block keeps the decoder's output finite
    (ComfyUI clamps it to [0, 1]). Decoding a 64×64 image costs well under a second on CPU.
    ``dtype`` (default float32) is the stored dtype; ComfyUI decodes in float32 on CPU."""
    import torch

    dtype = dtype or torch.float32
    out: dict[str, Any] = {}
    for key, shape in sd15_te_vae_layout()["vae"].items():
        if len(shape) == 1 and ("norm" in key.rsplit(".", 2)[-2]):
            t = torch.ones(shape) if key.endswith(".weight") else torch.zeros(shape)
        elif len(shape) >= 2:
            fan_in = int(math.prod(shape[1:]))
            t = torch.randn(shape, generator=_gen(seed, key)) / math.sqrt(fan_in)
        else:
            t = torch.randn(shape, generator=_gen(seed, key)) * bias_std
        out[key] = t.to(dtype)
    return out


def build_full_sd15_checkpoint(unet_sd: Mapping[str, Any], seed: int = 0, *,
                               text_encoder: Mapping[str, Any] | None = None,
                               vae: Mapping[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """A complete SD1.5 checkpoint state dict: ``model.diffusion_model.*`` (``unet_sd``, e.g.
    :func:`build_mini_sd15_unet`), ``cond_stage_model.*`` (CLIP-L) and ``first_stage_model.*``
    (VAE), so that the stock ``CheckpointLoaderSimple`` returns a working MODEL, CLIP and VAE.

    ``text_encoder`` / ``vae`` (checkpoint-keyed, e.g. from :func:`build_sd15_text_encoder`,
    :func:`fine_tune_text_encoder`) are used when given, else built from ``seed`` with ``dtype``
    (default float16 for these two parts, like the fp16 SD1.5 checkpoints people download: ComfyUI
    runs the text encoder in float16 on CPU anyway, so nothing is lost, and the file is 0.4 GB
    smaller). The UNet tensors are used as they are (not copied).
    """
    import torch

    dtype = dtype or torch.float16
    te = text_encoder if text_encoder is not None else build_sd15_text_encoder(seed, dtype=dtype)
    v = vae if vae is not None else build_sd15_vae(seed, dtype=dtype)
    out: dict[str, Any] = {SD15_UNET_PREFIX + k: t for k, t in unet_sd.items()}
    for part, prefix in ((te, SD15_TE_PREFIX), (v, SD15_VAE_PREFIX)):
        bad = [k for k in part if not k.startswith(prefix)]
        if bad:
            raise ValueError(f"expected keys starting with {prefix!r}, got e.g. {bad[0]!r}")
        out.update(part)
    return out


def fine_tune_text_encoder(te_sd: Mapping[str, Any], seed: int, strength: float = 0.05,
                           decay: float = 1.0) -> dict[str, Any]:
    """A "fine-tuned" copy of a checkpoint-keyed text encoder: every transformer-layer matrix
    (``...encoder.layers.*``: attention, MLP) gets ``W + P`` with ``‖P‖_F = strength·‖W‖_F`` and P
    a :func:`spectral_matrix` of its own (power-law spectrum ``i^-decay``, random basis: a change
    concentrated on a few directions, as fine-tunes are); layer-norm weights and biases get
    ``+ strength·0.1·N(0, 1)``. Embeddings and the final layer norm are shared unchanged (same
    tensor objects). ~1 s (a dense Gaussian perturbation as in :func:`fine_tune` takes ~7 s here).
    Deterministic per (seed, key); the input is not modified."""
    import torch

    out = dict(te_sd)
    for key, w in te_sd.items():
        if ".encoder.layers." not in key:
            continue
        if w.ndim >= 2:
            m = w.reshape(w.shape[0], -1).to(torch.float32)
            p = spectral_matrix(m.shape[0], m.shape[1], seed=seed + 7919, key=key, decay=decay)
            p = p * (strength * m.norm() / p.norm())
            out[key] = (m + p).reshape(w.shape).to(w.dtype)
        else:
            g = _gen(seed + 7919, key)
            out[key] = (w.to(torch.float32) + strength * 0.1 * torch.randn(w.shape, generator=g)).to(w.dtype)
    return out


def te_lora_prefix(layer: int, module: str) -> str:
    """kohya name of an SD1.x text-encoder module, as ``comfy.lora.model_lora_keys_clip`` maps
    it: ``te_lora_prefix(0, "self_attn.q_proj")`` -> ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``
    (-> ``clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight``)."""
    return f"lora_te_text_model_encoder_layers_{layer}_{module.replace('.', '_')}"


def te_clip_key(layer: int, module: str) -> str:
    """The key of that module's weight in ComfyUI's SD1.x CLIP model (``clip.cond_stage_model``)."""
    return f"clip_l.transformer.text_model.encoder.layers.{layer}.{module}.weight"


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


def make_sd15_lora_with_te(unet_sd: Mapping[str, Any], unet_keys: Sequence[str],
                           te_modules: Sequence[tuple[int, str]], *, rank: int = 4, alpha: float = 2.0,
                           std: float = 0.05, seed: int = 5) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """A kohya LoRA for SD1.5 touching UNet weights and CLIP-L text-encoder modules.

    ``unet_keys``: UNet weight keys (as in ``unet_sd``); ``te_modules``: ``(layer, module)`` pairs
    such as ``(0, "self_attn.q_proj")`` or ``(11, "mlp.fc2")``, written as
    ``lora_te_text_model_encoder_layers_<layer>_<module>`` (:func:`te_lora_prefix`). Factors are
    N(0, std²) of rank ``rank`` (convs: ``down`` ``[r, in, kh, kw]``), alpha as given (ComfyUI
    scales ``up @ down`` by ``alpha / rank``). Returns ``(lora state dict, factors)`` with
    ``factors`` keyed by the UNet key (unprefixed) or the CLIP key (:func:`te_clip_key`).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    factors: dict[str, tuple[Any, Any]] = {}
    for key in unet_keys:
        w = unet_sd[key]
        factors[key] = (torch.randn(w.shape[0], rank, generator=g) * std,
                        (torch.randn(rank, w[0].numel(), generator=g) * std).reshape(rank, *w.shape[1:]))
    lora = make_kohya_lora({k: factors[k] for k in unet_keys}, alpha=alpha)
    te_shapes = sd15_te_vae_layout()["text_encoder"]
    for layer, module in te_modules:
        shape = te_shapes[f"{SD15_TE_PREFIX}transformer.text_model.encoder.layers.{layer}.{module}.weight"]
        up = torch.randn(shape[0], rank, generator=g) * std
        down = torch.randn(rank, shape[1], generator=g) * std
        p = te_lora_prefix(layer, module)
        lora[f"{p}.lora_up.weight"] = up
        lora[f"{p}.lora_down.weight"] = down
        lora[f"{p}.alpha"] = torch.tensor(float(alpha))
        factors[te_clip_key(layer, module)] = (up, down)
    return lora, factors
