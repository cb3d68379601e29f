"""Data-parallel training: 2 gloo ranks on this machine against one process on the same global
batches; faults fail every rank within the timeout; resuming with another rank count."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fnmlp
from fnmlp.distributed._step import check_distributable

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-13  # relative, float64: the reduction order differs from one process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, mode: str, options: dict, ranks: int):
    """Start ``ranks`` worker processes (no torchrun agent: each rank's own error is seen)."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    processes = []
    for rank in range(ranks):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        if ranks > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(subprocess.Popen(
            [sys.executable, str(WORKER), str(out), mode, json.dumps(options)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def finish(processes, timeout: float = 120):
    results = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results.append((process.returncode, stderr))
    return results


def run(*jobs) -> list[dict]:
    """Run ``(out, mode, options, ranks)`` jobs side by side; each one's rank-0 result."""
    started = [launch(*job) for job in jobs]
    for processes in started:
        for code, stderr in finish(processes):
            assert code == 0, stderr[-3000:]
    return [torch.load(job[0] / "rank0.pt") for job in jobs]


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("options", [{}, {"optimizer": "adam", "lr": 1e-3, "l2": 0.5,
                                          "batch": 250, "rows": 999}])
def test_two_ranks_step_by_step_equal_one_process(tmp_path, options):
    """Every step of 2 ranks (a global batch split in two, the last one uneven) equals the
    one-process step on the global batch."""
    single, double = run((tmp_path / "single", "steps", options, 1),
                         (tmp_path / "double", "steps", options, 2))
    other = torch.load(tmp_path / "double" / "rank1.pt")
    assert len(single["history"]) == len(double["history"]) >= 4
    for (params1, loss1), (params2, loss2), (params_other, _) in zip(
            single["history"], double["history"], other["history"]):
        for a, b, c in zip(params2, params1, params_other):
            assert relative(a, b) <= TOLERANCE
            assert torch.equal(a, c)  # every rank holds the same parameters
        assert abs(loss2 - loss1) <= TOLERANCE * abs(loss1)


@pytest.mark.slow
def test_fit_on_two_ranks_then_resumed_on_one_equals_one_process(tmp_path):
    """The global batch defines the run: a fit checkpointed by 2 ranks and resumed by one
    process (and the reverse) ends where one process ends."""
    on_two, on_one = str(tmp_path / "two.fnmlp"), str(tmp_path / "one.fnmlp")
    fit = {"epochs": 2, "l2": 0.1}
    reference, first, _ = run(
        (tmp_path / "reference", "fit", {**fit, "epochs": 4}, 1),
        (tmp_path / "first", "fit", {**fit, "checkpoint": on_two}, 2),
        (tmp_path / "one", "fit", {**fit, "checkpoint": on_one}, 1))
    assert len(first["train_loss"]) == 2
    resume = {**fit, "epochs": 4, "resume": True}
    two_then_one, one_then_two = run(
        (tmp_path / "resumed", "fit", {**resume, "checkpoint": on_two}, 1),
        (tmp_path / "two", "fit", {**resume, "checkpoint": on_one}, 2))
    for resumed in (two_then_one, one_then_two):
        for a, b in zip(resumed["params"], reference["params"]):
            assert relative(a, b) <= TOLERANCE
        for a, b in zip(resumed["train_loss"] + resumed["valid_loss"],
                        reference["train_loss"] + reference["valid_loss"]):
            assert abs(a - b) <= TOLERANCE * abs(b)
        assert len(resumed["valid_loss"]) == 4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["raise", "die", "hang"])
def test_a_failing_rank_fails_the_others_within_the_timeout(tmp_path, kind):
    timeout = 5.0
    start = time.monotonic()
    processes = launch(tmp_path, "fit", {"epochs": 4, "timeout": timeout,
                                         "fault": {"rank": 1, "epoch": 0, "kind": kind}}, 2)
    (code0, stderr0), = finish(processes[:1], timeout=60)
    elapsed = time.monotonic() - start
    processes[1].kill()
    finish(processes[1:], timeout=10)
    assert code0 != 0
    assert "DistributedError" in stderr0 and "another rank" in stderr0, stderr0[-2000:]
    assert elapsed < 45  # start-up (imports, group) plus the 5 s timeout, never torch's 30 min


def test_every_rank_uses_the_rate_rank_0_sets(tmp_path):
    """A callback that sets the rate from rank-local information (here: the rank) cannot make
    the ranks drift apart: after the callbacks, rank 0's rate is every rank's."""
    (first,) = run((tmp_path, "fit", {"epochs": 2, "rank_rate": 0.02}, 2))
    second = torch.load(tmp_path / "rank1.pt")
    assert first["lr"] == second["lr"] == 0.02  # rank 0's; rank 1 set 0.04
    assert all(torch.equal(a, b) for a, b in zip(first["params"], second["params"]))


@pytest.mark.slow
def test_ranks_must_agree_and_one_stop_request_stops_all(tmp_path):
    other_data = launch(tmp_path / "data", "fit", {"epochs": 2, "other_data_on_rank_1": True},
                        2)
    stopped = launch(tmp_path / "stop", "fit", {"epochs": 3, "stop_on_rank_1": True}, 2)
    for code, stderr in finish(other_data):
        assert code != 0 and "ValueError: the ranks differ" in stderr and "sum of x" in stderr
    for code, stderr in finish(stopped):
        assert code == 0, stderr[-2000:]
    for rank in (0, 1):
        assert len(torch.load(tmp_path / "stop" / f"rank{rank}.pt")["train_loss"]) == 1


def test_distributed_refuses_what_it_cannot_reproduce():
    with pytest.raises(ValueError, match="BatchNorm"):
        check_distributable(
            fnmlp.MLP(3, [fnmlp.Dense(4), fnmlp.BatchNorm(), fnmlp.Linear(1)]), fnmlp.mse)
    with pytest.raises(ValueError, match="Dropout"):
        check_distributable(
            fnmlp.MLP(3, [fnmlp.Dense(4), fnmlp.Dropout(0.5), fnmlp.Linear(1)]), fnmlp.mse)
    with pytest.raises(ValueError, match="class weights"):
        check_distributable(fnmlp.MLP(3, [fnmlp.Linear(2)]),
                                              fnmlp.CrossEntropy(weight=(1.0, 2.0)))
    with pytest.raises(fnmlp.distributed.DistributedError, match="torchrun"):
        model = fnmlp.MLP(3, [fnmlp.Linear(1)])
        env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
        try:
            fnmlp.fit(model, model.init(torch.Generator().manual_seed(0)),
                      torch.zeros(4, 3), torch.zeros(4, 1), epochs=1, batch_size=2,
                      optimizer=fnmlp.sgd(0.1), distributed=True)
        finally:
            os.environ.update(env)
    with pytest.raises(ValueError, match="timeout"):
        fnmlp.distributed.init(timeout=0)


@pytest.mark.slow
@pytest.mark.parametrize("collective", ["in_graph", "between"])
def test_compiled_two_ranks_equal_one_process(tmp_path, collective):
    """Compiled: one graph with the all-reduce inside, or the gradient graph, the all-reduce,
    the update graph."""
    options = {"compile": True, "batch": 250, "rows": 750, "collective": collective}
    single, double = run((tmp_path / "single", "steps", options, 1),
                         (tmp_path / "double", "steps", options, 2))
    for (params1, loss1), (params2, loss2) in zip(single["history"], double["history"]):
        for a, b in zip(params2, params1):
            assert relative(a, b) <= TOLERANCE


def test_every_rank_waits_alike_whether_its_graphs_were_cached_or_compiled(monkeypatch):
    """A rank that finds a step's graphs in the shared cache waits for the others as one that
    compiles them does (else a rank whose shard shape was compiled before skips the barrier
    the others wait in); eager functions stay out of the shared cache."""
    from fnmlp.distributed import _step
    from fnmlp.train.engine import Batch, Carry

    waits = []
    monkeypatch.setattr(_step, "compile_graph", lambda function, args, **options: function)
    monkeypatch.setattr(_step, "wait_for_all", lambda what, timeout: waits.append(what))
    monkeypatch.setattr(_step, "all_reduce_sum", lambda bucket, what: bucket.clone())  # 1 rank
    model = fnmlp.MLP(3, [fnmlp.Dense(4, "tanh"), fnmlp.Linear(2)])
    params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
    optimizer = fnmlp.sgd(0.1)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    carry = Carry(params, optimizer.init(params), ())
    eager = _step.DistributedStep(model, fnmlp.mse, optimizer, compile=False,
                                  collective="between")
    eager.run(carry, Batch.of(x, y))
    assert waits == [] and not eager._graphs  # nothing compiled, nothing shared
    for _ in range(2):  # the second step finds the first one's graphs, and waits all the same
        step = _step.DistributedStep(model, fnmlp.mse, optimizer, compile=True,
                                     collective="between")
        step.run(carry, Batch.of(x, y))
        step.run(carry, Batch.of(x, y))
    assert len(waits) == 2
