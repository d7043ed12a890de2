"""The layout is the architecture: the import rule in ARCHITECTURE.md holds, with no circles and no toy in the core."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dmm_cli"


def module_name(path: Path) -> str:
    parts = ["dmm_cli", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every dmm_cli module `name` imports, at any depth of the file (lazy imports count too)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import thing` imports mod
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def unit(module: str) -> str:
    """The part of dmm_cli a module belongs to: its subpackage, or its own name for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def allowed() -> dict[str, set[str]]:
    """ARCHITECTURE.md's table: | `unit` | `dep`, `dep` | ("—" for none, "everything" for all)."""
    rules = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        m = re.match(r"\|\s*`([\w_]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rules[m[1]] = set(re.findall(r"`([\w_]+)`", m[2])) | ({"*"} if "everything" in m[2] else set())
    return rules


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_is_read_correctly():
    g = graph()
    # known edges of every import form: absolute, `from .. import mod`, `from .mod import x`, lazy
    assert "dmm_cli.models.hub" in g["dmm_cli.models.references"]
    assert "dmm_cli.plugins" in g["dmm_cli.models.references"]
    assert "dmm_cli.files.atomic" in g["dmm_cli.files.state"]
    assert "dmm_cli.models.official" in g["dmm_cli.models.local"]  # imported inside a function
    assert "dmm_cli.toy.build" in g["dmm_cli.cli"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    assert cycle(graph()) is None, f"import circle: {' -> '.join(cycle(graph()))}"


def test_nothing_but_the_cli_imports_the_toy_zoo():
    offenders = [(m, t) for m, targets in graph().items() for t in targets
                 if unit(t) == "toy" and unit(m) not in ("toy", "cli")]
    assert not offenders, offenders


def test_every_import_follows_the_rule_in_architecture_md():
    rules = allowed()
    units = {unit(m) for m in modules()}
    assert units == set(rules), f"ARCHITECTURE.md's table and the tree differ: {sorted(units ^ set(rules))}"
    broken = [f"{m} -> {t}" for m, targets in graph().items() for t in targets
              if unit(t) != unit(m) and "*" not in rules[unit(m)] and unit(t) not in rules[unit(m)]]
    assert not broken, broken
    assert cycle({u: rules[u] - {"*"} for u in rules}) is None  # the rule itself is layered


def test_importing_the_core_loads_no_plugin():
    code = "import sys, dmm_cli.distill, dmm_cli.merge, dmm_cli.eval.run; print(sorted(m for m in sys.modules if 'toy' in m))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def locale_text_io(tree: ast.AST) -> list[int]:
    """Lines that read or write text in the locale's encoding: Path.read_text/write_text or a text-mode open()
    that names no encoding."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("read_text", "write_text"):
            lines.append(node.lineno)
        elif isinstance(node.func, ast.Name) and node.func.id == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"),
                                                                   None)
            if not (isinstance(mode, ast.Constant) and "b" in mode.value):
                lines.append(node.lineno)
    return lines


def test_text_files_are_utf8_whatever_the_locale():
    sample = "Path('a').write_text(s)\nopen(p)\nopen(p, 'rb')\np.read_text(encoding='utf-8')"
    assert locale_text_io(ast.parse(sample)) == [1, 2]  # the check finds what it should, and only that
    found = [f"{path.relative_to(ROOT)}:{line}" for path in PACKAGE.rglob("*.py")
             for line in locale_text_io(ast.parse(path.read_text(encoding="utf-8")))]
    assert not found, found
