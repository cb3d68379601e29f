"""Long and interrupted fits: a compiled fit of 200,000 steps holds its memory and its graph
cache flat; a fit interrupted by ``KeyboardInterrupt`` (raised mid-epoch, mid-checkpoint, or a
real SIGINT) leaves its last checkpoint loadable and resumable bit-identically, the caller's
tensors and torch's thread count as they were."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves

import fnmlp
from fnmlp.train import _compile, _thread_scopes

ROOT = Path(__file__).resolve().parents[2]
MB = 2**20


def resident_bytes() -> int:
    """This process's resident set size (``/proc/self/statm``'s second field, in pages)."""
    with open("/proc/self/statm", encoding="ascii") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def graph_cache_sizes() -> list[tuple[int, int]]:
    """Per step identity in the shared cache: (graphs by specialization, by data)."""
    return [(len(g.by_specialization), len(g.by_data)) for g in _compile._SHARED.values()]


@pytest.mark.slow
def test_a_long_compiled_fit_holds_its_memory_and_its_graphs_flat():
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("reads the resident set size from Linux's /proc")
    model = fnmlp.MLP(6, [fnmlp.Dense(8, "tanh"), fnmlp.Linear(3)])
    g = torch.Generator().manual_seed(0)
    params = model.init(g)
    rows, batch_size, steps = 252, 8, 200_000  # 32 steps an epoch, the last one padded
    x, y = torch.randn(rows, 6, generator=g), torch.randn(rows, 3, generator=g)
    epochs = steps // -(-rows // batch_size)
    marks = {}

    def watch(epoch, logs):
        if epoch + 1 in (epochs // 10, epochs // 2, epochs):
            marks[epoch + 1] = (resident_bytes(), time.perf_counter(), graph_cache_sizes())

    start = time.perf_counter()
    result = fnmlp.fit(model, params, x, y, epochs=epochs, batch_size=batch_size,
                       optimizer=fnmlp.sgd(0.01), compile=True, steps_per_call=1,
                       shuffle=True, generator=torch.Generator().manual_seed(1),
                       on_epoch_end=watch)
    (rss_10, t_10, cache_10), (rss_50, _, _), (rss_end, t_end, cache_end) = (
        marks[e] for e in sorted(marks))
    steady = 0.9 * steps / (t_end - t_10)
    graphs = _compile.shared_graphs(fnmlp.train._step.network_identity(
        model, fnmlp.mse, fnmlp.sgd(0.01), 0.0, None, "auto"))
    print(f"\n{steps} compiled steps (6-8-3, batch {batch_size}, {epochs} epochs): "
          f"{time.perf_counter() - start:.1f} s in all, {steady:,.0f} steps/s after the first "
          f"10%; RSS {rss_10 / MB:.1f} MB at 10%, {rss_50 / MB:.1f} MB at 50%, "
          f"{rss_end / MB:.1f} MB at the end ({(rss_end - rss_10) / MB:+.2f} MB, "
          f"{(rss_end - rss_10) / (0.9 * steps):.1f} B/step); graph cache: {len(_compile._SHARED)}"
          f" identities {cache_end} (at 10%: {cache_10}); this fit's: "
          f"{len(graphs.by_specialization)} graph, {len(graphs.by_data)} by data")
    assert len(result.history.train_loss) == epochs
    assert rss_end - rss_10 < 20 * MB
    assert cache_end == cache_10 and len(_compile._SHARED) <= _compile._CACHE_SIZE
    assert (len(graphs.by_specialization), len(graphs.by_data)) == (1, 1)


# --- interrupted fits ---------------------------------------------------------------------------


def problem():
    """A network with dropout, its parameters, data and a fit's settings (shuffled)."""
    model = fnmlp.MLP(6, [fnmlp.Dense(16, "relu", dropout=0.2), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randn(64, 3, generator=g, dtype=torch.float64)
    return model, params, x, y


def fit(model, params, x, y, compile: bool, **options):
    return fnmlp.fit(model, params, x, y, epochs=6, batch_size=8, optimizer=fnmlp.adam(1e-2),
                     shuffle=True, generator=torch.Generator().manual_seed(5),
                     compile=compile, threads=1, steps_per_call=1, **options)


def assert_same(first, second) -> None:
    assert first.history == second.history
    assert all(torch.equal(a, b) for a, b in zip(
        tree_leaves((first.params, first.opt_state)), tree_leaves((second.params,
                                                                    second.opt_state))))


def interrupt_step(monkeypatch, at: int) -> None:
    """The ``at``-th step (eager or compiled) raises ``KeyboardInterrupt`` inside its thread
    scope, as a Ctrl-C there would."""
    from fnmlp.train._executor import Executor

    calls = [0]
    for name in ("_run_eager", "_run_compiled"):
        def interrupted(self, *args, real=getattr(Executor, name), **kwargs):
            calls[0] += 1
            if calls[0] == at:
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Executor, name, interrupted)


def interrupt_checkpoint(monkeypatch, at: int) -> None:
    """The ``at``-th checkpoint's write raises ``KeyboardInterrupt`` half-way."""
    from fnmlp.interop import _checkpoint

    calls, save = [0], torch.save

    def interrupted(payload, file, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            file.write(b"half a checkpoint")
            raise KeyboardInterrupt
        return save(payload, file, *args, **kwargs)

    monkeypatch.setattr(_checkpoint.torch, "save", interrupted)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("where, saved_epoch", [("step", 3), ("checkpoint", 2)])
def test_an_interrupted_fit_resumes_bit_identical_and_leaves_the_callers_tensors(
        tmp_path, monkeypatch, compile, where, saved_epoch):
    """Interrupted in epoch 3's fifth step, or while writing epoch 3's checkpoint."""
    model, params, x, y = problem()
    whole = fit(model, params, x, y, compile)
    copies = [t.clone() for t in tree_leaves((params, x, y))]
    before = torch.get_num_threads()
    path = tmp_path / "run.fnmlp"
    if where == "step":
        interrupt_step(monkeypatch, at=3 * 8 + 5)
    else:
        interrupt_checkpoint(monkeypatch, at=3)
    with pytest.raises(KeyboardInterrupt):
        fit(model, params, x, y, compile, checkpoint=path)
    monkeypatch.undo()
    assert torch.get_num_threads() == before and _thread_scopes._OPEN == {}
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves((params, x, y)), copies))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.fnmlp"]  # no temporary left
    assert fnmlp.load(path).metadata["fnmlp_fit"]["epoch"] == saved_epoch
    resumed = fit(model, params, x, y, compile, checkpoint=path, resume=True)
    assert_same(resumed, whole)
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves((params, x, y)), copies))


