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
