"""The measured thread gain behind ``threads="auto"`` (``fnmlp.train._calibration``): the
measurement's logic on a fake clock, the per-machine cache file and its failures, the look at
other processes. Nothing here asserts a real timing."""

import json
import os

import pytest
import torch

import fnmlp
from fnmlp.train import _calibration as calibration


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    """A cache folder of the test's own, calibration on, nothing remembered before or after."""
    monkeypatch.setenv("FNMLP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FNMLP_THREAD_CALIBRATION", raising=False)
    calibration.forget()
    yield tmp_path / "cache"
    calibration.forget()


class FakeClock:
    """A clock that only the fake step moves: ``cost[threads]`` seconds per call, the
    ``spikes``-th calls on several threads (1-based) ``spike`` times as long."""

    def __init__(self, cost: dict[int, float], spikes=(), spike: float = 10.0):
        self.now, self.cost, self.spikes, self.spike = 0.0, cost, set(spikes), spike
        self.calls = {n: 0 for n in cost}

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        count = torch.get_num_threads()
        self.calls[count] += 1
        slow = count > 1 and self.calls[count] in self.spikes
        self.now += self.cost[count] * (self.spike if slow else 1.0)


# --- the measurement --------------------------------------------------------------------------


def test_the_gain_is_one_threads_median_over_all_threads_median(two_threads):
    clock = FakeClock({1: 400e-6, 2: 250e-6})
    assert calibration.measure_gain(clock.step, 2, clock=clock) == pytest.approx(1.6)
    assert torch.get_num_threads() == 2  # each count set for its timing, put back after it
    assert clock.calls[1] > calibration.SAMPLES and clock.calls[2] > calibration.SAMPLES


def test_stalls_on_several_threads_move_the_median_no_further_than_they_should(two_threads):
    # three of the 9 calls on two threads (2 warm-up, 7 timed) stall: the median does not move
    clock = FakeClock({1: 400e-6, 2: 250e-6}, spikes=(3, 5, 8))
    assert calibration.measure_gain(clock.step, 2, clock=clock) == pytest.approx(1.6)
    clock = FakeClock({1: 400e-6, 2: 250e-6}, spikes=range(3, 10))  # every timed one
    assert calibration.measure_gain(clock.step, 2, clock=clock) == pytest.approx(0.16)


def test_a_measurement_past_its_budget_gives_up(two_threads):
    clock = FakeClock({1: 400e-6, 2: 0.2})  # a busy core: each call on two threads stalls
    assert calibration.measure_gain(clock.step, 2, clock=clock, budget_s=0.5) is None
    assert torch.get_num_threads() == 2


def test_a_step_that_raises_leaves_the_thread_count(two_threads):
    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        calibration.measure_gain(failing, 2)
    assert torch.get_num_threads() == 2


def test_the_real_measurement_runs_the_networks_eager_step(two_threads):
    model = fnmlp.MLP(6, [fnmlp.Dense(16, "tanh"), fnmlp.BatchNorm(), fnmlp.Dropout(0.1),
                          fnmlp.Linear(3)])
    before = torch.random.get_rng_state()
    step = calibration.eager_step(model, 32)
    step()
    gain = calibration.measure_gain(step, 2, samples=2)
    assert gain is None or gain > 0  # whatever this machine says, no timing asserted
    assert torch.equal(torch.random.get_rng_state(), before)  # its own generator only
    assert torch.get_num_threads() == 2


# --- the gain of a step shape, remembered and cached ----------------------------------------------


MODEL = fnmlp.MLP(20, [fnmlp.Dense(128, "relu"), fnmlp.Dense(128, "relu"), fnmlp.Linear(1)])


def measured_by(monkeypatch, gains):
    """``measure_gain`` answering from ``gains`` in turn (no load seen); the thread counts it
    was asked for."""
    calls, answers = [], iter(gains)

    def fake(step, threads):
        calls.append(threads)
        return next(answers)

    monkeypatch.setattr(calibration, "measure_gain", fake)
    monkeypatch.setattr(calibration, "busy", lambda threads: False)
    return calls


