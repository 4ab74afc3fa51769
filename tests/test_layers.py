"""The import-layer contract over every module of the project (docs/design.md, "Architecture"), lazy imports included.

Imports point one way: calib -> quantize -> lingbot_edge and train -> quantize -> lingbot_edge (train never
imports calib); inside the runtime, cli -> apps (serve, eval, lerobot) -> flags -> robot (the drivers and the
control loop) -> io -> core, and no app imports another; nothing in the runtime imports the test helpers of
`lingbot_edge.testing`, the offline tools or the benchmarks. No module reaches itself through its imports (no
import circle). The checker reads import statements with `ast` (every one, also inside functions, and
`importlib.import_module` of a literal name), so a lazy `from quantize import ...` in a command function is
caught too.

    python -m pytest -q tests/test_layers.py        # the check; `python tests/test_layers.py` prints the counts
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = ("serve", "eval", "lerobot")  # each drives episodes for one purpose; none imports another
RUNTIME_APPS = ("robot", *APPS, "cli")
PACKAGES = ("lingbot_edge", "lingbot_edge_lerobot", "quantize", "calib", "train", "bench")


def _app_rule(app: str) -> tuple[str, tuple[str, ...], str]:
    others = tuple(f"lingbot_edge.{a}" for a in (*APPS, "cli") if a != app)
    return (f"lingbot_edge.{app}", others, "an app does not import another app (what two share moves down)")


# (module prefix, imported prefixes it must not use, why)
RULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("lingbot_edge", ("quantize", "calib", "train", "bench", "tests"), "the runtime never imports the offline tools"),
    ("lingbot_edge.core", tuple(f"lingbot_edge.{p}" for p in ("io", "testing", *RUNTIME_APPS)),
     "core is the math: no files, robots, servers"),
    ("lingbot_edge.io", tuple(f"lingbot_edge.{p}" for p in ("testing", *RUNTIME_APPS)), "io builds policies only"),
    ("lingbot_edge.robot", ("lingbot_edge.testing", "lingbot_edge.flags",
                            *(f"lingbot_edge.{a}" for a in (*APPS, "cli"))),
     "the drivers and the control loop sit below the apps and their flags"),
    ("lingbot_edge.flags", tuple(f"lingbot_edge.{a}" for a in ("testing", *APPS, "cli")),
     "the shared flags sit below every app"),
    *(_app_rule(app) for app in APPS),
    ("lingbot_edge.serve", ("lingbot_edge.testing",), "runtime apps do not use test fixtures"),
    ("lingbot_edge.eval", ("lingbot_edge.testing",), "runtime apps do not use test fixtures"),
    ("lingbot_edge.lerobot", ("lingbot_edge.testing",), "runtime apps do not use test fixtures"),
    ("lingbot_edge.cli", ("lingbot_edge.testing",), "runtime apps do not use test fixtures"),
    ("lingbot_edge_lerobot", ("quantize", "calib", "train", "bench", "lingbot_edge.testing"), "the plugin is runtime"),
    ("quantize", ("calib", "train", "bench"), "calib -> quantize, never the reverse"),
    ("calib", ("train", "bench"), "benchmarks observe only; training sits above calibration"),
    ("train", ("bench", "calib"), "benchmarks observe only; what training shares with calibration lives below both"),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`; relative imports resolved against `module`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]  # `from pkg import submodule`
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            name = node.args[0].value
            if name.startswith("."):  # import_module(".modeling", __package__)
                level = len(name) - len(name.lstrip("."))
                base = module.split(".")
                base = base[: len(base) - level + (1 if is_package else 0)]
                name = ".".join(base + [name.lstrip(".")])
            out.append((node.lineno, name))
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    found = []
    for line, name in imported_modules(source, module, is_package):
        for owner, banned, why in RULES:
            if _within(module, owner) and not _within(module, "lingbot_edge.testing"):
                for b in banned:
                    if _within(name, b):
                        found.append(f"{module}:{line} imports {name} ({why})")
    return sorted(set(found))


def project_modules(packages: tuple[str, ...] = PACKAGES[:-1]) -> list[Path]:
    files = []
    for pkg in packages:
        files += sorted((ROOT / pkg).rglob("*.py"))
    return files


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """{module: the project modules it imports} over `sources` ({module: (source, is_package)}), every import
    statement counted (lazy ones too). An imported name resolves to the longest project module it names, so
    `from pkg import submodule` points at the submodule and `from pkg.mod import name` at pkg.mod."""
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, (source, is_package) in sources.items():
        for _, name in imported_modules(source, module, is_package):
            while name and name not in sources:
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each one holds a circle), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles)


def project_sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(), p.name == "__init__.py") for p in project_modules(PACKAGES)}


def in_function_imports(sources: dict[str, tuple[str, bool]]) -> tuple[int, int]:
    """(first-party import statements inside functions, all first-party import statements)."""
    inside = total = 0
    for source, _ in sources.values():
        tree = ast.parse(source)
        nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.ImportFrom):
                names = [PACKAGES[0]]  # relative: first-party
            else:
                continue
            if any(n.split(".")[0] in PACKAGES for n in names):
                total += 1
                inside += id(node) in nested
    return inside, total


def test_every_module_follows_the_layers():
    files = project_modules()
    assert len(files) > 40, "the walk found too few modules: is ROOT right?"
    bad = []
    for path in files:
        bad += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    sources = project_sources()
    assert len(sources) > 100, "the walk found too few modules: is ROOT right?"
    circles = import_circles(import_graph(sources))
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_checker_finds_a_circle():
    sources = {"train.a": ("from train.b import x\n", False), "train.b": ("def f():\n    import train.c\n", False),
               "train.c": ("from train import a\n", False), "train": ("", True), "train.d": ("import train.a\n", False)}
    assert import_circles(import_graph(sources)) == [["train.a", "train.b", "train.c"]]
    sources["train.c"] = ("import json\n", False)
    assert import_circles(import_graph(sources)) == []
    lazy = {"lingbot_edge.lerobot.adapter": ("import importlib\nm = importlib.import_module('.modeling', 'x')\n",
                                             False),
            "lingbot_edge.lerobot.modeling": ("from lingbot_edge.lerobot.adapter import y\n", False)}
    assert import_circles(import_graph(lazy)) == [sorted(lazy)]


@pytest.mark.parametrize(("module", "source"), [
    ("lingbot_edge.cli.main", "def f():\n    from quantize.run import run\n"),
    ("lingbot_edge.serve.server", "import calib.stats\n"),
    ("lingbot_edge.robot.so100", "from bench import ladder\n"),
    ("lingbot_edge.core.policy", "from lingbot_edge.io.prompt_cache import PromptCache\n"),
    ("lingbot_edge.core.policy", "from ..io import loading\n"),
    ("lingbot_edge.io.loading", "from lingbot_edge.testing import checkpoints\n"),
    ("quantize.api", "from calib import planner\n"),
    ("train.pipeline", "from calib.data import LeRobotEpisodes\n"),
    ("train.commands", "def f():\n    import calib.commands\n"),
    ("lingbot_edge.eval.sim", "from lingbot_edge.serve.server import PolicyServer\n"),
    ("lingbot_edge.lerobot.async_server", "def main():\n    from lingbot_edge.cli.robot import run_so100\n"),
    ("lingbot_edge.serve.server", "from lingbot_edge.lerobot import adapter\n"),
    ("lingbot_edge.robot.arm", "from lingbot_edge.lerobot import bridge\n"),
    ("lingbot_edge.robot.control", "import lingbot_edge.flags\n"),
    ("lingbot_edge.flags", "from lingbot_edge.cli import main\n"),
])
def test_the_checker_catches_a_forbidden_import(module, source):
    assert violations(source, module), f"{source!r} in {module} should be refused"


def test_the_checker_allows_the_arrows_we_want():
    assert not violations("from lingbot_edge.io.loading import load_policy\n", "calib.commands")
    assert not violations("from lingbot_edge.core.config import PolicyConfig\n", "lingbot_edge.io.loading")
    assert not violations("from lingbot_edge.io.loading import load_policy\n", "lingbot_edge.robot.so100")
    assert not violations("from lingbot_edge.io import checkpoint\n", "lingbot_edge.testing.checkpoints")
    assert not violations("from lingbot_edge.robot.control import AsyncController\n", "lingbot_edge.eval.sim")
    assert not violations("from lingbot_edge.flags import build_policy\n", "lingbot_edge.lerobot.async_server")
    assert not violations("from lingbot_edge.serve.client import RemotePolicy\n", "lingbot_edge.cli.robot")


if __name__ == "__main__":
    found = project_sources()
    inside, total = in_function_imports(found)
    print(f"{len(found)} modules; first-party import statements: {total}, inside functions: {inside}; "
          f"import circles: {import_circles(import_graph(found)) or 'none'}")
