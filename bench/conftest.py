"""pytest hooks of the ladder run: top-level entries of the benchmark JSON (e.g. the task-success column)."""

from __future__ import annotations

import pytest

_EXTRA = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def ladder_json_extra(request) -> dict:
    """A dict the ladder fills during the run; written into the top level of --benchmark-json."""
    return request.config.stash.setdefault(_EXTRA, {})


@pytest.hookimpl(optionalhook=True)  # pytest-benchmark's hook: absent without the plugin
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json.update(config.stash.get(_EXTRA, {}))