SETUP = textwrap.dedent("""
    import torch, fnmlp
    model = fnmlp.MLP(6, [fnmlp.Dense(32, "relu", dropout=0.2), fnmlp.Dense(3)])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 6, generator=g, dtype=torch.float64)
    y = torch.randn(600, 3, generator=g, dtype=torch.float64)
""")

CHILD = SETUP + textwrap.dedent("""
    import json, sys
    from torch.utils._pytree import tree_leaves
    from fnmlp.train import _thread_scopes

    torch.set_num_threads(2)
    copies = [t.clone() for t in tree_leaves((params, x, y))]
    try:
        fnmlp.fit(model, params, x, y, epochs=400, batch_size=8, optimizer=fnmlp.adam(1e-3),
                  shuffle=True, generator=torch.Generator().manual_seed(5), compile=False,
                  threads=1, checkpoint=sys.argv[1], resume=True)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    print(json.dumps({
        "interrupted": interrupted, "threads": torch.get_num_threads(),
        "open": len(_thread_scopes._OPEN),
        "unchanged": all(torch.equal(a, b)
                         for a, b in zip(tree_leaves((params, x, y)), copies))}))
""")


@pytest.mark.slow
def test_a_fit_stopped_by_sigint_resumes_bit_identical(tmp_path):
    path = tmp_path / "run.fnmlp"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], env=env,
                             stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.005)
    time.sleep(random.Random(0).uniform(0.05, 0.3))  # somewhere in a later epoch
    child.send_signal(signal.SIGINT)
    out, _ = child.communicate(timeout=120)
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"interrupted": True, "threads": 2, "open": 0, "unchanged": True}
    saved = fnmlp.load(path).metadata["fnmlp_fit"]["epoch"]
    assert 0 < saved < 400
    names: dict = {}
    exec(SETUP, names)  # the same network and data
    options = dict(epochs=saved + 3, batch_size=8, optimizer=fnmlp.adam(1e-3), shuffle=True,
                   compile=False, threads=1)
    resumed = fnmlp.fit(names["model"], names["params"], names["x"], names["y"],
                        generator=torch.Generator().manual_seed(5), checkpoint=path,
                        resume=True, **options)
    whole = fnmlp.fit(names["model"], names["params"], names["x"], names["y"],
                      generator=torch.Generator().manual_seed(5), **options)
    assert_same(resumed, whole)
