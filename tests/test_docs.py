"""The README stays a short page for users, and what moved out of it to ``docs/`` moved unchanged.

``tests/fixtures/README-before-docs-split.md`` is the README as it was before the split (30 KB).
Every line of it that carries a figure (a digit: measurements, defaults, versions, commands with
numbers, table rows) must still be found, verbatim, in the README or in a page under ``docs/``;
only link targets (``#fidelity`` became ``fidelity.md``) and heading levels may differ. Links in
the README and the docs must point at files that exist.

Figures changed on purpose since the split are listed in ``REVISED`` with the line that replaces
them and why; the replacement must then be found verbatim instead.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BEFORE = REPO / "tests" / "fixtures" / "README-before-docs-split.md"
README_MAX_BYTES = 12 * 1024

#: Lines of the old README whose figures a later change measured anew -> the line that replaces each.
#: Issue 18 (float16 singular vectors, SVD cache version 2) halved the cache and changed the route's error.
REVISED = {
    59: "| SVD | Gram route, float64 | eigen-decomposition of the smaller Gram matrix: whole SD1.5/SDXL "
        "transfers 2.8–3.0× faster than with a float32 SVD on a 2-core CPU, at 7e-7 error of the projected "
        "deltas before the vectors are rounded to float16 (next row; see [Performance](performance.md)). "
        "`exact` selects a full float64 SVD. |",
    145: "  12 GB for the fp8 model itself. A LoRA on every layer of Flux.1 needs about 6.1 GB of SVD cache "
         "(float16 vectors; 12.3 GB before) for its",
    182: "disables it, `LORAX_SVD_CACHE_GB` bounds its size (default 16 — an SDXL checkpoint at k = 320 is "
         "1.7 GB, a Flux.1 model 3.1 GB; least recently used entries go first).",
    # The fidelity issue (0.3.0): the default mode was chosen anew on trained models.
    57: "| mode | `auto` | per layer: the adapter's own delta where the target weight lies within 50 % of the source weight's norm (`‖W_t − W_s‖/‖W_s‖`, no SVD needed), along the layer map; `transport` beyond (the delta rotated by the direct rotations that carry the source's top-k singular subspaces onto the target's: norm kept, the identity where nothing moved), where the Φ̂ threshold leaves out an unrelated model's layers. Chosen on trained models ([Fidelity](fidelity.md#the-default-transfer-chosen-on-trained-models-030), 3 seeds): copying keeps more of an ordinary LoRA's effect than every projection or rotation on every target (fine-tune 0.86, far fine-tune 0.25, distilled student 0.11 of the trained-on-target style gain, against 0.22 / 0.02 / 0.03 for 0.2.0's `prolora` and 0.86 / 0.25 / 0.04 for the stock loader), and the same for LoRA-X adapters; every layer of those targets moved by at most 34 %, so `auto` copied them all. The other modes stay selectable: `copy`, `transport`, `prolora_cross` (ProLoRA with its cross terms), `prolora` (the default up to 0.2.0), `lorax` (the paper's projection). |",
    218: "inode, tensor header), so only the factors are read and checked (3.4 GB for SDXL with the float16 "
         "vectors below; 6.8 GB before). The cold peak is the",
}


def _pages() -> list[Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def _normal(line: str) -> str:
    """A line with its link targets blanked and any heading marks removed."""
    return re.sub(r"\]\([^)]*\)", "]()", line).lstrip("#").strip()


def test_readme_is_at_most_12_kb():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes"


def test_every_figure_that_moved_out_of_the_readme_is_unchanged():
    now = {_normal(line) for page in _pages() for line in page.read_text(encoding="utf-8").splitlines()}
    lines = BEFORE.read_text(encoding="utf-8").splitlines()
    figures = [REVISED.get(i, line) for i, line in enumerate(lines) if re.search(r"\d", line)]
    assert len(figures) > 100  # the check covers the old README's figures, not an empty file
    missing = [line for line in figures if _normal(line) not in now]
    assert not missing, f"{len(missing)} lines with figures are gone or changed:\n" + "\n".join(missing)


def test_links_in_the_readme_and_docs_point_at_files_that_exist():
    broken = []
    for page in _pages():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_the_readme_table_lists_every_node_with_its_help_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(web/docs/(\w+)\.md\)", readme))
    pages = {p.stem for p in (REPO / "web" / "docs").glob("*.md")}
    assert linked == pages, linked ^ pages


def test_the_package_version_is_the_newest_in_the_changelog():
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    released = re.findall(r"^## (\d+\.\d+\.\d+)\b", (REPO / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)
    assert released and released[0] == version, (version, released)


def test_registry_metadata_is_complete():
    """What the Comfy Registry reads from pyproject.toml: publisher, display name, an icon that is an
    image in this repository (served from it by URL), repository and documentation URLs."""
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    comfy, urls = meta["tool"]["comfy"], meta["project"]["urls"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    repository = urls["Repository"]
    assert repository.startswith("https://github.com/") and urls["Documentation"].startswith(repository)
    icon = comfy["Icon"]
    prefix = repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert icon.startswith(prefix), icon
    from PIL import Image

    with Image.open(REPO / icon[len(prefix):]) as image:  # the file the URL serves once pushed
        assert image.size[0] == image.size[1] <= 400, image.size  # square, small
    workflow = (REPO / ".github" / "workflows" / "publish_action.yml").read_text(encoding="utf-8")
    assert "Comfy-Org/publish-node-action" in workflow and "secrets.REGISTRY_ACCESS_TOKEN" in workflow
