"""The import-layer contract over every module of the project (ARCHITECTURE.md), lazy imports included.

Imports point one way: train -> calib -> quantize -> lingbot_edge; inside the runtime, apps (robot, serve, eval,
lerobot, cli) -> io -> core; nothing in the runtime imports the test helpers of `lingbot_edge.testing`,
the offline tools or the benchmarks. The checker reads import statements with `ast` (every one, also
inside functions), so a lazy `from quantize import ...` in a command function is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_APPS = ("robot", "serve", "eval", "lerobot", "cli")

# (module prefix, imported prefixes it must not use, why)
RULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("lingbot_edge", ("quantize", "calib", "train", "bench", "tests"), "the runtime never imports the offline tools"),
    ("lingbot_edge.core", tuple(f"lingbot_edge.{p}" for p in ("io", "testing", *RUNTIME_APPS)),
     "core is the math: no files, robots, servers"),
    ("lingbot_edge.io", tuple(f"lingbot_edge.{p}" for p in ("testing", *RUNTIME_APPS)), "io builds policies only"),
    ("lingbot_edge.robot", ("lingbot_edge.testing",), "runtime apps do not use test fixtures"),
    ("lingbot_edge.serve", ("lingbot_edge.testing",), "runtime apps do not use test fixtures"),
    ("lingbot_edge.eval", ("lingbot_edge.testing",), "runtime apps do not use test fixtures"),
    ("lingbot_edge.lerobot", ("lingbot_edge.testing",), "runtime apps do not use test fixtures"),
    ("lingbot_edge.cli", ("lingbot_edge.testing",), "runtime apps do not use test fixtures"),
    ("lingbot_edge_lerobot", ("quantize", "calib", "train", "bench", "lingbot_edge.testing"), "the plugin is runtime"),
    ("quantize", ("calib", "train", "bench"), "calib -> quantize, never the reverse"),
    ("calib", ("train", "bench"), "benchmarks observe only; training sits above calibration"),
    ("train", ("bench",), "benchmarks observe only"),
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


def project_modules() -> list[Path]:
    files = []
    for pkg in ("lingbot_edge", "lingbot_edge_lerobot", "quantize", "calib", "train"):
        files += sorted((ROOT / pkg).rglob("*.py"))
    return files


def test_every_module_follows_the_layers():
    files = project_modules()
    assert len(files) > 40, "the walk found too few modules: is ROOT right?"
    bad = []
    for path in files:
        bad += violations(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("module", "source"), [
    ("lingbot_edge.cli.main", "def f():\n    from quantize.run import run\n"),
    ("lingbot_edge.serve.server", "import calib.stats\n"),
    ("lingbot_edge.robot.so100", "from bench import ladder\n"),
    ("lingbot_edge.core.policy", "from lingbot_edge.io.prompt_cache import PromptCache\n"),
    ("lingbot_edge.core.policy", "from ..io import loading\n"),
    ("lingbot_edge.io.loading", "from lingbot_edge.testing import checkpoints\n"),
    ("quantize.api", "from calib import planner\n"),
])
def test_the_checker_catches_a_forbidden_import(module, source):
    assert violations(source, module), f"{source!r} in {module} should be refused"


def test_the_checker_allows_the_arrows_we_want():
    assert not violations("from lingbot_edge.io.loading import load_policy\n", "calib.commands")
    assert not violations("from lingbot_edge.core.config import PolicyConfig\n", "lingbot_edge.io.loading")
    assert not violations("from lingbot_edge.io.loading import load_policy\n", "lingbot_edge.robot.so100")
    assert not violations("from lingbot_edge.io import checkpoint\n", "lingbot_edge.testing.checkpoints")
