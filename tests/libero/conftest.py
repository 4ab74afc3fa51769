"""Shared fixtures of the LIBERO regression suite: the committed tiny checkpoint, episode and goldens."""

from pathlib import Path

import pytest
import torch

from lingbot_edge.testing import libero

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Goldens were made with one intra-op thread; other thread counts reorder fp32 sums (~1e-6)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def episode() -> libero.ObservationSequence:
    return libero.load_episodes(DATA)["episode_bowl_plate"]


@pytest.fixture(scope="session")
def goldens() -> dict:
    return libero.load_goldens(DATA)["episode_bowl_plate"]


@pytest.fixture(scope="session")
def policy():
    """The fp32 tiny-LIBERO policy, read from the committed checkpoint by the real loader."""
    return libero.load_tiny_libero_policy(DATA / libero.CHECKPOINT_DIR)


@pytest.fixture(scope="session")
def harness(policy, episode) -> libero.DriftHarness:
    """The committed episode replayed once by `policy` (its encoder wrapped to record the latents it
    produces): `harness.reference` is the golden run, and DiT variants rerun it with those latents."""
    return libero.DriftHarness(policy, episode)
