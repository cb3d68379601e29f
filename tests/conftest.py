import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir_and_fixed_thread_rule(tmp_path_factory):
    """The thread calibration's cache in a folder of the test session's, not the user's; and
    threads="auto" by the fixed rule, so that the suite's thread counts (and the compiled
    graphs specialized on them) never depend on the machine's load (the calibration's own tests
    turn measuring back on)."""
    import os

    settings = {"FNMLP_CACHE_DIR": str(tmp_path_factory.mktemp("fnmlp-cache")),
                "FNMLP_THREAD_CALIBRATION": "0"}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def two_threads():
    """torch at 2 intra-op threads for the test, put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def registry(monkeypatch):
    """fnmlp's registry, restored after the test (registrations are global)."""
    from fnmlp import _registry

    monkeypatch.setattr(_registry, "_BY_NAME", dict(_registry._BY_NAME))
    monkeypatch.setattr(_registry, "_BY_CLASS", dict(_registry._BY_CLASS))
    yield _registry
    monkeypatch.undo()
    _registry._generation += 1  # tables derived from the registry are rebuilt
