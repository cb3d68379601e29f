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
