"""pytest wiring for the real ComfyUI host (see tests/host.py).

At import (before any test module, so before any ``comfy`` import): the cheap stage of
the host -- torchvision op schemas, ComfyUI tree first on ``sys.path``, ComfyUI's
command line parsed as ``--cpu --base-directory <session temp dir>``. The expensive part
(importing comfy.sd / nodes / execution, loading built-in nodes) happens only when a test
asks for the ``comfy_host`` fixture, so tests of the pure ``lorax`` library do not pay it.

Fixtures (session-scoped unless noted):

* ``rng``                 -> numpy Generator on a fresh, printed seed (function scope)
* ``comfy_host``          -> host.ComfyHost (run_prompt, load_pack, save_unet, ...)
* ``run_prompt``          -> comfy_host.run_prompt (function scope alias)
* ``mini_sd15``           -> dict[str, Tensor]: build_mini_sd15_unet(seed=0); shared, do not mutate
* ``mini_sd15_unet_name`` -> str: mini_sd15 saved in diffusion_models (for UNETLoader)
* ``mini_sd15_ckpt_name`` -> str: mini_sd15 saved as a UNet-only checkpoint (CheckpointLoaderSimple)
* ``mini_sd15_full_ckpt_name`` -> str: a full SD1.5 checkpoint (mini_sd15 + CLIP-L text encoder +
  VAE, random weights; host.build_full_sd15_checkpoint) -- CheckpointLoaderSimple gives a working
  MODEL, CLIP and VAE
* ``mini_sd15_full_ft_ckpt_name`` -> str: its fine-tuned twin (host.fine_tune(mini_sd15, seed=1)
  and host.fine_tune_text_encoder(seed=1), same VAE)

Tests that use ``comfy_host`` get the ``comfy`` marker (deselect with ``-m "not comfy"``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import host as _host  # noqa: E402

_host.prepare_early()


class _PackRootIsNotATestPackage:
    """The repository root is a ComfyUI node pack, so it has an ``__init__.py`` with
    relative imports. pytest would collect it as a ``Package`` and import that
    ``__init__.py`` under the folder's name (``main``, or fail outright for a folder like
    ``ci-clone``). Collect it as a plain directory instead; the pack is loaded only the way
    ComfyUI loads it (``comfy_host.load_pack()``). Registered as a plugin because a hook in
    this conftest would only apply below ``tests/``.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path) == _host.REPO_ROOT and (Path(path) / "__init__.py").is_file():
            return pytest.Dir.from_parent(parent, path=Path(path))
        return None


def pytest_configure(config):
    config.addinivalue_line("markers", "comfy: uses the real in-process ComfyUI host (tests/host.py)")
    if not config.pluginmanager.has_plugin("lorax-pack-root-dir"):
        config.pluginmanager.register(_PackRootIsNotATestPackage(), "lorax-pack-root-dir")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfy_host" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfy)


def pytest_report_header(config):
    early = _host.prepare_early()
    if early["tree"] is None:
        return f"ComfyUI host: not found ({early['how']}); {_host.SETUP_HINT}"
    return f"ComfyUI host: {early['tree']} ({early['how']}), base dir {early['base_dir']}"


@pytest.fixture
def rng():
    """A numpy generator on a fresh seed every run (printed; LORAX_TEST_SEED replays it)."""
    import numpy as np
    from reference import fresh_seed

    seed = fresh_seed()
    print(f"LORAX_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def comfy_host() -> _host.ComfyHost:
    try:
        return _host.get_comfy_host()
    except RuntimeError as e:
        message = str(e)
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread, as the benchmarks run (same floating-point order; faster on a shared 2-core CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_prompt(comfy_host):
    return comfy_host.run_prompt


@pytest.fixture(scope="session")
def mini_sd15():
    return _host.build_mini_sd15_unet(seed=0)


@pytest.fixture(scope="session")
def mini_sd15_unet_name(comfy_host, mini_sd15) -> str:
    return comfy_host.save_unet(mini_sd15, "mini_sd15.safetensors")


@pytest.fixture(scope="session")
def mini_sd15_ckpt_name(comfy_host, mini_sd15) -> str:
    return comfy_host.save_checkpoint(mini_sd15, "mini_sd15_ckpt.safetensors")


@pytest.fixture(scope="session")
def mini_sd15_te_vae():
    """(text encoder, VAE) of the full synthetic checkpoints, checkpoint-keyed, float16; shared."""
    return _host.build_sd15_text_encoder(seed=0, dtype=_fp16()), _host.build_sd15_vae(seed=0, dtype=_fp16())


def _fp16():
    import torch

    return torch.float16


@pytest.fixture(scope="session")
def mini_sd15_full_ckpt_name(comfy_host, mini_sd15, mini_sd15_te_vae) -> str:
    te, vae = mini_sd15_te_vae
    ckpt = _host.build_full_sd15_checkpoint(mini_sd15, seed=0, text_encoder=te, vae=vae)
    return comfy_host.save_full_checkpoint(ckpt, "mini_sd15_full.safetensors")


@pytest.fixture(scope="session")
def mini_sd15_full_ft_ckpt_name(comfy_host, mini_sd15, mini_sd15_te_vae) -> str:
    te, vae = mini_sd15_te_vae
    ckpt = _host.build_full_sd15_checkpoint(_host.fine_tune(mini_sd15, seed=1, strength=0.05), seed=0,
                                            text_encoder=_host.fine_tune_text_encoder(te, seed=1, strength=0.05),
                                            vae=vae)
    return comfy_host.save_full_checkpoint(ckpt, "mini_sd15_full_ft.safetensors")
