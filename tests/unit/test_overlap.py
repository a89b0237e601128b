"""gprl.overlap: a pass on a worker thread beside the caller's, the cores shared."""

import threading

import pytest
import torch

from gprl.overlap import SideThread


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_each_side_gets_half_the_threads_and_the_caller_gets_them_back(threads):
    side = SideThread("test")
    for n in (4, 6, 1):  # a change of the caller's setting between calls is followed
        torch.set_num_threads(n)
        started = threading.Event()

        def task():
            started.set()
            return threading.get_ident(), torch.get_num_threads()

        with side.beside(task, share_cores=True) as done:
            assert started.wait(timeout=30)  # the side pass runs while the block does
            inside = torch.get_num_threads()
        ident, theirs = done.result()
        assert ident != threading.get_ident()
        assert inside == theirs == max(1, n // 2)
        assert torch.get_num_threads() == n


def test_without_sharing_nothing_changes_and_errors_reach_the_caller(threads):
    torch.set_num_threads(2)

    def fails():
        raise RuntimeError("GPM server gone")

    with SideThread("test").beside(fails, share_cores=False) as done:
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="GPM server gone"):
        done.result()
