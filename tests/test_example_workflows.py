"""The workflows in example_workflows/ load and run in the real ComfyUI.

Each file is the UI format the frontend saves (nodes with widgets_values, links, groups). The test
converts it to the API form the way the frontend's ``graphToPrompt`` does -- widget inputs in
``INPUT_TYPES`` order (required, then optional), the extra ``control_after_generate`` value after a
seed, links as ``[node id, output slot]``, Notes left out -- checking the graph's structure against
the node classes on the way, and failing loudly when a workflow no longer matches a node (a
widget count off by one would otherwise shift every later value into the wrong input).

The checkpoints and the LoRA the files name are swapped for the synthetic full SD1.5 pair
(``mini_sd15_full_ckpt_name`` / ``mini_sd15_full_ft_ckpt_name``) and a LoRA with UNet and
text-encoder modules; the image size and step count are cut to 64×64 and one step. Everything else
runs as saved, through ``execution.validate_prompt`` and ``PromptExecutor``.

The Wan examples' diffusion models, VAE and LoRA are swapped for the mini Wan models of
``tests/wan_models.py`` (built from ComfyUI's own Wan classes, detected as Wan 2.1 T2V, as Wan 2.1
14B and both Wan 2.2 A14B experts are); the video is cut to 64×64, one frame, and two steps for the
two KSampler (Advanced) nodes of Wan 2.2 (one step each, so both experts sample). Their text
encoder, umT5-XXL, cannot be made small (its configuration is fixed: 5.7 B parameters), so the Wan
*Load CLIP* node is left out and its *CLIP Text Encode* nodes become the zero conditioning of
``tests/host_nodes.py`` with Wan's 4096 text features.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import host
import wan_models
from lorax.transfer import DEFAULT_MODE

WORKFLOWS_DIR = host.REPO_ROOT / "example_workflows"
WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.json"))
#: The example workflows as the frontend saved them with the V1 (``INPUT_TYPES``) nodes, kept from
#: before the move to the V3 node API: users' saved graphs look like these.
V1_WORKFLOWS = sorted((host.TESTS_DIR / "fixtures" / "v1_workflows").glob("*.json"))

# Names used in the example files -> fixture that provides the synthetic stand-in.
CHECKPOINTS = {"v1-5-pruned-emaonly.safetensors": "mini_sd15_full_ckpt_name",
               "dreamshaper_8.safetensors": "mini_sd15_full_ft_ckpt_name"}
LORAS = {"my_style_lora.safetensors": "example_lora_name", "my_wan_lora.safetensors": "wan_lora_name"}
UNETS = {"wan2.1_t2v_14B_fp16.safetensors": "wan_source_unet_name",
         "wan2.1_t2v_14B_finetune.safetensors": "wan_high_noise_unet_name",
         "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": "wan_high_noise_unet_name",
         "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": "wan_low_noise_unet_name"}
VAES = {"wan_2.1_vae.safetensors": "wan_vae_name"}
WAN_EXAMPLES = ("wan21_lora_to_finetune.json", "wan22_lora_onto_both_experts.json")

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
NOTE_TYPES = {"Note", "MarkdownNote"}
REROUTE = "Reroute"
# Combo inputs listing files in a models folder: their options depend on the installation.
FILE_INPUTS = {"ckpt_name", "lora_name", "adapter_name", "unet_name", "vae_name", "clip_name"}


class WorkflowError(AssertionError):
    """The UI workflow does not match the node definitions (stale or malformed)."""


# --------------------------------------------------------------------------------------
# UI format -> API format
# --------------------------------------------------------------------------------------


def _input_specs(cls):
    """``(name, kind, options)`` per input in the order the frontend lays out widgets. A combo is
    ``(["a", "b"], {...})`` in a V1 node and ``("COMBO", {"options": ["a", "b"], ...})`` in a V3 node
    (``INPUT_TYPES`` of ``io.ComfyNode``); both become the V1 form, the list of options."""
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            kind = entry[0]
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if kind == "COMBO" and isinstance(options.get("options"), list):
                kind = options["options"]
            yield name, kind, options


def _is_widget(kind, options) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def _has_control_widget(name, kind, options) -> bool:
    """The frontend adds a 'control after generate' widget (its value is saved right after the
    input's own) when the input asks for it, and -- legacy convention -- for INT seeds."""
    return bool(options.get("control_after_generate")) or (kind == "INT" and name in ("seed", "noise_seed"))


def _type_name(kind) -> str:
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


def ui_to_api(workflow: dict, classes: dict) -> dict:
    """The API prompt of a UI workflow; raises WorkflowError with the node named on any mismatch."""
    if not isinstance(workflow.get("nodes"), list) or not isinstance(workflow.get("links"), list):
        raise WorkflowError("not a UI-format workflow (needs 'nodes' and 'links' lists)")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    if len(nodes) != len(workflow["nodes"]):
        raise WorkflowError("duplicate node ids")
    links = {}
    for link in workflow["links"]:
        if not (isinstance(link, list) and len(link) == 6):
            raise WorkflowError(f"link {link!r} is not [id, origin, origin_slot, target, target_slot, type]")
        links[link[0]] = link
    if workflow.get("last_node_id", 0) < max(nodes) or workflow.get("last_link_id", 0) < max(links, default=0):
        raise WorkflowError("last_node_id / last_link_id lower than the ids in use")

    def where(node):
        return f"node {node['id']} ({node['type']}{', ' + repr(node['title']) if node.get('title') else ''})"

    # Links must agree with both ends, or the frontend drops them on load.
    for lid, (_, origin, oslot, target, tslot, ltype) in links.items():
        if origin not in nodes or target not in nodes:
            raise WorkflowError(f"link {lid} joins missing nodes {origin} -> {target}")
        o, t = nodes[origin], nodes[target]
        out = (o.get("outputs") or [])[oslot] if oslot < len(o.get("outputs") or []) else None
        inp = (t.get("inputs") or [])[tslot] if tslot < len(t.get("inputs") or []) else None
        if out is None or lid not in (out.get("links") or []):
            raise WorkflowError(f"link {lid} is not listed on output {oslot} of {where(o)}")
        if inp is None or inp.get("link") != lid:
            raise WorkflowError(f"link {lid} is not the link of input {tslot} of {where(t)}")
        if not (ltype == out["type"] == inp["type"]):
            raise WorkflowError(f"link {lid} types differ: {out['type']} -> {ltype} -> {inp['type']}")

    def source(lid):
        origin, oslot = links[lid][1], links[lid][2]
        seen = set()
        while nodes[origin]["type"] == REROUTE:
            if origin in seen:
                raise WorkflowError(f"reroute loop at node {origin}")
            seen.add(origin)
            up = nodes[origin]["inputs"][0].get("link")
            if up is None:
                raise WorkflowError(f"reroute node {origin} has no input")
            origin, oslot = links[up][1], links[up][2]
        return origin, oslot

    prompt = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in NOTE_TYPES or ntype == REROUTE:
            continue
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"{where(node)} is muted or bypassed; example workflows keep every node active")
        cls = classes.get(ntype)
        if cls is None:
            raise WorkflowError(f"{where(node)}: no such node type in this ComfyUI")
        returns = list(cls.RETURN_TYPES)
        for slot, out in enumerate(node.get("outputs") or []):
            if slot >= len(returns) or out["type"] != returns[slot]:
                raise WorkflowError(f"{where(node)} output {slot} is {out['type']}, the node returns "
                                    f"{returns[slot] if slot < len(returns) else 'nothing'} there")
        specs = list(_input_specs(cls))
        by_name = {name: (kind, options) for name, kind, options in specs}
        values = node.get("widgets_values", [])
        if not isinstance(values, list):
            raise WorkflowError(f"{where(node)}: widgets_values is not a list")
        values = list(values)
        widgets = [(n, k, o) for n, k, o in specs if _is_widget(k, o)]
        expected = sum(2 if _has_control_widget(n, k, o) else 1 for n, k, o in widgets)
        if len(values) != expected:
            raise WorkflowError(f"{where(node)} has {len(values)} widget values, the node has {expected} "
                                f"({', '.join(n for n, _, _ in widgets)}): the workflow is stale")
        inputs = {}
        for name, kind, options in widgets:
            value = values.pop(0)
            if _has_control_widget(name, kind, options):
                control = values.pop(0)
                if control not in CONTROL_VALUES:
                    raise WorkflowError(f"{where(node)}: '{name}' is followed by {control!r}, not a "
                                        "control_after_generate value")
            if isinstance(kind, (list, tuple)) and name not in FILE_INPUTS and value not in kind:
                raise WorkflowError(f"{where(node)}: {value!r} is not an option of '{name}'")
            inputs[name] = value
        for slot in node.get("inputs") or []:
            name = slot["name"]
            if name not in by_name:
                raise WorkflowError(f"{where(node)} has an input '{name}' the node does not have")
            kind, options = by_name[name]
            if slot["type"] != _type_name(kind) and not (slot.get("widget") and _is_widget(kind, options)):
                raise WorkflowError(f"{where(node)} input '{name}' is {slot['type']}, the node wants {_type_name(kind)}")
            if slot.get("link") is not None:
                origin, oslot = source(slot["link"])
                inputs[name] = [str(origin), oslot]
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or ntype}}
    return prompt


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack(comfy_host):
    comfy_host.load_pack(host.REPO_ROOT)
    return comfy_host.pack_module(host.REPO_ROOT)


