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


# -- never destroy a user's file; no traceback from a damaged one (issue 23) --------------------------


def _digest(path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def _main(capsys, monkeypatch, cwd, argv) -> tuple[int, str, str]:
    """``python -m lorax …`` in this process (its ``main``, as ``__main__`` calls it)."""
    from lorax_cli.cli import main

    monkeypatch.setenv("LORAX_SVD_CACHE", str(cwd / "svd-cache"))
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err: str, path) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: file '{path}'"), err
    assert "Traceback" not in err
    return lines[0]


def test_cli_never_writes_over_one_of_its_inputs(readme_run, capsys, monkeypatch):
    """``--out`` naming an input — by its path, a hard link or a symlink — is refused for transfer
    and convert, with --overwrite too: one sentence naming the file, exit 2, the inputs unchanged."""
    cwd, _ = readme_run
    demo = cwd / "demo"
    source, target, adapter = demo / "source.safetensors", demo / "target.safetensors", demo / "style_lora.safetensors"
    hard, soft = demo / "target-hardlink.safetensors", demo / "adapter-symlink.safetensors"
    for link in (hard, soft):
        link.unlink(missing_ok=True)
    os.link(target, hard)
    soft.symlink_to(adapter)
    before = {p: _digest(p) for p in (source, target, adapter)}
    common = ["--source", source, "--target", target, "--adapter", adapter]
    cases = [("transfer", out, flag, extra) for out, flag in
             ((source, "--source"), (target, "--target"), (adapter, "--adapter"), (hard, "--target"), (soft, "--adapter"))
             for extra in ([], ["--overwrite"])]
    cases += [("convert", out, flag, ["--overwrite"]) for out, flag in
              ((source, "--source"), (adapter, "--adapter"), (soft, "--adapter"))]
    for command, out, flag, extra in cases:
        args = common if command == "transfer" else ["--source", source, "--adapter", adapter]
        code, stdout, err = _main(capsys, monkeypatch, cwd, [command, *args, "--out", out, *extra])
        line = _one_error_line(err, out)
        assert code == 2 and f"--out is the same file as {flag}; nothing was written" in line, (command, out, line)
        assert stdout == ""
    # The reports of similarity and scan (rewritten on every run) never go over an input either.
    code, _, err = _main(capsys, monkeypatch, cwd, ["similarity", "--source", source, "--target", target,
                                                    "--json", hard])
    assert code == 2 and "--json is the same file as --target" in _one_error_line(err, hard)
    code, _, err = _main(capsys, monkeypatch, cwd, ["scan", "--target", target, "--loras", demo, "--csv", soft])
    assert code == 2 and "--csv is the same file as the LoRA style_lora.safetensors" in _one_error_line(err, soft)
    # As a user runs it: a fresh process, exit status 2, one line, no traceback.
    proc = _run([sys.executable, "-m", "lorax", "transfer", *map(str, common), "--out", str(hard), "--overwrite"], cwd)
    assert proc.returncode == 2 and "is the same file as --target" in _one_error_line(proc.stderr, hard)
    assert {p: _digest(p) for p in (source, target, adapter)} == before
    assert hard.stat().st_ino == target.stat().st_ino and soft.resolve() == adapter.resolve()
    assert not [p for p in os.listdir(demo) if p.endswith(".part")]


def test_cli_refuses_an_existing_out_unless_overwrite(readme_run, capsys, monkeypatch):
    cwd, _ = readme_run
    demo = cwd / "demo"
    source, target, adapter = demo / "source.safetensors", demo / "target.safetensors", demo / "style_lora.safetensors"
    existing = demo / "existing.safetensors"
    existing.write_bytes(b"a file the user keeps")
    transfer = ["transfer", "--source", source, "--target", target, "--adapter", adapter, "--out", existing]
    convert = ["convert", "--source", source, "--adapter", adapter, "--out", existing, "--rank", "64"]
    proc = _run([sys.executable, "-m", "lorax", *map(str, transfer)], cwd)
    line = _one_error_line(proc.stderr, existing)
    assert proc.returncode == 2 and "--out already exists; nothing was written" in line and "--overwrite" in line
    code, _, err = _main(capsys, monkeypatch, cwd, convert)
    assert code == 2 and "--out already exists" in _one_error_line(err, existing)
    folder = demo / "a-folder.safetensors"
    folder.mkdir(exist_ok=True)
    code, _, err = _main(capsys, monkeypatch, cwd, transfer[:-1] + [folder, "--overwrite"])
    assert code == 2 and "--out is a folder" in _one_error_line(err, folder)
    assert existing.read_bytes() == b"a file the user keeps"
    # --overwrite replaces it, atomically: a new file (inode) in its place, complete, no leftovers.
    inode = existing.stat().st_ino
    code, stdout, err = _main(capsys, monkeypatch, cwd, transfer + ["--overwrite"])
    assert code == 0, err
    assert f"wrote 8 layers to {existing}" in stdout
    written = load_file(str(existing))
    assert len([k for k in written if k.endswith(".lora_down.weight")]) == 8
    assert existing.stat().st_ino != inode
    code, stdout, err = _main(capsys, monkeypatch, cwd, convert + ["--overwrite"])
    assert code == 0 and "wrote 8 layers, 512 parameters" in stdout, err
    from lorax.lorax_adapter import load_lorax

    assert len(load_lorax(existing).sigmas) == 8
    assert not [p for p in os.listdir(demo) if p.endswith(".part")]


