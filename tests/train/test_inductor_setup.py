"""fnmlp's two cuts to inductor's fixed CPU compile costs (``fnmlp.train._inductor_setup``):
the vector-ISA probe's answer remembered across processes, and the wrapper's and kernels'
object files built side by side. Both leave inductor as they found it."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch._inductor.cpu_vec_isa")

from torch._inductor import codecache, cpu_vec_isa  # noqa: E402

from fnmlp.train import _inductor_setup  # noqa: E402

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from torch._inductor import codecache, cpu_vec_isa
    import fnmlp

    probes = []
    original = getattr(cpu_vec_isa.VecISA, "_probe_load", None)  # torch >= 2.13
    def counting(self, path):
        probes.append(str(self))
        return original(self, path)
    if original is not None:
        cpu_vec_isa.VecISA._probe_load = counting
    build = getattr(codecache, "_worker_compile_cpp", None)

    width = int(sys.argv[1])
    model = fnmlp.MLP(3, [fnmlp.Dense(width, "tanh"), fnmlp.Linear(2)])
    g = torch.Generator().manual_seed(0)
    params = model.init(g)
    x, y = torch.randn(16, 3, generator=g), torch.randn(16, 2, generator=g)
    optimizer = fnmlp.sgd(0.1)
    results = []
    for compile in (True, False):
        step = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=compile)
        results.append(step(params, optimizer.init(params), x, y))
    compiled, eager = (torch.utils._pytree.tree_leaves(r) for r in results)
    print(json.dumps({
        "probes": probes,
        "difference": max((a - b).abs().max().item() for a, b in zip(compiled, eager)),
        "restored": (getattr(cpu_vec_isa.VecISA, "_probe_load", None)
                     in (counting, None)
                     and getattr(codecache, "_worker_compile_cpp", None) is build),
    }))
""")