def test_a_gain_is_measured_once_then_remembered_and_cached(monkeypatch, own_cache):
    calls = measured_by(monkeypatch, [1.3])
    assert calibration.thread_gain(MODEL, 256, 1, 2) == (1.3, "measured")
    assert calibration.thread_gain(MODEL, 256, 1, 2) == (1.3, "measured")  # remembered
    calibration.forget()  # a new process
    assert calibration.thread_gain(MODEL, 256, 1, 2) == (1.3, "cached")
    assert calls == [2]
    [path] = own_cache.iterdir()
    record = json.loads(path.read_text())
    assert record["machine"] == calibration.machine_identity()
    assert list(record["gains"].values()) == [1.3]


def test_each_step_shape_and_thread_count_is_measured_apart(monkeypatch):
    calls = measured_by(monkeypatch, [1.3, 1.1, 0.9, 2.0])
    assert calibration.thread_gain(MODEL, 256, 1, 2).value == 1.3
    assert calibration.thread_gain(MODEL, 128, 1, 2).value == 1.1  # other rows
    assert calibration.thread_gain(MODEL, 256, 8, 2).value == 0.9  # an ensemble's step
    assert calibration.thread_gain(MODEL, 256, 1, 4).value == 2.0  # another thread count
    assert calls == [2, 2, 2, 4]


def test_a_clear_gain_is_one_of_at_least_the_margin():
    assert calibration.Gain(calibration.MARGIN, "cached").clear
    assert not calibration.Gain(calibration.MARGIN - 0.01, "cached").clear
    assert not calibration.Gain(None, "busy").clear


def test_a_measurement_that_gave_up_is_not_kept(monkeypatch, own_cache):
    calls = measured_by(monkeypatch, [None, 1.2])
    assert calibration.thread_gain(MODEL, 256, 1, 2) == (None, "busy")
    assert not own_cache.exists()
    assert calibration.thread_gain(MODEL, 256, 1, 2) == (1.2, "measured")  # tried again
    assert calls == [2, 2]


def test_load_during_the_measurement_discards_it(monkeypatch, own_cache):
    measured_by(monkeypatch, [3.0])
    monkeypatch.setattr(calibration, "busy", lambda threads: True)
    assert calibration.thread_gain(MODEL, 256, 1, 2) == (None, "busy")
    assert not own_cache.exists()


def test_calibration_switched_off_measures_nothing(monkeypatch, own_cache):
    calls = measured_by(monkeypatch, [1.3])
    monkeypatch.setenv("FNMLP_THREAD_CALIBRATION", "0")
    assert calibration.thread_gain(MODEL, 256, 1, 2) == (None, "off")
    assert calls == [] and not own_cache.exists()


def test_a_network_the_measurement_cannot_run_is_not_measured(monkeypatch):
    def failing(step, threads):
        raise ValueError("no such kernel")

    monkeypatch.setattr(calibration, "measure_gain", failing)
    monkeypatch.setattr(calibration, "busy", lambda threads: False)
    assert calibration.thread_gain(MODEL, 256, 1, 2) == (None, "failed")
    monkeypatch.setattr(calibration, "measure_gain", lambda step, threads: 1.3)
    assert calibration.thread_gain(MODEL, 256, 1, 2) == (None, "failed")  # not tried again


def test_a_corrupt_cache_file_is_measured_again_and_rewritten(monkeypatch, own_cache):
    path = calibration.cache_path(calibration.machine_identity())
    for text in ["{not json", json.dumps([1, 2]), json.dumps({"machine": "x", "gains": {}}),
                 json.dumps({"machine": calibration.machine_identity(), "gains": "none"})]:
        os.makedirs(own_cache, exist_ok=True)
        with open(path, "w") as file:
            file.write(text)
        calibration.forget()
        measured_by(monkeypatch, [1.4])
        assert calibration.thread_gain(MODEL, 256, 1, 2) == (1.4, "measured")
        assert calibration.read_cache(path, calibration.machine_identity()) == {
            f"2:{calibration.step_key(MODEL, 256, 1)}": 1.4}


def test_bad_entries_alone_are_skipped(own_cache):
    identity = calibration.machine_identity()
    path = calibration.cache_path(identity)
    os.makedirs(own_cache)
    with open(path, "w") as file:
        json.dump({"machine": identity, "gains": {"2:a": 1.2, "2:b": "fast", "2:c": -1,
                                                  "2:d": True, "2:e": 3}}, file)
    assert calibration.read_cache(path, identity) == {"2:a": 1.2, "2:e": 3.0}