def test_transfer_many_never_writes_over_a_lora_of_its_folder(readme_run, capsys, monkeypatch):
    """With --out inside --loras, an earlier run's output is also one of the LoRAs: refused, even
    with --overwrite, before anything is loaded."""
    cwd, _ = readme_run
    demo = cwd / "demo"
    loras = cwd / "library"
    loras.mkdir(exist_ok=True)
    (loras / "style.safetensors").write_bytes((demo / "style_lora.safetensors").read_bytes())
    earlier = loras / "style-on-target.safetensors"
    earlier.write_bytes((demo / "style_lora.safetensors").read_bytes())
    before = _digest(earlier)
    code, _, err = _main(capsys, monkeypatch, cwd, [
        "transfer-many", "--source", demo / "source.safetensors", "--target", demo / "target.safetensors",
        "--loras", loras, "--out", loras, "--overwrite"])
    line = _one_error_line(err, earlier)
    assert code == 2 and "the output for style.safetensors would be the same file as the LoRA " \
                         "style-on-target.safetensors" in line
    assert _digest(earlier) == before and sorted(os.listdir(loras)) == ["style-on-target.safetensors",
                                                                        "style.safetensors"]


def test_cli_refuses_every_damaged_adapter_in_one_sentence(readme_run, capsys, monkeypatch, tmp_path):
    """tests/damage.py's damaged copies of the README's LoRA, each given to ``transfer`` (and the
    container ones to ``convert``): exit 2, one ``error:`` line naming the file (and key) and what
    is wrong, no traceback, nothing written. A random byte flip that leaves a working adapter may
    transfer (exit 0, a complete file)."""
    import damage

    cwd, _ = readme_run
    demo = cwd / "demo"
    source, target = demo / "source.safetensors", demo / "target.safetensors"
    refused = set()
    mutations = damage.mutations((demo / "style_lora.safetensors").read_bytes())
    for i, m in enumerate(mutations):
        bad = tmp_path / f"damaged-{i}.safetensors"
        bad.write_bytes(m.data)
        out = tmp_path / f"out-{i}" / "moved.safetensors"
        runs = [["transfer", "--source", source, "--target", target]]
        if m.must_refuse and not m.kind.startswith(("infinite", "NaN")):  # convert refuses before loading too
            runs.append(["convert", "--source", source, "--rank", "8"])
        for argv in runs:
            code, _, err = _main(capsys, monkeypatch, cwd, [*argv, "--adapter", bad, "--out", out])
            assert code in ((2,) if m.must_refuse else (0, 2)), (m.kind, argv[0], err)
            if code == 0:
                assert load_file(str(out)), m.kind
                out.unlink()
                continue
            line = _one_error_line(err, bad)
            for needle in m.needles + ((f"key '{m.key}'",) if m.key else ()):
                assert needle in line, (m.kind, line)
            assert "another architecture" not in line, (m.kind, line)
            assert not out.parent.exists() or not list(out.parent.iterdir()), m.kind
            refused.add(m.kind)
    rules = {m.kind for m in mutations if m.must_refuse and not m.kind.startswith("truncated to")}
    assert len(rules) >= 11 and rules <= refused
    assert refused - rules - {m.kind for m in mutations if m.kind.startswith("truncated to")}, \
        "no random byte flip was refused: the flips did not reach the header's structure"
    # As a user runs it, the three that ended in a raw SafetensorError before, and the damaged LoRA
    # that was called foreign: a fresh process, exit status 2, one line, no traceback.
    by_kind = {m.kind: m for m in mutations}
    for kind in ("unknown dtype", "shape larger than its byte range", "reversed data offsets",
                 "every up half missing"):
        bad = tmp_path / "user.safetensors"
        bad.write_bytes(by_kind[kind].data)
        proc = _run([sys.executable, "-m", "lorax", "transfer", "--source", str(source), "--target", str(target),
                     "--adapter", str(bad), "--out", str(tmp_path / "user-out.safetensors")], cwd)
        line = _one_error_line(proc.stderr, bad)
        assert proc.returncode == 2 and all(n in line for n in by_kind[kind].needles), (kind, proc.stderr)
        assert not (tmp_path / "user-out.safetensors").exists()