@pytest.mark.slow
def test_a_second_process_skips_the_isa_probe_and_compiles_the_same(tmp_path):
    import json

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))
    runs = []
    for width in (5, 7):  # a new graph each time: no FX-cache hit
        done = subprocess.run([sys.executable, "-c", CHILD, str(width)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if not runs[-1]["probes"] and width == 5:
            pytest.skip("inductor did not probe (not x86 Linux, or an unexpected torch)")
    first, second = runs
    assert first["probes"] and not second["probes"]  # the second process trusted the record
    assert len([f for f in os.listdir(tmp_path) if f.startswith("fnmlp-vec-isa-")]) == 1
    for run in runs:
        assert run["restored"]  # inductor's functions are put back after each compile
        assert run["difference"] <= 1e-6


class _Isa:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name


class _ProbedList:
    """Stands in for inductor's cached ``valid_vec_isa_list``: ``probed`` what its probe
    accepted, ``reported`` what the CPU reports."""

    def __init__(self, probed, reported):
        self.probed, self.reported = probed, reported
        self.__wrapped__ = lambda: [_Isa(n) for n in reported]

    def __call__(self):
        return [_Isa(n) for n in self.probed]

    def cache_info(self):
        return type("Info", (), {"currsize": 1})()


@pytest.mark.parametrize("probed, recorded", [
    (["avx512", "avx2"], True),
    (["avx2"], False),  # the probe rejected AVX-512: nothing is recorded, the next one probes
])
def test_only_a_probe_that_accepted_every_reported_isa_is_recorded(tmp_path, monkeypatch,
                                                                   probed, recorded):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list",
                        _ProbedList(probed, ["avx512", "avx2"]))
    if _inductor_setup._record_path() is None:
        pytest.skip("the record is kept on x86 Linux only")
    _inductor_setup._record_isa()
    assert os.path.exists(_inductor_setup._record_path()) == recorded
    original = getattr(cpu_vec_isa.VecISA, "_probe_load", None)
    if original is None:
        pytest.skip("this torch loads the ISA test libraries another way")
    with _inductor_setup._recorded_isa_loads():
        skipped = cpu_vec_isa.VecISA._probe_load is not original
    assert skipped == recorded and cpu_vec_isa.VecISA._probe_load is original


def test_the_parallel_build_is_scoped_and_keeps_other_builds_serial(tmp_path):
    if not hasattr(codecache, "_worker_compile_cpp"):
        pytest.skip("this torch builds C++ another way")
    built = []

    class Builder:
        def __init__(self, name):
            self.name = name

        def get_target_file_path(self):
            return str(tmp_path / self.name)

        def get_command_line(self):
            return f"g++ {tmp_path / 'main.o'} {tmp_path / 'kernels.o'} -o {self.name}"

        def build(self):
            built.append(self.name)
            (tmp_path / self.name).write_text("")

    serial = codecache._worker_compile_cpp
    with _inductor_setup._parallel_objects():
        patched = codecache._worker_compile_cpp
        assert patched is not serial
        patched(str(tmp_path / "lock"), [Builder("main.o"), Builder("kernels.o"),
                                         Builder("main.so")])
        patched(str(tmp_path / "lock"), [Builder("header.gch")])  # not a wrapper build
    assert codecache._worker_compile_cpp is serial
    assert sorted(built[:2]) == ["kernels.o", "main.o"]
    assert built[2:] == ["main.so", "header.gch"]  # the link after both objects


# --- thread safety, and failures inside the set-up fall back to inductor's own -----------------


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


def test_every_patch_is_made_under_the_compile_locks():
    """While ``cpu_compile`` is open its patches are in place and both locks are held: another
    thread can take neither (so neither an fnmlp compile nor a ``torch.compile`` runs)."""
    import threading

    from torch._dynamo.convert_frame import compile_lock

    taken = []

    def other_thread():
        for lock in (_inductor_setup._PATCH_LOCK, compile_lock):
            got = lock.acquire(blocking=False)
            taken.append(got)
            if got:
                lock.release()

    with _inductor_setup.cpu_compile({}):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        if hasattr(codecache, "_worker_compile_cpp"):
            assert codecache._worker_compile_cpp.__name__ == "build"  # fnmlp's, for now
    assert taken == [False, False]
    if hasattr(codecache, "_worker_compile_cpp"):
        assert codecache._worker_compile_cpp.__name__ == "_worker_compile_cpp"  # put back


def test_a_failing_set_up_falls_back_to_inductors_own(monkeypatch):
    """The record's path, the side-by-side probe and the record each raising: warnings, and
    inductor's functions untouched."""
    load = getattr(cpu_vec_isa.VecISA, "_probe_load", None)
    build = getattr(codecache, "_worker_compile_cpp", None)
    monkeypatch.setattr(_inductor_setup, "_record_path", _boom)
    monkeypatch.setattr(cpu_vec_isa.valid_vec_isa_list, "cache_info",
                        lambda: type("Info", (), {"currsize": 0})(), raising=False)
    with pytest.warns(RuntimeWarning, match="boom") as caught:
        with _inductor_setup.cpu_compile({}):
            assert getattr(cpu_vec_isa.VecISA, "_probe_load", None) is load
    names = {str(w.message).split(" failed")[0] for w in caught}
    assert {"fnmlp: the inductor set-up _recorded_isa_loads",
            "fnmlp: the inductor set-up _probe_isas_side_by_side"} <= names
    assert getattr(codecache, "_worker_compile_cpp", None) is build
    def _parallel_objects():  # its set-up itself raising
        raise RuntimeError("boom")

    monkeypatch.setattr(_inductor_setup, "_record_path", lambda: None)  # no record: quiet
    monkeypatch.setattr(_inductor_setup, "_parallel_objects", _parallel_objects)
    with pytest.warns(RuntimeWarning, match="_parallel_objects failed"):
        with _inductor_setup.cpu_compile({}):
            assert getattr(codecache, "_worker_compile_cpp", None) is build


def test_a_failing_recorded_load_test_runs_inductors_own(monkeypatch, tmp_path):
    if getattr(cpu_vec_isa.VecISA, "_probe_load", None) is None:
        pytest.skip("this torch loads the ISA test libraries another way")
    record = tmp_path / "record.ok"
    record.write_text("avx2\n")
    probed = []
    monkeypatch.setattr(cpu_vec_isa.VecISA, "_probe_load",
                        lambda self, library: probed.append(library) or True)
    monkeypatch.setattr(_inductor_setup, "_record_path", lambda: str(record))
    monkeypatch.setattr(_inductor_setup, "_library_built", _boom)
    with _inductor_setup._recorded_isa_loads():
        with pytest.warns(RuntimeWarning, match="_recorded_isa_loads failed"):
            assert cpu_vec_isa.VecISA._probe_load(object(), "lib.so") is True
    assert probed == ["lib.so"]  # inductor's own load test answered


class _Builder:
    def __init__(self, folder, name, built):
        self.folder, self.name, self.built = folder, name, built

    def get_target_file_path(self):
        return str(self.folder / self.name)

    def get_command_line(self):
        return f"g++ {self.folder / 'main.o'} {self.folder / 'kernels.o'} -o {self.name}"

    def build(self):
        self.built.append(self.name)
        (self.folder / self.name).write_text("")


@pytest.mark.parametrize("failing", ["_links", "_build_side_by_side"])
def test_a_failing_side_by_side_build_builds_as_inductor_does(tmp_path, monkeypatch, failing):
    if not hasattr(codecache, "_worker_compile_cpp"):
        pytest.skip("this torch builds C++ another way")
    built = []
    monkeypatch.setattr(_inductor_setup, failing, _boom)
    with _inductor_setup._parallel_objects():
        with pytest.warns(RuntimeWarning, match="_parallel_objects failed"):
            codecache._worker_compile_cpp(str(tmp_path / "lock"), [
                _Builder(tmp_path, n, built) for n in ("main.o", "kernels.o", "main.so")])
    assert built == ["main.o", "kernels.o", "main.so"]  # inductor's serial build


def test_a_build_that_fails_by_itself_raises_as_inductors_would(tmp_path, monkeypatch):
    if not hasattr(codecache, "_worker_compile_cpp"):
        pytest.skip("this torch builds C++ another way")

    class Broken(_Builder):
        def build(self):
            raise RuntimeError("the C++ does not compile")

    import warnings

    with _inductor_setup._parallel_objects(), warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: inductor's error stands
        with pytest.raises(RuntimeError, match="does not compile"):
            codecache._worker_compile_cpp(str(tmp_path / "lock"), [
                Broken(tmp_path, n, []) for n in ("main.o", "kernels.o", "main.so")])


@pytest.mark.slow
def test_a_compile_succeeds_with_every_patch_failing(monkeypatch):
    """A real compile of a graph new to this process, every fnmlp patch raising inside:
    inductor compiles it as by itself (warnings at most) and the step is right."""
    import warnings

    import torch

    import fnmlp
    from torch._inductor import config

    for name in ("_record_path", "_library_built", "_links", "_build_side_by_side"):
        monkeypatch.setattr(_inductor_setup, name, _boom)
    monkeypatch.setattr(config, "fx_graph_cache", False)  # build it, not load it
    calls = []
    serial = codecache._worker_compile_cpp
    monkeypatch.setattr(codecache, "_worker_compile_cpp",
                        lambda *args: (calls.append(1), serial(*args))[1])
    model = fnmlp.MLP(3, [fnmlp.Dense(11, "tanh"), fnmlp.Linear(2)])
    g = torch.Generator().manual_seed(0)
    params, optimizer = model.init(g), fnmlp.sgd(0.1)
    x, y = torch.randn(13, 3, generator=g), torch.randn(13, 2, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=True, threads=1)
        compiled.executor.graphs = type(compiled.executor.graphs)()  # not the shared cache
        got = compiled(params, optimizer.init(params), x, y)
    assert calls  # inductor's own build ran, through fnmlp's failing one
    assert any("_parallel_objects failed" in str(w.message) for w in caught)
    expected = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)(
        params, optimizer.init(params), x, y)
    for a, b in zip(torch.utils._pytree.tree_leaves(got),
                    torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_torch_compile_in_another_thread_never_sees_the_patches():
    """A ``torch.compile`` started in another thread while fnmlp's compile is under way waits
    for it (dynamo's compile lock), then compiles with inductor's config and functions as they
    were, and computes right."""
    import threading
    import time

    import torch
    from torch._inductor import config

    seen, inside = [], threading.Event()

    def backend(graph, example_inputs):
        seen.append((config.cpp_wrapper, codecache._worker_compile_cpp.__name__,
                     time.monotonic()))
        return graph.forward

    def other_thread():
        inside.wait(10)
        compiled = torch.compile(lambda t: torch.tanh(t) * 2, backend=backend, fullgraph=True)
        seen.append(torch.equal(compiled(torch.ones(3)), torch.tanh(torch.ones(3)) * 2))

    worker = threading.Thread(target=other_thread)
    worker.start()
    with _inductor_setup.cpu_compile({"cpp_wrapper": not config.cpp_wrapper}):
        inside.set()
        time.sleep(0.5)  # fnmlp's compile, under way
        ended = time.monotonic()
    worker.join()
    (wrapper, build, when), right = seen
    assert wrapper == config.cpp_wrapper and build == "_worker_compile_cpp" and right
    assert when >= ended