@pytest.fixture(scope="module")
def example_lora_name(comfy_host, mini_sd15):
    """A kohya LoRA with UNet modules and SD1 text-encoder modules (``lora_te_text_model_...``)."""
    unet_keys = [f"input_blocks.1.1.transformer_blocks.0.{a}.{p}.weight" for a in ("attn1", "attn2")
                 for p in ("to_q", "to_k", "to_v", "to_out.0")] + ["middle_block.1.proj_in.weight"]
    te_modules = [(layer, m) for layer in (0, 5, 11) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1")]
    lora, _ = host.make_sd15_lora_with_te(mini_sd15, unet_keys, te_modules, rank=8, alpha=4.0, seed=21)
    return comfy_host.save_lora(lora, "example_style_lora.safetensors")


@pytest.fixture(scope="module")
def wan_models_saved(comfy_host):
    """The mini Wan source, its two fine-tunes (the experts; the first also stands for a Wan 2.1 fine-tune)
    and the mini Wan VAE, saved where UNETLoader and VAELoader find them; and a LoRA for Wan."""
    source = wan_models.build_mini_wan(seed=0)
    high, low = wan_models.build_mini_wan_experts(source)
    names = {f"wan_{n}_unet_name": comfy_host.save_unet(sd, f"example_wan_{n}.safetensors")
             for n, sd in (("source", source), ("high_noise", high), ("low_noise", low))}
    names["wan_vae_name"] = comfy_host._save("vae", wan_models.build_mini_wan_vae(seed=0), "example_wan_vae.safetensors",
                                             None)
    lora = wan_models.wan_lora(wan_models.wan_layout(), np.random.default_rng(22), rank=4)
    names["wan_lora_name"] = comfy_host.save_lora(lora, "example_wan_lora.safetensors")
    return names


@pytest.fixture(scope="module")
def wan_source_unet_name(wan_models_saved):
    return wan_models_saved["wan_source_unet_name"]


@pytest.fixture(scope="module")
def wan_high_noise_unet_name(wan_models_saved):
    return wan_models_saved["wan_high_noise_unet_name"]


@pytest.fixture(scope="module")
def wan_low_noise_unet_name(wan_models_saved):
    return wan_models_saved["wan_low_noise_unet_name"]


@pytest.fixture(scope="module")
def wan_vae_name(wan_models_saved):
    return wan_models_saved["wan_vae_name"]


@pytest.fixture(scope="module")
def wan_lora_name(wan_models_saved):
    return wan_models_saved["wan_lora_name"]


@pytest.fixture(scope="module")
def executor(comfy_host):
    """One PromptExecutor for the module, as one ComfyUI session: its cache keeps the loaded
    checkpoints between the workflows (same files, same loader inputs) instead of reading 1.3 GB
    twice per graph."""
    ex = comfy_host.new_executor()
    yield ex
    del ex
    comfy_host.unload_all()


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _prepare(prompt: dict, request) -> dict:
    """Swap the example's model files for the synthetic ones; shrink the image and steps."""
    prompt = copy.deepcopy(prompt)
    wan_text = [nid for nid, n in prompt.items() if n["class_type"] == "CLIPLoader" and n["inputs"]["type"] == "wan"]
    for nid in wan_text:  # umT5-XXL: the zero conditioning instead (module docstring)
        del prompt[nid]
    for nid, node in prompt.items():
        inputs = node["inputs"]
        if node["class_type"] == "CLIPTextEncode" and inputs["clip"][0] in wan_text:
            node["class_type"] = host.ZERO_COND_NODE
            node["inputs"] = inputs = {"context_dim": wan_models.TEXT_DIM, "tokens": 16}
        for field, table in (("ckpt_name", CHECKPOINTS), ("adapter_name", LORAS), ("lora_name", LORAS),
                             ("unet_name", UNETS), ("vae_name", VAES)):
            if field in inputs and not isinstance(inputs[field], list):
                if inputs[field] not in table:
                    raise AssertionError(f"node {nid}: no synthetic stand-in for {field} {inputs[field]!r}")
                inputs[field] = request.getfixturevalue(table[inputs[field]])
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=1)
        if node["class_type"] == "EmptyHunyuanLatentVideo":
            inputs.update(width=64, height=64, length=1, batch_size=1)
        if node["class_type"] == "KSampler":
            inputs["steps"] = 1
        if node["class_type"] == "KSamplerAdvanced":
            # Two steps; a split inside the schedule (Wan 2.2's experts: 0-10 and 10-20 of 20) at step 1.
            steps, inputs["steps"] = inputs["steps"], 2
            for field in ("start_at_step", "end_at_step"):
                if 0 < inputs[field] < steps:
                    inputs[field] = 1
        if node["class_type"] == "LoraxTrain":
            inputs["steps"] = 2  # at least 2: Plot Loss Graph divides by max(loss) - min(loss)
    return prompt


