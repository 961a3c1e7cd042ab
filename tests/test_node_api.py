"""Every LoRA-X node is a V3 node of one pinned ``comfy_api`` version, with the V1 nodes' definitions.

ComfyUI's own nodes moved to the V3 schema (``io.ComfyNode`` with ``define_schema``/``execute``,
registered through ``comfy_entrypoint``); the versioned ``comfy_api`` packages exist so that a
custom node keeps loading across host releases. The pack imports 0.0.2, which the CI host (0.3.75)
and a current ComfyUI both offer. What users see must not change with the move: the node ids,
display names, inputs (names, order, types, defaults, limits, tooltips), outputs and descriptions
are compared with ``tests/fixtures/v1_node_definitions.json``, dumped from the V1 nodes before the
move. Saved workflows: ``test_example_workflows.py`` (the V1-saved example files).
"""

from __future__ import annotations

import json
import re

import pytest

import host

PINNED = "comfy_api.v0_0_2"
V1_DEFINITIONS = json.loads((host.TESTS_DIR / "fixtures" / "v1_node_definitions.json").read_text(encoding="utf-8"))
#: Combo inputs listing files of a models folder: their options are whatever the folder holds.
FILE_INPUTS = {"adapter_name"}


@pytest.fixture(scope="module")
def pack(comfy_host):
    comfy_host.load_pack(host.REPO_ROOT)
    return comfy_host.pack_module(host.REPO_ROOT)


def _pack_sources() -> list:
    return [host.REPO_ROOT / "__init__.py"] + sorted((host.REPO_ROOT / "nodes").glob("*.py"))


def test_the_api_version_is_one_both_hosts_offer(comfy_host):
    import importlib

    from comfy_api.version_list import supported_versions

    api = importlib.import_module(PINNED)
    assert "0.0.2" in {v.VERSION for v in supported_versions}  # the CI host lists it as supported
    for name in ("io", "ui", "ComfyExtension"):  # what the pack imports from it
        assert hasattr(api, name), name


def test_every_comfy_api_import_is_of_the_pinned_version():
    found = []
    for path in _pack_sources():
        for line in path.read_text(encoding="utf-8").splitlines():
            m = re.match(r"\s*(?:from|import)\s+(comfy_api[\w.]*)", line)
            if m:
                found.append((path.name, m.group(1)))
    assert found, "no comfy_api import found: the pack does not use the host's node API"
    assert all(module == PINNED for _, module in found), found


def test_the_pack_registers_v3_nodes_through_its_entrypoint(comfy_host, pack):
    from comfy_api.v0_0_2 import ComfyExtension, io

    # ComfyUI takes the V1 path whenever NODE_CLASS_MAPPINGS exists; the pack must not offer it.
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")
    declared = comfy_host.declared_nodes(pack)
    assert list(declared) == [cls.GET_SCHEMA().node_id for cls in pack.NODE_CLASSES]
    assert isinstance(pack.nodes.LoraxExtension(), ComfyExtension)
    for node_id, cls in declared.items():
        assert issubclass(cls, io.ComfyNode), node_id
        assert comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id] is cls
        # custom_nodes.<pack folder>: where the frontend looks for the node's help page
        assert cls.RELATIVE_PYTHON_MODULE == f"custom_nodes.{host.REPO_ROOT.name}", cls.RELATIVE_PYTHON_MODULE


def _v1_form(spec: dict) -> dict:
    """A V3 node's ``INPUT_TYPES`` in the V1 form the fixture holds: combos as their option list, and
    without the two keys V3 always writes with their default value (``multiselect``, ``multiline``
    False), which V1 left out and the frontend reads the same either way."""
    out = {}
    for section in ("required", "optional"):
        entries = {}
        for name, (kind, options) in (spec.get(section) or {}).items():
            options = {k: v for k, v in options.items() if not (k in ("multiselect", "multiline") and v is False)}
            if kind == "COMBO":
                kind = options.pop("options")
            entries[name] = [kind, options]
        out[section] = entries
    return out


#: Deliberate changes since the V1 definitions: the layer-map combo had no default, so a new node
#: showed (and sent) "name", the first option, while the docs and the node's code use "similarity".
#: Saved workflows keep the value they were saved with.
CHANGED = {(node, "layer_map"): {"default": "similarity"} for node in ("LoraxTransfer", "LoraxSimilarityReport")}
#: 0.3.0 (the fidelity issue): new transfer modes, `auto` the default, chosen on trained models. The old
#: options stay selectable, so workflows saved with `prolora` or `lorax` keep loading.
NEW_MODES = ["auto", "copy", "transport", "prolora", "prolora_cross", "lorax"]
CHANGED[("LoraxTransfer", "mode")] = {"default": "auto"}
CHANGED_KIND = {("LoraxTransfer", "mode"): NEW_MODES}
CHANGED_TEXT = {("LoraxTransfer", "mode"): "auto (default): copy each layer's change as it is",
                "LoraxTransfer": "Moves an adapter trained on the source checkpoint onto the target checkpoint without "
                                 "data or training: each layer's change is copied where the target layer barely moved"}


def test_node_definitions_are_the_v1_nodes(comfy_host, pack):
    nodes = comfy_host.nodes
    declared = comfy_host.declared_nodes(pack)
    assert set(V1_DEFINITIONS) <= set(declared)
    for node_id, v1 in V1_DEFINITIONS.items():
        cls = declared[node_id]
        now = _v1_form(host.node_inputs(cls))
        for section in ("required", "optional"):
            assert list(now[section]) == list(v1["input"][section]), (node_id, section)  # names and order
            for name, (kind, options) in v1["input"][section].items():
                got_kind, got_options = now[section][name]
                if name in FILE_INPUTS:
                    assert isinstance(got_kind, list), (node_id, name)
                elif (node_id, name) in CHANGED_KIND:
                    assert got_kind == CHANGED_KIND[(node_id, name)] and set(kind) <= set(got_kind), (node_id, name)
                else:
                    assert got_kind == kind, (node_id, name)
                expected = {**options, **CHANGED.get((node_id, name), {})}
                if (node_id, name) in CHANGED_TEXT:
                    assert got_options.pop("tooltip").startswith(CHANGED_TEXT[(node_id, name)]), (node_id, name)
                    expected.pop("tooltip")
                assert got_options == expected, (node_id, name)
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == v1["display_name"]
        description = v1["description"] if node_id not in CHANGED_TEXT else cls.DESCRIPTION
        assert node_id not in CHANGED_TEXT or cls.DESCRIPTION.startswith(CHANGED_TEXT[node_id]), node_id
        assert (cls.CATEGORY, cls.DESCRIPTION, bool(cls.OUTPUT_NODE)) == (
            v1["category"], description, v1["output_node"]), node_id
        assert list(cls.RETURN_TYPES) == v1["output"], node_id
        assert list(cls.RETURN_NAMES) == v1["output_name"], node_id
        assert list(cls.OUTPUT_TOOLTIPS) == v1["output_tooltips"], node_id
