import os

import pytest
import torch

# Two-core CI: one intra-op thread avoids oversubscription with inductor's compile workers.
torch.set_num_threads(int(os.environ.get("LINGBOT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