TRANSFER_NODES = {"LoraxTransfer", "LoraxTransferTwoExperts"}


def _upstream_types(prompt: dict, nid: str) -> set[str]:
    """The class types of node ``nid`` and of every node it draws from."""
    seen, todo = set(), [nid]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += [v[0] for v in prompt[n]["inputs"].values() if isinstance(v, list) and len(v) == 2 and v[0] in prompt]
    return {prompt[n]["class_type"] for n in seen}


def _image_file(comfy_host, entry) -> Path:
    folder = comfy_host.folders["output" if entry["type"] == "output" else "temp"]
    return folder / entry.get("subfolder", "") / entry["filename"]


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_the_example_workflows_the_readme_lists_exist():
    assert {p.name for p in WORKFLOWS} >= {"transfer_lora_to_finetune.json", "similarity_report.json",
                                          "save_transferred_lora.json", "train_lorax_adapter.json",
                                          "convert_lora_to_lorax.json", *WAN_EXAMPLES}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_runs(comfy_host, pack, executor, path, request):
    workflow = _load(path)
    assert workflow.get("version") == 0.4
    for node in workflow["nodes"]:  # laid out and titled for people opening the file
        assert len(node["pos"]) == 2 and len(node["size"]) == 2 and node["size"][0] >= 200, node["id"]
    api = ui_to_api(workflow, comfy_host.nodes.NODE_CLASS_MAPPINGS)
    prompt = _prepare(api, request)
    # Hand the decoded images and plots back too, to check them as tensors.
    for nid, node in list(prompt.items()):
        if node["class_type"] in ("SaveImage", "PreviewImage"):
            prompt[f"cap_{nid}"] = host.capture(node["inputs"]["images"])
        if node["class_type"] in ("KSampler", "KSamplerAdvanced"):  # the model each sampler gets
            prompt[f"cap_model_{nid}"] = host.capture(node["inputs"]["model"])
    out = comfy_host.run_prompt(prompt, executor=executor)
    for key in (k for k in prompt if k.startswith("cap_model_")):
        if _upstream_types(prompt, prompt[key]["inputs"]["value"][0]) & TRANSFER_NODES:
            assert out[key]["value"][0].patches, f"{key}: the model from a LoRA-X transfer carries no patches"

    output_nodes = [nid for nid, n in prompt.items() if getattr(
        comfy_host.nodes.NODE_CLASS_MAPPINGS[n["class_type"]], "OUTPUT_NODE", False) and not nid.startswith("cap_")]
    assert output_nodes and all(nid in out for nid in output_nodes), (output_nodes, list(out))
    for nid in output_nodes:
        ctype = prompt[nid]["class_type"]
        if ctype in ("SaveImage", "PreviewImage"):
            tensor = out[f"cap_{nid}"]["value"][0]
            assert torch.isfinite(tensor).all(), nid
            (entry,) = out[nid]["images"]
            file = _image_file(comfy_host, entry)
            assert file.is_file(), file
            pixels = np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255.0
            assert pixels.shape[:2] == tuple(tensor.shape[1:3])
            assert pixels.std() > 0.02 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8, (nid, file)
            if ctype == "SaveImage":
                assert entry["type"] == "output" and pixels.shape[:2] == (64, 64)
            else:  # the LoRA-X plot: a wide chart with bars
                assert pixels.shape[1] > pixels.shape[0] >= 200, pixels.shape
                # The examples' targets are fine-tunes: the default mode copies their layers (teal
                # bars); a projecting mode would draw them green ("transferred / passes").
                colours = [np.array(pack.nodes.plot.COLORS[c]) / 255.0 for c in ("copied", "transferred")]
                assert any((np.abs(pixels - c).max(axis=-1) < 0.01).sum() > 100 for c in colours), \
                    "no bars in the 'copied' or 'transferred / passes' colour in the plot"
        elif ctype == "SaveAnimatedWEBP":
            (entry,) = out[nid]["images"]
            with Image.open(_image_file(comfy_host, entry)) as video:
                assert video.size == (64, 64), video.size
                pixels = np.asarray(video.convert("RGB"), dtype=np.float32) / 255.0
            assert pixels.std() > 0.02, "a flat frame"
        elif ctype == "LoraxSimilarityReport":
            assert "layers pass the threshold" in out[nid]["text"][0]
        elif ctype == "LoraxTrain":
            text = out[nid]["text"][0]
            assert "trained parameters:" in text and "saved to loras/" in text, text
            assert (comfy_host.folders["loras"] / text.split("saved to loras/", 1)[1].split(" (")[0]).is_file()
        elif ctype == "LossGraphNode":
            (entry,) = out[nid]["images"]
            assert _image_file(comfy_host, entry).is_file()
        elif ctype == "LoraxConvert":
            text = out[nid]["text"][0]
            assert "layers converted" in text and "saved to loras/" in text, text
        elif ctype == "LoraxSave":
            _check_saved_lora(comfy_host, executor, prompt, nid, out[nid]["text"][0])
        else:
            raise AssertionError(f"no check written for output node {nid} ({ctype})")


