"""A LoRA library at once (issue 14): the scan, the batch transfer and its Ray run.

The acceptance folder (tests/library_models.py) mixes LoRAs of the base, one with modules of a
deeper UNet, a Flux LoRA, a truncated file, a LoRA-X adapter and LyCORIS LoHa / LoKr files.
Every scan row is checked against what LoRA-X Load and Transfer say for that file in the real
host; the batch against single ``transfer`` runs (tensors and metadata bit for bit); the count of
decompositions against the distinct layers the files touch; a re-run after what an interruption
can leave (a missing and a damaged output) against the files it redoes; the Ray run (local, two
workers) against the single-process batch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import host
import library_models as lm
from lorax.errors import LoraxError
from lorax.library_scan import (BatchRow, ScanRow, adapter_files, batch_table, complete_output, output_path,
                                kept_cosine, phi_stats, scan_csv, scan_table)
from lorax.transfer import DEFAULT_MODE
from lorax.verdict import Verdict

FOLDER = "library14"
FITTING = ["loha.safetensors", "lokr.safetensors", "partly.safetensors", "style_a.safetensors",
           "sub/style_b.safetensors", "lorax_adapter.safetensors"]
FAILING = ["damaged.safetensors", "flux_style.safetensors"]
#: Source and target layers the fitting files touch, each once: ATTN1 ∪ ATTN2 ∪ DEEP on both sides.
DISTINCT = 2 * len(set(lm.ATTN1 + lm.ATTN2 + lm.DEEP))


# ---------------------------------------------------------------- pure helpers (no host)

def test_adapter_files_output_names_and_complete_outputs(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.safetensors", "y.pt", ".hidden.safetensors", "notes.txt", "a/.lorax-1.safetensors.part"):
        (tmp_path / name).write_bytes(b"0")
    assert [p.relative_to(tmp_path).as_posix() for p in adapter_files(tmp_path)] == ["a/x.safetensors", "y.pt"]
    with pytest.raises(LoraxError, match="not a folder"):
        adapter_files(tmp_path / "nope")
    out = output_path(tmp_path / "a" / "x.safetensors", tmp_path, tmp_path / "out", "/m/juggernaut.fp16.safetensors")
    assert out == tmp_path / "out" / "a" / "x-on-juggernaut.safetensors"

    settings = {"rank": 320, "threshold": 0.3, "mode": "prolora", "strength_baked": 1.0}
    assert complete_output(tmp_path / "none.safetensors", "x.safetensors", settings) == "missing"
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"t": torch.zeros(64)}, str(good), metadata={"lorax_provenance": json.dumps(
        {"source_adapter": "x.safetensors", **settings})})
    assert complete_output(good, "x.safetensors", settings) is None
    assert complete_output(good, "other.safetensors", settings) == "not a LoRA-X transfer of this adapter"
    assert complete_output(good, "x.safetensors", {**settings, "rank": 64}) == "written with other settings (rank)"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    assert complete_output(cut, "x.safetensors", settings).startswith("damaged (file is truncated")


def test_scan_rows_stats_and_tables():
    rows = [{"phi_hat": 0.9, "phi_hat_right": 0.5, "decision": "transferred"},
            {"phi_hat": 0.2, "phi_hat_right": 0.8, "decision": "skipped: similarity below threshold"},
            {"phi_hat": 0.7, "phi_hat_right": 0.9, "decision": "transferred"},
            {"phi_hat": None, "decision": "missing in target"}]
    assert phi_stats(rows) == (0.5, 0.2, 3, 2)  # min of left/right per layer
    assert phi_stats([]) == (None, None, 0, 0)
    # A layer copied as it is has no Φ̂ and still counts as compared and moved.
    copied = {"phi_hat": None, "decision": "transferred", "how": "copied", "cos_kept": 1.0}
    assert phi_stats(rows + [copied]) == (0.5, 0.2, 4, 3)
    assert phi_stats([copied]) == (None, None, 1, 1)
    assert kept_cosine(rows + [copied]) == 1.0 and kept_cosine(rows) is None
    v = Verdict(target="SD15", modules=10, mapped=8, unmapped_example="lora_unet_x")
    assert v.names_line().startswith("Verdict: fits partly — 8 of 10 adapter modules (80 %) map")
    assert "similarity not scored" in v.names_line()
    assert Verdict(target="SD15", modules=3, mapped=0).names_line() == Verdict(target="SD15", modules=3,
                                                                                mapped=0).line()
    scan = [ScanRow(file="a.safetensors", kind="LoRA", architecture="SD1.x", level="fits", verdict=v.line(),
                    modules=10, mapped=8, compared=8, passed=8, phi_median=0.99, phi_min=0.5),
            ScanRow(file="b.safetensors", error="file 'b': truncated")]
    table = scan_table(scan, title="t")
    assert "a.safetensors  SD1.x" in table and "0.990" in table and "8/10" in table
    assert "2 files: 1 fits, 1 error" in table and "b.safetensors: error: file 'b': truncated" in table
    parsed = list(csv.DictReader(io.StringIO(scan_csv(scan))))
    assert parsed[0]["phi_min"] == "0.5" and parsed[1]["level"] == "error"
    text = batch_table([BatchRow(file="a", output="o", status="written", verdict=v.line(), layers_written=8),
                        BatchRow(file="b", output="p", status="failed", error="boom")])
    assert "1 written, 0 skipped (complete output exists), 1 failed" in text and "failed: b: boom" in text


# ---------------------------------------------------------------- the real host

@pytest.fixture(scope="module")
def library(comfy_host, mini_sd15, mini_sd15_unet_name):
    """(source unet name, target unet name, folder path) in the host's model folders."""
    target = comfy_host.save_unet(host.fine_tune(mini_sd15, seed=1, strength=0.05), "lib14_target.safetensors")
    folder = comfy_host.folders["loras"] / FOLDER
    kinds = lm.write_mixed_library(folder, mini_sd15)
    assert sorted(kinds) == sorted(FITTING + FAILING)
    return mini_sd15_unet_name, target, folder


