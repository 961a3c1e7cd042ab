"""``python -m lorax`` as a user runs it: the example of ``docs/cli.md`` (moved there from the README),
verbatim, in a fresh process.

The transferred file is checked against the library run in-process on the same state dicts
(float32 file vs float64 reference: the CLI's Gram route rounds singular vectors to float16,
reference.HALF_FACTOR_TOL; 1e-5 before).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import host
from lorax.delta import Delta
from lorax.engine import SVDEngine
from lorax.transfer import DictWeights, TransferSettings, transfer_deltas
from reference import HALF_FACTOR_TOL, rel_err

CLI_PAGE = host.REPO_ROOT / "docs" / "cli.md"


def readme_cli_commands() -> list[str]:
    text = CLI_PAGE.read_text()
    section = text.split("# Command line\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def _run(argv: list[str], cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(host.REPO_ROOT)
    env["LORAX_SVD_CACHE"] = str(cwd / "svd-cache")  # keep the user's cache out of the tests
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/python"
    argv[0] = sys.executable
    if argv[1].startswith("scripts/"):
        argv[1] = str(host.REPO_ROOT / argv[1])
    return argv


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    outputs = []
    for command in readme_cli_commands():
        proc = _run(_argv(command), cwd)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        outputs.append(proc.stdout)
    return cwd, outputs


def test_readme_similarity_example(readme_run):
    cwd, outputs = readme_run
    assert "layers pass the threshold" in outputs[1] and "median Φ" in outputs[1]
    rows = json.loads((cwd / "demo" / "similarity.json").read_text())
    assert len(rows) == 84  # attention, ff and proj weights of the mini SD1.5
    for r in rows:
        assert {"key", "phi", "phi_right", "shape_source", "shape_target"} <= set(r)
        assert 0.9 < r["phi"] <= 1.0  # a 5 % fine-tune keeps its principal subspaces


def test_readme_transfer_example_matches_library(readme_run):
    cwd, outputs = readme_run
    demo = cwd / "demo"
    assert re.search(r"summary: 8 of 8 layers transferred", outputs[2]), outputs[2]
    assert outputs[2].count("\ntransferred ") + outputs[2].startswith("transferred ") == 8
    source, target = load_file(str(demo / "source.safetensors")), load_file(str(demo / "target.safetensors"))
    lora = load_file(str(demo / "style_lora.safetensors"))
    written = load_file(str(demo / "style_on_target.safetensors"))
    deltas = {}
    for up_key in [k for k in lora if k.endswith(".lora_up.weight")]:
        name = up_key[:-len(".lora_up.weight")]
        unet_key = name[len("lora_unet_"):]
        model_key = next(k for k in source if k.replace(".", "_") == unet_key + "_weight")
        up, down = lora[up_key].double(), lora[f"{name}.lora_down.weight"].double()
        scale = float(lora[f"{name}.alpha"]) / down.shape[0]
        deltas[model_key] = Delta.factored(source[model_key].shape, up * scale, down)
    ref = transfer_deltas(deltas, DictWeights(source), DictWeights(target), TransferSettings(), SVDEngine(method="exact"))
    assert len(ref.deltas) == 8
    downs = [k for k in written if k.endswith(".lora_down.weight")]
    assert len(downs) == 8
    # Each written module is one of the reference deltas (names are kohya's diffusers-style names).
    got = []
    for k in downs:
        name = k[:-len(".lora_down.weight")]
        up, down = written[f"{name}.lora_up.weight"].double(), written[k].double()
        got.append((up @ down) * float(written[f"{name}.alpha"]) / down.shape[0])
    for key, delta in ref.deltas.items():
        best = min(rel_err(g, delta.matrix()) for g in got if g.shape == delta.matrix().shape)
        assert best < HALF_FACTOR_TOL, key


def test_default_transfer_writes_the_adapters_own_delta_on_a_near_fine_tune(readme_run):
    """The demo target moved 5 % per layer: with the default settings each written module is the LoRA's own
    delta (asked: cosine ≥ 0.98, norm ratio 0.95–1.05; a copy through float32 files gives 1 to ~1e-7), and
    the command says it copied them."""
    cwd, outputs = readme_run
    demo = cwd / "demo"
    assert "(8 copied)" in outputs[2], outputs[2]
    lora, written = load_file(str(demo / "style_lora.safetensors")), load_file(str(demo / "style_on_target.safetensors"))

    def delta(f, name):
        up, down = f[f"{name}.lora_up.weight"].double(), f[f"{name}.lora_down.weight"].double()
        return up.flatten(1) @ down.flatten(1) * float(f[f"{name}.alpha"]) / down.shape[0]

    given = [delta(lora, k[:-len(".lora_up.weight")]) for k in lora if k.endswith(".lora_up.weight")]
    # The written file names modules the kohya way of the target's key map (diffusers-style), the input
    # ldm-style: pair each input delta with the written one it is closest to.
    got = [delta(written, k[:-len(".lora_up.weight")]) for k in written if k.endswith(".lora_up.weight")]
    assert len(given) == len(got) == 8
    for g in given:
        cos, best = max(((float((g * w).sum() / (g.norm() * w.norm())), w) for w in got if w.shape == g.shape),
                        key=lambda x: x[0])
        assert cos >= 0.98 and 0.95 <= float(best.norm() / g.norm()) <= 1.05, cos


def test_readme_convert_example(readme_run):
    cwd, outputs = readme_run
    from lorax.lorax_adapter import load_lorax

    adapter = load_lorax(cwd / "demo" / "style_lorax.safetensors")
    assert len(adapter.sigmas) == 8 and adapter.rank == 64 and adapter.parameter_count == 8 * 64
    assert "8 layers converted" in outputs[3] and "wrote 8 layers, 512 parameters" in outputs[3]
    kept = [float(m) for m in re.findall(r"kept\s+([0-9.]+)%", outputs[3])]
    assert len(kept) == 8 and all(0 < k < 20 for k in kept)  # a random LoRA mostly lies outside the top-64 directions


def test_cli_bad_input_exits_2_with_file_named(readme_run):
    cwd, _ = readme_run
    demo = cwd / "demo"
    proc = _run([sys.executable, "-m", "lorax", "transfer", "--source", str(demo / "source.safetensors"),
                 "--target", str(demo / "target.safetensors"), "--adapter", str(demo / "source.safetensors"),
                 "--out", str(demo / "x.safetensors"), "--rank", "64"], cwd)
    assert proc.returncode == 2
    assert "source.safetensors" in proc.stderr and "made for another architecture" in proc.stderr
    assert not (demo / "x.safetensors").exists()
    proc = _run([sys.executable, "-m", "lorax", "similarity", "--source", str(demo / "source.safetensors"),
                 "--target", str(demo / "source.safetensors")], cwd)
    assert proc.returncode == 2 and "same file" in proc.stderr
    broken = demo / "broken.safetensors"
    broken.write_bytes((demo / "target.safetensors").read_bytes()[:4096])
    proc = _run([sys.executable, "-m", "lorax", "similarity", "--source", str(demo / "source.safetensors"),
                 "--target", str(broken)], cwd)
    assert proc.returncode == 2 and "truncated" in proc.stderr and "broken.safetensors" in proc.stderr
    proc = _run([sys.executable, "-m", "lorax", "transfer", "--source", str(demo / "source.safetensors"),
                 "--target", str(demo / "target.safetensors"), "--adapter", str(demo / "style_lora.safetensors"),
                 "--out", str(demo / "x.safetensors"), "--threshold", "2"], cwd)
    assert proc.returncode == 2 and "threshold must lie in [0, 1]" in proc.stderr


def test_cli_refuses_a_gguf_model_in_one_sentence_and_writes_nothing(readme_run):
    """GGUF models need ComfyUI-GGUF's loader (a running ComfyUI): the command line says so, exit 2."""
    import gguf

    from gguf_standin import write_gguf

    cwd, _ = readme_run
    demo = cwd / "demo"
    target = write_gguf(demo / "target_q8.gguf", load_file(demo / "target.safetensors"),
                        gguf.GGMLQuantizationType.Q8_0)
    out = demo / "from_gguf.safetensors"
    proc = _run([sys.executable, "-m", "lorax", "transfer", "--source", str(demo / "source.safetensors"),
                 "--target", str(target), "--adapter", str(demo / "style_lora.safetensors"), "--out", str(out)], cwd)
    assert proc.returncode == 2, proc.stderr
    assert "target_q8.gguf" in proc.stderr and "GGUF file" in proc.stderr and "Unet Loader (GGUF)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cache_command_lists_the_readme_models(readme_run):
    """After the README's commands the cache holds both demo models' factors, listed under their
    files' paths (recorded through ComfyUI's own loader); a repeated transfer decomposes nothing and
    says so; clearing one model leaves the other."""
    cwd, outputs = readme_run
    demo = cwd / "demo"
    assert "SVD cache: " in outputs[2] and str(cwd / "svd-cache") in outputs[2]
    proc = _run([sys.executable, "-m", "lorax", "cache"], cwd)
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout
    assert str(cwd / "svd-cache") in listed.splitlines()[0]
    for name in ("source.safetensors", "target.safetensors"):
        assert str((demo / name).resolve()) in listed or str(demo / name) in listed, listed
    proc = _run([sys.executable, "-m", "lorax", "transfer", "--source", str(demo / "source.safetensors"),
                 "--target", str(demo / "target.safetensors"), "--adapter", str(demo / "style_lora.safetensors"),
                 "--out", str(demo / "again.safetensors")], cwd)
    assert proc.returncode == 0 and "decomposed 0 layers" in proc.stdout, proc.stdout + proc.stderr
    proc = _run([sys.executable, "-m", "lorax", "cache", "clear", "--model", str(demo / "target.safetensors")], cwd)
    assert proc.returncode == 0 and "removed" in proc.stdout, proc.stderr
    proc = _run([sys.executable, "-m", "lorax", "cache"], cwd)
    assert "target.safetensors" not in proc.stdout and "source.safetensors" in proc.stdout