@pytest.mark.parametrize("name", WAN_EXAMPLES)
def test_wan_example_nodes_do_not_overlap(name):
    """The browser test runs the other examples from the page and checks that no node covers another
    after the run; the Wan ones it cannot run (see its ``WAN_EXAMPLES``), so their layout is checked
    as saved: no two nodes' boxes (title bar of 30 included) overlap, and every node lies inside a group."""
    workflow = _load(WORKFLOWS_DIR / name)
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - 30, n["size"][0], n["size"][1] + 30) for n in workflow["nodes"]]
    overlaps = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
                if a[1] < b[1] + b[3] and b[1] < a[1] + a[3] and a[2] < b[2] + b[4] and b[2] < a[2] + a[4]]
    assert not overlaps, overlaps
    groups = [g["bounding"] for g in workflow["groups"]]
    outside = [nid for nid, x, y, w, h in boxes
               if not any(gx <= x and gy <= y and x + w <= gx + gw and y + h <= gy + gh for gx, gy, gw, gh in groups)]
    assert not outside, f"nodes outside every group: {outside}"


def _check_saved_lora(comfy_host, executor, prompt, nid, message):
    assert message.startswith("Saved ") and "loras/" in message, message
    rel = message.split("loras/", 1)[1].strip()
    path = comfy_host.folders["loras"] / rel
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    unet_modules = {k.split(".")[0] for k in keys if k.startswith("lora_unet_")}
    te_modules = {k.split(".")[0] for k in keys if k.startswith("lora_te_")}
    assert unet_modules and te_modules, "the target's CLIP is connected: both parts are saved"
    assert len(keys) == 3 * (len(unet_modules) + len(te_modules))  # lora_up, lora_down, alpha each
    # The stock loader takes every module of it onto the target checkpoint.
    transfer = prompt[prompt[nid]["inputs"]["transfer"][0]]
    target_loader = prompt[transfer["inputs"]["target_model"][0]]
    out = comfy_host.run_prompt({
        "ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": target_loader["inputs"]["ckpt_name"]}},
        "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ck", 0], "clip": ["ck", 1], "lora_name": rel,
                                                        "strength_model": 1.0, "strength_clip": 1.0}},
        "m": host.capture(["lora", 0]), "c": host.capture(["lora", 1]),
    }, executor=executor)
    assert len(out["m"]["value"][0].patches) == len(unet_modules)
    assert len(out["c"]["value"][0].patcher.patches) == len(te_modules)