@pytest.fixture(scope="module")
def pack(comfy_host):
    comfy_host.load_pack(host.REPO_ROOT)
    return comfy_host.pack_module(host.REPO_ROOT)


def _loaders(src, tgt):
    return {"src": {"class_type": "UNETLoader", "inputs": {"unet_name": src, "weight_dtype": "default"}},
            "tgt": {"class_type": "UNETLoader", "inputs": {"unet_name": tgt, "weight_dtype": "default"}}}


def _scan_node(comfy_host, src, tgt, *, with_source: bool, folder: str = FOLDER) -> list[dict]:
    inputs = {"target_model": ["tgt", 0], "folder": folder, "rank": 320, "threshold": 0.3}
    if with_source:
        inputs["source_model"] = ["src", 0]
    out = comfy_host.run_prompt({**_loaders(src, tgt), "scan": {"class_type": "LoraxLibraryScan", "inputs": inputs},
                                 "cap": host.capture(["scan", 1])})
    return json.loads(out["cap"]["value"][0])


def _load_and_transfer(comfy_host, src, tgt, name):
    """What LoRA-X Load + Transfer (default settings) say for one file: the verdict, or the error."""
    try:
        out = comfy_host.run_prompt({**_loaders(src, tgt),
            "load": {"class_type": "LoraxLoad", "inputs": {"model": ["src", 0], "adapter_name": name, "strength": 1.0}},
            "transfer": {"class_type": "LoraxTransfer", "inputs": {
                "source_model": ["src", 0], "target_model": ["tgt", 0], "adapter": ["load", 1], "strength": 1.0,
                "rank": 320, "threshold": 0.3, "mode": DEFAULT_MODE, "exact": False}},
            "cap": host.capture(["transfer", 2])})
    except AssertionError as e:
        return None, str(e)
    return out["cap"]["value"][0].verdict, None


def _load_on(comfy_host, model, name):
    """LoRA-X Load of one file onto ``model``: None when it loads, else its error."""
    try:
        comfy_host.run_prompt({**_loaders(model, model),
            "load": {"class_type": "LoraxLoad", "inputs": {"model": ["tgt", 0], "adapter_name": name, "strength": 1.0}},
            "cap": host.capture(["load", 0])})
    except AssertionError as e:
        return str(e)
    return None


