"""Engine tests here run on one thread: on a loaded 2-core machine, two threads waiting on each other make a step take seconds."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """The flag value for one torch thread; the process's thread count is put back afterwards."""
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)