@pytest.mark.parametrize("path", V1_WORKFLOWS, ids=[p.stem for p in V1_WORKFLOWS])
def test_workflow_saved_with_the_v1_nodes_loads_into_the_v3_nodes(comfy_host, pack, path, request):
    """A graph saved before the move keeps working: its widget values line up with the V3 nodes'
    inputs and its links with their outputs (``ui_to_api`` fails on any shift), ComfyUI's own
    ``validate_prompt`` accepts it, and it is the very graph the shipped example now holds (only
    positions and sizes may differ), which ``test_example_workflow_runs`` runs."""
    classes = comfy_host.nodes.NODE_CLASS_MAPPINGS
    api = ui_to_api(_load(path), classes)
    assert ui_to_api(_load(WORKFLOWS_DIR / path.name), classes) == _with_mode_of_today(api)
    prompt = _prepare(api, request)
    valid = asyncio.run(comfy_host.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert valid[0], (valid[1], valid[3])
    assert sorted(valid[2]) == sorted(nid for nid, n in prompt.items() if getattr(
        classes[n["class_type"]], "OUTPUT_NODE", False))


def _with_mode_of_today(api: dict) -> dict:
    """The V1 graphs were saved with 0.2.0's default mode (``prolora``); 0.3.0's examples hold its
    default (``auto``) and nothing else may differ. The old value stays valid: ``validate_prompt``
    checks the V1 graph as saved."""
    out = copy.deepcopy(api)
    for node in out.values():
        if node["inputs"].get("mode") == "prolora":
            node["inputs"]["mode"] = DEFAULT_MODE
    return out


def test_the_examples_transfer_in_the_default_mode(comfy_host, pack):
    """Every shipped example moves its LoRA in the pack's default mode (chosen on trained models,
    docs/fidelity.md), read through the widget order of today's nodes."""
    classes = comfy_host.nodes.NODE_CLASS_MAPPINGS
    modes = {(p.name, nid): node["inputs"]["mode"] for p in WORKFLOWS
             for nid, node in ui_to_api(_load(p), classes).items() if node["class_type"] in TRANSFER_NODES}
    assert len(modes) >= 5 and set(modes.values()) == {DEFAULT_MODE}, modes


def test_converter_fails_loudly_on_a_stale_workflow(comfy_host, pack):
    workflow = _load(WORKFLOWS_DIR / "transfer_lora_to_finetune.json")
    classes = comfy_host.nodes.NODE_CLASS_MAPPINGS
    api = ui_to_api(workflow, classes)
    transfer_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "LoraxTransfer")
    assert api[str(transfer_id)]["inputs"]["mode"] == "auto" and api[str(transfer_id)]["inputs"]["rank"] == 320
    ks = next(nid for nid, n in api.items() if n["class_type"] == "KSampler")
    assert api[ks]["inputs"]["seed"] == 42 and api[ks]["inputs"]["steps"] == 25  # "fixed" consumed after seed

    def mutate(fn):
        w = copy.deepcopy(workflow)
        fn(w)
        return w

    def node_of(w, nid):
        return next(n for n in w["nodes"] if n["id"] == nid)

    too_few = mutate(lambda w: node_of(w, transfer_id)["widgets_values"].pop())
    too_many = mutate(lambda w: node_of(w, transfer_id)["widgets_values"].append(1))
    no_control = mutate(lambda w: node_of(w, int(ks))["widgets_values"].pop(1))
    for stale in (too_few, too_many):
        with pytest.raises(WorkflowError, match=rf"node {transfer_id} \(LoraxTransfer.*widget values.*stale"):
            ui_to_api(stale, classes)
    with pytest.raises(WorkflowError, match="widget values"):
        ui_to_api(no_control, classes)
    bad_type = mutate(lambda w: w["links"][0].__setitem__(5, "LATENT"))
    with pytest.raises(WorkflowError, match="types differ"):
        ui_to_api(bad_type, classes)
    unknown = mutate(lambda w: node_of(w, transfer_id).__setitem__("type", "LoraxTransferOld"))
    with pytest.raises(WorkflowError, match="no such node type"):
        ui_to_api(unknown, classes)