def test_scan_node_with_source_says_what_load_and_transfer_say(comfy_host, pack, library):
    src, tgt, _ = library
    rows = {r["file"].replace(os.sep, "/").split(f"{FOLDER}/", 1)[1]: r for r in _scan_node(comfy_host, src, tgt,
                                                                                            with_source=True)}
    assert sorted(rows) == sorted(FITTING + FAILING)
    for name, row in rows.items():
        verdict, error = _load_and_transfer(comfy_host, src, tgt, f"{FOLDER}/{name}")
        if verdict is not None:
            assert row["verdict"] == verdict, name
        elif row["level"] == "does not fit":
            assert row["verdict"] in error, name
        else:
            assert row["level"] == "error" and row["error"].split(": ", 1)[1] in error, name
    assert rows["style_a.safetensors"]["level"] == "fits" and rows["style_a.safetensors"]["passed"] == 8
    assert rows["partly.safetensors"]["level"] == "fits partly" and rows["partly.safetensors"]["mapped"] == 4
    assert rows["flux_style.safetensors"]["level"] == "does not fit"
    assert rows["flux_style.safetensors"]["architecture"] == "Flux.1 or Chroma"  # no modulation modules
    assert rows["damaged.safetensors"]["level"] == "error" and "truncated" in rows["damaged.safetensors"]["error"]
    assert {rows[n]["kind"] for n in ("loha.safetensors", "lokr.safetensors", "lorax_adapter.safetensors")} == \
        {"LoHa", "LoKr", "LoRA-X"}
    for name in FITTING:  # a 5 % fine-tune: the default copies every layer as it is, with no SVD and so no Φ̂
        row = rows[name]
        assert row["phi_min"] is None and row["passed"] == row["compared"] and row["cos_kept"] == 1.0, name
        assert re.fullmatch(r"\d+ copied", row["moved"]) and "The stock LoRA loader would apply" in row["verdict"], name


def test_scan_node_without_source_says_what_load_on_the_target_says(comfy_host, pack, library):
    src, tgt, _ = library
    rows = {r["file"].replace(os.sep, "/").split(f"{FOLDER}/", 1)[1]: r for r in _scan_node(comfy_host, src, tgt,
                                                                                            with_source=False)}
    for name, row in rows.items():
        error = _load_on(comfy_host, tgt, f"{FOLDER}/{name}")
        assert row["phi_median"] is None and row["compared"] is None
        if name == "lorax_adapter.safetensors":  # maps by name, but Load takes only its own source
            assert "not the source" in error and "not the source" in row["verdict"] and row["level"] == "fits"
        elif row["level"] == "error":
            assert row["error"].split(": ", 1)[1] in error, name
        elif row["level"] == "does not fit":
            assert row["verdict"] in error, name
        else:
            assert error is None, name
    assert rows["partly.safetensors"]["verdict"].startswith("Verdict: fits partly — 4 of 6 adapter modules")


def test_scan_names_every_family_in_its_made_for_column(comfy_host, pack, library):
    """LoRAs of the families people run now, at their released models' widths and in their trainers'
    layouts (tests/dit_families.py), scanned against the SD1.5 target: none fits, and the "made for"
    column names each (its verdict says the same)."""
    import dit_families as df
    from safetensors.torch import save_file

    from lorax.families import family_names

    src, tgt, _ = library
    folder = comfy_host.folders["loras"] / "families24"
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (tensors, family) in df.library_of_families(np.random.default_rng(24)).items():
        save_file(tensors, str(folder / name))
        expected[name] = family
    rows = {os.path.basename(r["file"]): r for r in _scan_node(comfy_host, src, tgt, with_source=False,
                                                               folder="families24")}
    assert {n: r["architecture"] for n, r in rows.items()} == expected
    for name, row in rows.items():
        assert row["level"] == "does not fit", name
        assert f"(its module names say {expected[name]})" in row["verdict"], name
    named = set(expected.values())
    assert {"Wan", "Wan I2V", "HunyuanVideo", "HunyuanVideo 1.5", "LTX-Video", "LTX-2", "Qwen-Image", "Z-Image",
            "Flux.2", "HiDream", "Flux.1 or Chroma"} <= named <= set(family_names())
    assert "Chroma" in family_names()  # a LoRA that trained Chroma's distilled guidance layer says so


# ---------------------------------------------------------------- the command line

