"""Every test starts from the same global random state, whatever ran before it, so results never depend on
test order (run `pytest -p randomly` or `pytest --reverse` to check)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _same_start():
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)  # a test that changes the thread count must not leak it into the next


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and two OpenMP threads crawl when other processes share the cores.
    Module-scoped so module-scoped fixtures (a model trained once per file) can use it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
