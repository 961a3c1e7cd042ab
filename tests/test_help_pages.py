"""Every node has a help page where ComfyUI's frontend looks for one, covering what the node has.

The frontend's node help panel fetches ``/extensions/<pack folder>/docs/<node id>.md`` (or
``.../<node id>/<locale>.md`` first) from the pack's ``WEB_DIRECTORY``, and resolves relative
pictures against ``/extensions/<pack folder>/docs/``. So the pages are ``web/docs/<node id>.md``.
This checks them against the nodes themselves, so a new input or a changed default cannot go
undocumented: a table row per input and output (named as the node names it), the default the node
really has, pictures that exist. That the panel shows them: ``test_browser_report.py``.
"""

from __future__ import annotations

import re

import pytest

import host

DOCS = host.REPO_ROOT / "web" / "docs"


@pytest.fixture(scope="module")
def pack_nodes(comfy_host):
    comfy_host.load_pack(host.REPO_ROOT)
    return comfy_host.declared_nodes(comfy_host.pack_module(host.REPO_ROOT))


def _rows(page: str, heading: str) -> dict[str, list[str]]:
    """``{name: cells}`` of the table under ``## heading`` (first cell: `` `name` `` plus a remark)."""
    section = page.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([^`]+)`", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def _default_text(default) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    if default == "":
        return "empty"
    return str(default)


def test_every_node_has_a_help_page_that_covers_its_inputs_outputs_and_defaults(comfy_host, pack_nodes):
    problems = []
    for node_id, cls in pack_nodes.items():
        path = DOCS / f"{node_id}.md"
        if not path.is_file():
            problems.append(f"{node_id}: no {path.relative_to(host.REPO_ROOT)}")
            continue
        page = path.read_text(encoding="utf-8")
        title = comfy_host.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        if not page.startswith(f"# {title}\n"):
            problems.append(f"{node_id}: the page does not open with '# {title}'")
        inputs, outputs = _rows(page, "Inputs"), _rows(page, "Outputs")
        spec = host.node_inputs(cls)
        for section in ("required", "optional"):
            for name, (kind, options) in (spec.get(section) or {}).items():
                row = inputs.get(name)
                if row is None:
                    problems.append(f"{node_id}: input '{name}' has no row")
                    continue
                if section == "optional" and "(optional)" not in row[0]:
                    problems.append(f"{node_id}: input '{name}' is optional, the page does not say so")
                if "default" in options and _default_text(options["default"]) not in row[2]:
                    problems.append(f"{node_id}: input '{name}' defaults to {options['default']!r}, the page says "
                                    f"{row[2]!r}")
        for name, kind in zip(cls.RETURN_NAMES, cls.RETURN_TYPES):
            if outputs.get(name, [None, None])[1] != kind:
                problems.append(f"{node_id}: output '{name}' ({kind}) has no row of that type")
        for extra in set(inputs) - set(spec.get("required", {})) - set(spec.get("optional", {})):
            problems.append(f"{node_id}: the page documents an input '{extra}' the node does not have")
        for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page):
            if not (DOCS / picture).is_file():
                problems.append(f"{node_id}: picture {picture} not found under web/docs/")
        if "## Typical graph" not in page:
            problems.append(f"{node_id}: no typical graph")
    assert not problems, "\n".join(problems)


def test_no_help_page_for_a_node_the_pack_does_not_have(pack_nodes):
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert pages == set(pack_nodes), pages ^ set(pack_nodes)