def _run(argv, cwd, cache) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(host.REPO_ROOT)
    env["LORAX_SVD_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "lorax", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _tensors_and_meta(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _same_file_content(a, b) -> bool:
    """Tensors bit for bit and metadata equal (the safetensors writer orders the header per process)."""
    (ta, ma), (tb, mb) = _tensors_and_meta(a), _tensors_and_meta(b)
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def cli_paths(comfy_host, library, tmp_path_factory):
    src, tgt, folder = library
    return (comfy_host.folders["diffusion_models"] / src, comfy_host.folders["diffusion_models"] / tgt, folder,
            tmp_path_factory.mktemp("batch"))


@pytest.fixture(scope="module")
def batch_run(cli_paths):
    source, target, folder, work = cli_paths
    proc = _run(["transfer-many", "--source", str(source), "--target", str(target), "--loras", str(folder),
                 "--out", str(work / "out"), *SVD_MODE], work, work / "cache")
    return proc


def test_cli_scan_json_and_csv(cli_paths, comfy_host, pack, library):
    source, target, folder, work = cli_paths
    proc = _run(["scan", "--source", str(source), "--target", str(target), "--loras", str(folder),
                 "--json", str(work / "scan.json"), "--csv", str(work / "scan.csv")], work, work / "scan-cache")
    assert proc.returncode == 0, proc.stderr
    assert "8 files: 5 fits, 1 fits partly, 1 does not fit, 1 error" in proc.stdout
    rows = json.loads((work / "scan.json").read_text())
    assert [r["file"] for r in rows][:2] == ["damaged.safetensors", "flux_style.safetensors"]
    node_rows = {r["file"].replace(os.sep, "/").split(f"{FOLDER}/", 1)[1]: r for r in _scan_node(
        comfy_host, *library[:2], with_source=True)}
    for r in rows:  # the command line and the node agree row for row
        assert r["verdict"] == node_rows[r["file"]]["verdict"] and r["level"] == node_rows[r["file"]]["level"]
    assert len(list(csv.DictReader(io.StringIO((work / "scan.csv").read_text())))) == len(rows)


#: The batch tests count how the SVDs of a batch are shared: they move with a mode that decomposes every layer
#: (the default, auto, copies the layers of this 5 % fine-tune without any SVD; test_scan_node_* cover it).
SVD_MODE = ("--mode", "prolora")


def test_batch_lists_failures_counts_decompositions_and_matches_single_transfers(batch_run, cli_paths):
    source, target, folder, work = cli_paths
    proc = batch_run
    assert proc.returncode == 1, proc.stderr  # two files failed
    assert "8 files: 6 written, 0 skipped (complete output exists), 2 failed" in proc.stdout
    assert "failed: damaged.safetensors: " in proc.stdout and "truncated" in proc.stdout
    assert "failed: flux_style.safetensors: " in proc.stdout and "does not fit" in proc.stdout
    # Each distinct layer decomposed once for the batch, not once per file (33 source layers in all).
    m = re.search(r"SVD: (\d+) layers decomposed for (\d+) distinct layers touched by 6 transfers", proc.stdout)
    assert m and int(m.group(1)) == int(m.group(2)) == DISTINCT, proc.stdout
    for name in FITTING:
        assert output_path(folder / name, folder, work / "out", target).is_file(), name
    # Single `transfer` runs (each with its own cold cache) write the same files.
    for name in ("style_a.safetensors", "lorax_adapter.safetensors"):
        single = work / "single" / output_path(folder / name, folder, work / "out", target).name
        one = _run(["transfer", "--source", str(source), "--target", str(target), "--adapter", str(folder / name),
                    "--out", str(single), *SVD_MODE], work, work / f"cache-{name}")
        assert one.returncode == 0, one.stderr
        assert _same_file_content(single, output_path(folder / name, folder, work / "out", target)), name


def test_batch_rerun_redoes_only_what_is_missing(batch_run, cli_paths):
    source, target, folder, work = cli_paths
    assert batch_run.returncode == 1
    outs = {n: output_path(folder / n, folder, work / "out", target) for n in FITTING}
    # What an interruption can leave with atomic writes: an output not yet written and the
    # temporary file of the write in progress; and a damaged copy from some other writer.
    outs["style_a.safetensors"].unlink()
    (outs["style_a.safetensors"].parent / ".lorax-x.safetensors.part").write_bytes(b"partial")
    outs["loha.safetensors"].write_bytes(outs["loha.safetensors"].read_bytes()[:1000])
    before = {n: p.stat().st_mtime_ns for n, p in outs.items() if p.exists()}
    proc = _run(["transfer-many", "--source", str(source), "--target", str(target), "--loras", str(folder),
                 "--out", str(work / "out"), *SVD_MODE], work, work / "cache")
    assert proc.returncode == 1, proc.stderr
    assert "8 files: 2 written, 4 skipped (complete output exists), 2 failed" in proc.stdout
    assert "written: loha.safetensors" in proc.stdout and "written: style_a.safetensors" in proc.stdout
    assert re.search(r"SVD: 0 layers decomposed", proc.stdout)  # the cache from the first run
    for name in FITTING:
        redone = name in ("style_a.safetensors", "loha.safetensors")
        assert (outs[name].stat().st_mtime_ns != before.get(name)) == redone, name
    assert complete_output(outs["loha.safetensors"], "loha.safetensors",
                           {"rank": 320, "threshold": 0.3, "mode": "prolora", "strength_baked": 1.0}) is None


def test_ray_local_two_workers_writes_the_same_files(batch_run, cli_paths):
    pytest.importorskip("ray", reason="Ray is an optional extra (requirements-dev.txt installs it for CI)")
    source, target, folder, work = cli_paths
    proc = _run(["transfer-many", "--source", str(source), "--target", str(target), "--loras", str(folder),
                 "--out", str(work / "ray-out"), "--ray", "--workers", "2", *SVD_MODE], work, work / "ray-cache")
    assert proc.returncode == 1, proc.stderr
    assert "8 files: 6 written, 0 skipped (complete output exists), 2 failed" in proc.stdout
    m = re.search(r"the driver decomposed (\d+) layers \(every distinct layer the files touch: (\d+)\).*; "
                  r"(\d+) Ray workers decomposed (\d+) and moved 6 files", proc.stdout)
    assert m, proc.stdout
    assert int(m.group(1)) == int(m.group(2)) == DISTINCT and int(m.group(4)) == 0
    assert 1 <= int(m.group(3)) <= 2
    for name in FITTING:
        assert _same_file_content(output_path(folder / name, folder, work / "ray-out", target),
                                  output_path(folder / name, folder, work / "out", target)), name


def test_interrupted_batch_run_again_finishes_only_what_is_missing(cli_paths, mini_sd15):
    """A real interruption (SIGINT as soon as the first file is reported written), then the same
    command again. The signal follows the report line at once, not a poll of the output folder:
    after the first file the rest reuse its factors and similarities and go fast, and a poll let a
    whole batch finish before the signal came. Sent mid-file, a plain KeyboardInterrupt came out of
    torch as a ValueError once, and the batch listed that file as failed and went on: the batch
    stops between steps instead (lorax_cli.batch._StopRequest)."""
    import signal

    source, target, _, work = cli_paths
    folder, out = work / "many", work / "many-out"
    files = lm.write_lora_batch(folder, mini_sd15, 24)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(host.REPO_ROOT), LORAX_SVD_CACHE=str(work / "many-cache"))
    argv = [sys.executable, "-m", "lorax", "transfer-many", "--source", str(source), "--target", str(target),
            "--loras", str(folder), "--out", str(out), *SVD_MODE]
    with open(work / "many-stderr.txt", "w+") as err_file:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=err_file, text=True)
        line = proc.stdout.readline()
        while line and not line.startswith(f"[1/{len(files)}]"):
            line = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=300)
        err_file.seek(0)
        err = line + rest[-1500:] + err_file.read()[-2000:]
    assert line.startswith(f"[1/{len(files)}] written"), err
    assert proc.returncode == -signal.SIGINT, err  # stopped mid-batch, not finished
    assert "stopping after the current layers" in err and " failed" not in err, err
    done = sorted(out.glob("*-on-*.safetensors"))
    assert 1 <= len(done) < len(files)
    settings = {"rank": 320, "threshold": 0.3, "mode": "prolora", "strength_baked": 1.0}
    for path in done:  # whatever an interruption leaves at an output path is a complete file
        assert complete_output(path, path.name.split("-on-")[0] + ".safetensors", settings) is None, path
    again = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (f"{len(files)} files: {len(files) - len(done)} written, {len(done)} skipped (complete output exists), "
            "0 failed") in again.stdout
    assert len(list(out.glob("*-on-*.safetensors"))) == len(files)
