import pytest
import torch

# one thread: on 2 shared cores, two threads per test process thrash (tiny ops, big overhead)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