def test_an_unwritable_cache_folder_costs_a_measurement_not_an_error(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FNMLP_CACHE_DIR", str(blocker / "cache"))  # under a file: no folder
    calls = measured_by(monkeypatch, [1.3, 1.3])
    assert calibration.thread_gain(MODEL, 256, 1, 2) == (1.3, "measured")
    calibration.forget()
    assert calibration.thread_gain(MODEL, 256, 1, 2) == (1.3, "measured")
    assert calls == [2, 2]
    assert not calibration.write_cache(str(blocker / "cache" / "t.json"), {}, {})


def test_the_cache_keeps_the_newest_entries(monkeypatch, own_cache):
    monkeypatch.setattr(calibration, "MAX_ENTRIES", 2)
    measured_by(monkeypatch, [1.1, 1.2, 1.3])
    for rows in (100, 200, 300):
        calibration.thread_gain(MODEL, rows, 1, 2)
    gains = calibration.read_cache(calibration.cache_path(calibration.machine_identity()),
                                   calibration.machine_identity())
    assert list(gains.values()) == [1.2, 1.3]


def test_the_cache_file_round_trips_and_is_keyed_by_the_machine(own_cache):
    identity = calibration.machine_identity()
    assert set(identity) == {"cpu", "cores", "torch", "version"}
    path = calibration.cache_path(identity)
    assert os.path.dirname(path) == str(own_cache)
    assert calibration.write_cache(path, identity, {"2:a": 1.25, "16:a": 0.4})
    assert calibration.read_cache(path, identity) == {"2:a": 1.25, "16:a": 0.4}
    for change in [{"cpu": "another"}, {"cores": identity["cores"] + 1}, {"torch": "0.0"},
                   {"version": identity["version"] + 1}]:
        other = {**identity, **change}
        assert calibration.cache_path(other) != path
        assert calibration.read_cache(path, other) == {}  # never another machine's gains
    assert [p.name for p in own_cache.iterdir()] == [os.path.basename(path)]  # no temporaries


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FNMLP_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibration.cache_dir() == str(tmp_path / "own")
    monkeypatch.delenv("FNMLP_CACHE_DIR")
    assert calibration.cache_dir() == str(tmp_path / "xdg" / "fnmlp")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert calibration.cache_dir() == str(tmp_path / "home" / ".cache" / "fnmlp")


# --- other processes ----------------------------------------------------------------------------


def test_busy_means_fewer_free_cores_than_threads(monkeypatch):
    monkeypatch.setattr(calibration, "usable_cores", lambda: 4)
    looks = iter([(5, 2), (2, 2), (5, 2), (6, 2), (5, 2)])  # others: 3, 0, 3, 4, 3
    monkeypatch.setattr(calibration, "running_threads", lambda: next(looks))
    assert calibration.others_running() == 3  # the median: a passing thread does not count
    monkeypatch.setattr(calibration, "running_threads", lambda: (5, 2))
    assert calibration.free_cores() == 1
    monkeypatch.setattr(calibration, "running_threads", lambda: (3, 2))  # one other
    assert calibration.free_cores() == 3
    assert calibration.busy(4) and not calibration.busy(3) and not calibration.busy(1)
    monkeypatch.setattr(calibration, "running_threads", lambda: (2, 3))  # ours just stopped
    assert calibration.others_running() == 0 and not calibration.busy(4)
    monkeypatch.setattr(calibration, "running_threads", lambda: (9, 1))
    assert calibration.free_cores() == 0


def test_without_proc_nothing_is_busy(monkeypatch):
    monkeypatch.setattr(calibration, "running_threads", lambda: None)
    assert calibration.others_running() is None and calibration.free_cores() is None
    assert not calibration.busy(64)


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="no /proc")
def test_the_run_queue_counts_this_thread():
    everyone, own = calibration.running_threads()
    assert own >= 1 and everyone >= 1  # this thread runs while it looks
    assert calibration.usable_cores() >= 1


def test_a_real_decision_measures_once_or_keeps_one_thread(two_threads, own_cache):
    from fnmlp.train._threads import choose_threads

    seed = fnmlp.MLP(6, [fnmlp.Dense(32, "tanh")] * 4 + [fnmlp.Linear(3)])  # 3.4 M
    assert choose_threads("auto", seed, 333) in (1, 2)  # whatever this machine says
    assert torch.get_num_threads() == 2
    gain = calibration.thread_gain(seed, 333, 1, 2)
    if gain.origin == "measured":  # not busy: measured once, and cached
        assert gain.value > 0 and len(list(own_cache.iterdir())) == 1
    else:
        assert gain.origin == "busy"
