import os

import pytest
import torch

# Two-core CI: one intra-op thread avoids oversubscription with inductor's compile workers.
torch.set_num_threads(int(os.environ.get("LINGBOT_TEST_THREADS", "1")))


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
