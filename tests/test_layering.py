"""The pack's three layers, checked on the source (AST, no import): ``lorax_cli/`` → ``nodes/`` → ``lorax/``.

* ``lorax/`` is the pure library: it imports nothing from ``nodes``, ``lorax_cli`` or ComfyUI —
  by ``import``, relative import, ``importlib``/``__import__`` or a file path given to
  ``spec_from_file_location``. One exception, :data:`ALLOWED`: ``lorax/__main__.py`` delegates
  ``python -m lorax`` to ``lorax_cli`` (the command users know; ``-m`` needs a module here).
* ``nodes/`` (the ComfyUI glue) does not import ``lorax_cli``.
* No module uses another project module's underscore names (``mod._x``, ``from m import _x``):
  what is shared is public.
* No import cycle among the project's modules, counting imports inside functions.

A second test plants violations in a fake tree, so the check is seen to fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("lorax", "lorax_cli", "nodes")
#: What the pure library may not import (top-level names): the other two layers and ComfyUI's modules.
HOST_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "server", "execution"}
NOT_FOR_LORAX = HOST_MODULES | {"nodes", "lorax_cli"}
#: (module, imported top-level name) pairs the rules let through, each with its reason above.
ALLOWED = {("lorax.__main__", "lorax_cli")}
_DYNAMIC_IMPORTS = {"import_module", "__import__", "spec_from_file_location", "SourceFileLoader", "run_path",
                    "find_spec"}


def project_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """``{"lorax.svd": path, "lorax": path/__init__.py, …}`` for every .py file under the packages."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _strings(node: ast.AST) -> list[str]:
    """The string constants in an expression in source order, f-strings' literal parts included."""
    found = [n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return [n.value for n in sorted(found, key=lambda n: (n.lineno, n.col_offset))]


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import …`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


class _Imports:
    """What one module imports: (absolute name, line) pairs, and the names bound to project modules."""

    def __init__(self, module: str, tree: ast.Module, is_package: bool, modules: dict[str, Path]):
        self.module, self.modules = module, modules
        self.targets: list[tuple[str, int]] = []  # every imported name, project or not
        self.private: list[tuple[str, int]] = []  # "m._x" uses of project modules
        bound: dict[str, str] = {}  # local name -> project module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.targets.append((alias.name, node.lineno))
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                for alias in node.names:
                    full = f"{base}.{alias.name}" if base else alias.name
                    if full in modules:  # a submodule: from . import cli
                        self.targets.append((full, node.lineno))
                        bound[alias.asname or alias.name] = full
                    else:
                        self.targets.append((base, node.lineno))
                        if _is_private(alias.name) and base in modules:
                            self.private.append((f"{base}.{alias.name}", node.lineno))
            elif isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in _DYNAMIC_IMPORTS and _strings(node):
                    # the literal parts joined: ROOT / "nodes" / "x.py" -> "nodes.x", f"{p}.nodes.x" -> "nodes.x"
                    parts = (t.replace("\\", "/").removesuffix(".py").replace("/", ".").strip(".")
                             for t in _strings(node))
                    self.targets.append((".".join(p for p in parts if p), node.lineno))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr):
                target = bound.get(node.value.id)
                if target in modules and target != module:
                    self.private.append((f"{target}.{node.attr}", node.lineno))

    def project_edges(self) -> set[str]:
        """The project modules this one imports (for the cycle check)."""
        out = set()
        for name, _ in self.targets:
            parts = name.split(".")
            # the longest project module the name starts with, or (a file path, an f-string) contains
            for i in range(len(parts)):
                for j in range(len(parts), i, -1):
                    if ".".join(parts[i:j]) in self.modules:
                        out.add(".".join(parts[i:j]))
                        break
                else:
                    continue
                break
        out.discard(self.module)
        return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layering_problems(root: Path) -> list[str]:
    """Every breach of the rules in the module docstring, one line each (empty: none)."""
    modules = project_modules(root)
    problems, graph = [], {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imports = _Imports(module, tree, path.name == "__init__.py", modules)
        graph[module] = imports.project_edges()
        where = path.relative_to(root)
        layer = module.split(".")[0]
        for name, line in imports.targets:
            pieces = set(name.split("."))
            top = name.split(".")[0]
            if layer == "lorax" and top != "lorax":
                for piece in sorted(pieces & NOT_FOR_LORAX):
                    if (module, piece) not in ALLOWED:
                        problems.append(f"{where}:{line}: the pure library imports {name!r} ({piece})")
            elif layer == "nodes" and "lorax_cli" in pieces:
                problems.append(f"{where}:{line}: nodes/ imports the command line ({name!r})")
        for name, line in sorted(imports.private, key=lambda p: p[1]):
            problems.append(f"{where}:{line}: uses another module's private name {name}")
    for cycle in _cycles(graph):
        problems.append("import cycle: " + " → ".join(cycle))
    return problems


def test_the_three_layers_hold():
    problems = layering_problems(REPO)
    assert not problems, "\n".join(problems)


def test_the_check_reports_planted_breaches(tmp_path):
    files = {
        "lorax/__init__.py": "",
        "lorax/a.py": "from . import b\nimport nodes\n",
        "lorax/b.py": "def f():\n    from .a import x  # inside a function: still an edge\n",
        "lorax/c.py": "from ..nodes import glue\nimport importlib\nm = importlib.import_module('comfy.sd')\n",
        "lorax/d.py": "import importlib.util\n"
                      "s = importlib.util.spec_from_file_location('x', ROOT / 'nodes' / 'host_boot.py')\n",
        "lorax/e.py": "from lorax.b import _hidden\nfrom lorax import b\nb._secret()\nimport folder_paths\n",
        "lorax_cli/__init__.py": "",
        "lorax_cli/cli.py": "from lorax.a import thing\n",
        "nodes/__init__.py": "",
        "nodes/glue.py": "from lorax_cli.cli import main\nfrom lorax.a import thing\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    report = "\n".join(layering_problems(tmp_path))
    assert "lorax/a.py:2: the pure library imports 'nodes'" in report
    assert "lorax/c.py:1: the pure library imports 'nodes.glue'" in report
    assert "lorax/c.py:3: the pure library imports 'comfy.sd'" in report
    assert "lorax/d.py:2: the pure library imports 'x.nodes.host_boot'" in report
    assert "lorax/e.py:4: the pure library imports 'folder_paths'" in report
    assert "lorax/e.py:1: uses another module's private name lorax.b._hidden" in report
    assert "lorax/e.py:3: uses another module's private name lorax.b._secret" in report
    assert "nodes/glue.py:1: nodes/ imports the command line ('lorax_cli.cli')" in report
    assert "import cycle: lorax.a → lorax.b" in report
    assert "lorax_cli/cli.py" not in report  # the top layer may import the library
    assert len(report.splitlines()) == 9, report
