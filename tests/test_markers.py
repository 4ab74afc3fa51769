"""The marker scheme itself: every registered marker is deselected by the default run and has a need
in tests/conftest.py (or needs nothing: slow), and a marked test whose need is missing fails, even
behind a skipif or a skipping fixture. Checked by an inner pytest run (pytester) with CUDA hidden."""

import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PYTEST = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


def _marker_needs(config) -> dict:
    """MARKER_NEEDS of tests/conftest.py, as loaded by this session (`import conftest` could find another)."""
    path = str(ROOT / "tests" / "conftest.py")
    return next(p for p in config.pluginmanager.get_plugins() if getattr(p, "__file__", None) == path).MARKER_NEEDS


def test_every_marker_is_deselected_by_default_and_enforced(pytestconfig):
    markers = {m.split(":")[0] for m in PYTEST["markers"]}
    assert markers == {"slow", "gpu", "sm89", "sim", "lerobot", "libero"}
    assert "--strict-markers" in PYTEST["addopts"]  # a typo in a marker is an error, not a new marker
    for name in markers:
        assert f"not {name}" in PYTEST["addopts"], name
    assert set(_marker_needs(pytestconfig)) == markers - {"slow"}


MARKED = '''
import pytest

@pytest.fixture
def skipping_fixture():
    pytest.skip("a fixture that skips when the dependency is absent")

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="a green skip")
def test_gpu_behind_skipif():
    pass

@pytest.mark.lerobot
def test_lerobot_behind_a_skipping_fixture(skipping_fixture):
    pass

@pytest.mark.libero
def test_libero():
    pass

@pytest.mark.slow
def test_slow_needs_nothing():
    pass
'''


def test_a_marked_test_that_cannot_run_fails_not_skips(pytester, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_marked=MARKED)
    pytester.makeini("[pytest]\nmarkers =\n" + "".join(f"    {m}\n" for m in PYTEST["markers"]))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-m", "gpu or lerobot or libero or slow")
    result.assert_outcomes(passed=1, errors=3, skipped=0)
    out = result.stdout.str()
    assert "marked `gpu` but cannot run here: needs a CUDA GPU" in out
    assert "marked `lerobot` but cannot run here: needs LeRobot, in a venv of its own: make test-lerobot" in out
    assert "marked `libero` but cannot run here" in out
