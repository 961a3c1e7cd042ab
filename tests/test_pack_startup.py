"""The pack starts cleanly inside ComfyUI: no error at import, its nodes and web folder registered,
every input documented.

``test_fresh_comfyui_start_with_the_pack_installed`` is the closest thing to a user's first start:
a new Python process (nothing imported, working directory outside the repository, so ``lorax``
is importable only through the pack's own ``sys.path`` entry) boots ComfyUI with the test host,
finds the pack as ``custom_nodes/ComfyUI-LoRA-X`` (a symlink to this repository) and loads it with
ComfyUI's own ``nodes.init_external_custom_nodes`` -- what ``main.py`` runs at startup. The other
tests check the pack as loaded in this process (``nodes.load_custom_node``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import host

CORE_NODES = {
    "LoraxLoad": "LoRA-X Load",
    "LoraxTransfer": "LoRA-X Transfer",
    "LoraxSimilarityReport": "Subspace Similarity Report",
    "LoraxSave": "LoRA-X Save",
}
INSTALLED_NAME = "ComfyUI-LoRA-X"

_PROBE = textwrap.dedent('''
    import asyncio, json, logging, os, sys, time
    sys.path.insert(0, {tests!r})
    import host
    h = host.get_comfy_host()
    nodes = h.nodes
    pack_dir = os.path.join(str(h.folders["custom_nodes"]), {name!r})
    os.symlink({repo!r}, pack_dir)
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append({{"level": record.levelname, "levelno": record.levelno, "message": record.getMessage(),
                             "exc": self.formatter.formatException(record.exc_info) if record.exc_info else ""}})

    grab = Grab(level=logging.WARNING)
    grab.setFormatter(logging.Formatter())
    root = logging.getLogger()
    root.addHandler(grab)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    t0 = time.perf_counter()
    try:
        asyncio.run(nodes.init_external_custom_nodes())
    finally:
        root.removeHandler(grab)
    seconds = time.perf_counter() - t0
    added = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
    print(json.dumps({{
        "records": records, "added": added, "seconds": seconds,
        "display": {{k: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(k) for k in added}},
        "web": nodes.EXTENSION_WEB_DIRS.get({name!r}),
        "web_files": sorted(os.listdir(nodes.EXTENSION_WEB_DIRS[{name!r}])) if {name!r} in nodes.EXTENSION_WEB_DIRS else [],
        "modules": {{k: getattr(nodes.NODE_CLASS_MAPPINGS[k], "RELATIVE_PYTHON_MODULE", None) for k in added}},
        "lorax_from": getattr(sys.modules.get("lorax"), "__file__", None),
    }}))
''')


def _problems(records, pack_markers) -> list[str]:
    """Records at ERROR or above, and any warning carrying a traceback or naming the pack."""
    out = []
    for r in records:
        text = r["message"] + "\n" + r.get("exc", "")
        if r["levelno"] >= logging.ERROR or "Traceback" in text or any(m in text for m in pack_markers):
            out.append(f"{r['level']}: {text.strip()}")
    return out


def test_fresh_comfyui_start_with_the_pack_installed(tmp_path):
    script = tmp_path / "lorax_startup_probe.py"
    script.write_text(_PROBE.format(tests=str(host.TESTS_DIR), repo=str(host.REPO_ROOT), name=INSTALLED_NAME))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    tree, _ = host.locate_comfyui()
    if tree is not None:
        env["COMFYUI_PATH"] = str(tree)  # the same tree as this session, found without the repo's help
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = _problems(info["records"], (INSTALLED_NAME, str(host.REPO_ROOT)))
    assert not problems, "\n".join(problems)
    assert set(CORE_NODES) <= set(info["added"]), info["added"]
    for node, display in CORE_NODES.items():
        assert info["display"][node] == display
    assert all(info["display"][k] for k in info["added"])  # every node the pack adds has a display name
    assert set(info["modules"].values()) == {f"custom_nodes.{INSTALLED_NAME}"}
    assert info["web"] and Path(info["web"]).parts[-3:] == ("custom_nodes", INSTALLED_NAME, "web")
    assert "lorax.js" in info["web_files"]
    # The library came from the pack folder (its own sys.path entry), not from the working directory.
    assert info["lorax_from"] and Path(info["lorax_from"]).parent.parent.name == INSTALLED_NAME


@pytest.fixture(scope="module")
def pack_nodes(comfy_host):
    return comfy_host.load_pack(host.REPO_ROOT)


def test_reloading_the_pack_logs_no_error(comfy_host, pack_nodes):
    records = []

    class _Grab(logging.Handler):
        def emit(self, record):
            records.append({"level": record.levelname, "levelno": record.levelno, "message": record.getMessage(),
                            "exc": logging.Formatter().formatException(record.exc_info) if record.exc_info else ""})

    grab = _Grab(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(grab)
    try:
        comfy_host.load_pack(host.REPO_ROOT, force=True)  # raises with ComfyUI's log if the load fails
    finally:
        root.removeHandler(grab)
    problems = _problems(records, (str(host.REPO_ROOT),))
    assert not problems, "\n".join(problems)
    declared = comfy_host.declared_nodes(comfy_host.pack_module(host.REPO_ROOT))
    for node in CORE_NODES:  # the fresh import's classes are the ones the host now serves
        assert comfy_host.nodes.NODE_CLASS_MAPPINGS[node] is declared[node]


def test_nodes_display_names_and_web_directory_are_registered(comfy_host, pack_nodes):
    nodes = comfy_host.nodes
    declared = comfy_host.declared_nodes(comfy_host.pack_module(host.REPO_ROOT))
    for node, display in CORE_NODES.items():
        assert nodes.NODE_CLASS_MAPPINGS[node] is declared[node]
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node] == display
    for node in declared:
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node), node
    web = nodes.EXTENSION_WEB_DIRS[nodes.get_module_name(str(host.REPO_ROOT))]
    assert Path(web) == host.REPO_ROOT / "web" and (Path(web) / "lorax.js").is_file()


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            yield section, name, entry


def test_every_input_and_output_of_every_lorax_node_is_documented(comfy_host, pack_nodes):
    missing = []
    for node, cls in comfy_host.declared_nodes(comfy_host.pack_module(host.REPO_ROOT)).items():
        for section, name, entry in _inputs(cls):
            options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            tip = options.get("tooltip")
            if not (isinstance(tip, str) and tip.strip()):
                missing.append(f"{node}.{name} ({section})")
        if not (isinstance(getattr(cls, "DESCRIPTION", None), str) and cls.DESCRIPTION.strip()):
            missing.append(f"{node}: DESCRIPTION")
        tips = getattr(cls, "OUTPUT_TOOLTIPS", None)
        if tips is not None and len(tips) != len(cls.RETURN_TYPES):
            missing.append(f"{node}: {len(tips)} OUTPUT_TOOLTIPS for {len(cls.RETURN_TYPES)} outputs")
    assert not missing, "undocumented: " + ", ".join(missing)
