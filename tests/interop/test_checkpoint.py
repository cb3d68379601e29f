"""Checkpoints: round trips, safety (no code runs from a file), atomic writes, clear errors."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fnmlp
from helpers import leaves

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]


def _everything():
    model = fnmlp.MLP(3, [fnmlp.Dense(5, fnmlp.LeakyReLU(0.2), layer_norm=True, dropout=0.1),
                          fnmlp.BatchNorm(momentum=None), fnmlp.Dense(4, fnmlp.GELU("tanh")),
                          fnmlp.Linear(2, initializer="xavier_uniform")])
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    optimizer = fnmlp.clip_by_global_norm(
        fnmlp.adam(fnmlp.schedules.cosine(0.01, total_steps=100), betas=(0.8, 0.9),
                   amsgrad=True), max_norm=1.0)
    return model, params, model.init_state(dtype=F64), optimizer


def test_a_checkpoint_round_trips_and_training_continues_identically(tmp_path):
    model, params, state, optimizer = _everything()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    kwargs = dict(epochs=2, batch_size=8, optimizer=optimizer,
                  generator=torch.Generator().manual_seed(3))
    first = fnmlp.fit(model, params, x, y, state=state, **kwargs)
    path = tmp_path / "run.fnmlp"
    fnmlp.save(path, model, first.params, state=first.state, opt_state=first.opt_state,
               optimizer=optimizer, metadata={"epoch": 2, "note": "après", "scores": [0.5, None]})
    loaded = fnmlp.load(path)
    assert loaded.model == model and loaded.optimizer == optimizer
    assert loaded.metadata == {"epoch": 2, "note": "après", "scores": [0.5, None]}
    assert all(torch.equal(a, b) for a, b in zip(
        leaves((first.params, first.state, first.opt_state)),
        leaves((loaded.params, loaded.state, loaded.opt_state))))
    kwargs["generator"] = torch.Generator().manual_seed(4)
    again = fnmlp.fit(model, first.params, x, y, state=first.state, opt_state=first.opt_state,
                      **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(4)
    resumed = fnmlp.fit(loaded.model, loaded.params, x, y, state=loaded.state,
                        opt_state=loaded.opt_state, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(leaves(again.params), leaves(resumed.params)))
    moved = fnmlp.load(path, map_location="meta")
    assert all(t.device.type == "meta" for t in leaves(moved.params))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would run this command
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_crafted_pickle_is_refused_without_running(tmp_path, how):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.fnmlp"
    if how == "pickle":
        path.write_bytes(pickle.dumps({"header": _Payload(marker)}))
    else:
        torch.save({"header": "{}", "tensors": {"t0": _Payload(marker)}}, path)
    with pytest.raises(fnmlp.CheckpointError, match="not a readable fnmlp checkpoint"):
        fnmlp.load(path)
    assert not marker.exists()


def test_truncated_corrupted_foreign_and_newer_files_get_clear_errors(tmp_path, monkeypatch):
    model, params, state, _ = _everything()
    path = tmp_path / "good.fnmlp"
    fnmlp.save(path, model, params, state=state)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.fnmlp"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(fnmlp.CheckpointError, match=f"{truncated}: not a readable"):
        fnmlp.load(truncated)
    flipped = tmp_path / "flipped.fnmlp"
    payload = torch.load(path, weights_only=True)
    payload["tensors"]["t0"] = payload["tensors"]["t0"].clone()
    payload["tensors"]["t0"].view(torch.int64)[0] ^= 1  # one bit of one weight
    torch.save(payload, flipped)
    with pytest.raises(fnmlp.CheckpointError, match=f"{flipped}: checksum mismatch"):
        fnmlp.load(flipped)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(fnmlp.CheckpointError, match="not an fnmlp checkpoint"):
        fnmlp.load(foreign)
    with pytest.raises(fnmlp.CheckpointError, match="no such file"):
        fnmlp.load(tmp_path / "missing.fnmlp")
    from fnmlp.interop import _checkpoint

    monkeypatch.setattr(_checkpoint, "VERSION", 2)
    newer = tmp_path / "newer.fnmlp"
    fnmlp.save(newer, model, params, state=state)
    monkeypatch.undo()
    with pytest.raises(fnmlp.CheckpointError, match="format 2 by a newer fnmlp"):
        fnmlp.load(newer)


def test_bad_arguments_to_save_are_named(tmp_path):
    model, params, state, optimizer = _everything()
    with pytest.raises(TypeError, match=r"metadata\['when'\] must be plain JSON data"):
        fnmlp.save(tmp_path / "a", model, params, metadata={"when": object()})
    with pytest.raises(TypeError, match="key 1 is not a string"):
        fnmlp.save(tmp_path / "a", model, params, metadata={1: "a"})

    class MyReLU(fnmlp.ReLU):  # not fnmlp's ReLU, though it bears the name
        pass

    custom = fnmlp.MLP(3, [fnmlp.Linear(2), MyReLU()])
    with pytest.raises(TypeError, match="MyReLU cannot be saved"):
        fnmlp.save(tmp_path / "a", custom, custom.init(dtype=F64))
    with pytest.raises(ValueError, match=r"params\[0\].weight has shape"):
        fnmlp.save(tmp_path / "a", model, fnmlp.MLP(4, model.layers).init(dtype=F64))
    with pytest.raises(TypeError, match="state must be the AdamState"):
        fnmlp.save(tmp_path / "a", model, params, opt_state=fnmlp.sgd(0.1).init(params),
                   optimizer=optimizer)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_a_writer_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path):
    """A subprocess saves a ~20 MB checkpoint over an earlier one and is SIGKILLed in the middle
    of that save (its data written to the temporary file, not yet renamed: the child says when
    and waits there); the checkpoint at the path is still the earlier one, intact."""
    path = tmp_path / "big.fnmlp"
    script = textwrap.dedent(f"""
        import time, torch, fnmlp
        model = fnmlp.MLP(1000, [fnmlp.Dense(5000)])
        params = model.init(torch.Generator().manual_seed(0))
        fnmlp.save({str(path)!r}, model, params, metadata={{"version": 0}})
        write = torch.save

        def write_then_wait(payload, file):
            write(payload, file)
            print("written", flush=True)  # the new data is in the temporary file
            time.sleep(30)

        torch.save = write_then_wait
        fnmlp.save({str(path)!r}, model, params, metadata={{"version": 1}})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert child.stdout.readline().strip() == b"written"
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftovers = list(tmp_path.glob(".fnmlp-*"))
    assert leftovers and leftovers[0].stat().st_size > 10_000_000  # killed mid-save
    loaded = fnmlp.load(path)
    assert loaded.metadata == {"version": 0} and loaded.params[0].weight.shape == (5000, 1000)


def test_a_crafted_header_with_a_valid_checksum_is_refused_cleanly(tmp_path):
    import json

    from fnmlp.interop import _checkpoint

    model, params, state, _ = _everything()
    path = tmp_path / "good.fnmlp"
    fnmlp.save(path, model, params, state=state)
    payload = torch.load(path, weights_only=True)
    header = json.loads(payload["header"])
    header.pop("checksum")
    header["model"] = {"kind": "MLP", "in_features": "many", "layers": "none"}
    header["checksum"] = _checkpoint._checksum(
        {k: v for k, v in header.items() if k != "checksum"}, payload["tensors"])
    crafted = tmp_path / "crafted.fnmlp"
    torch.save({"header": json.dumps(header), "tensors": payload["tensors"]}, crafted)
    with pytest.raises(fnmlp.CheckpointError, match="crafted.fnmlp: (bad spec|not a spec)"):
        fnmlp.load(crafted)


def test_checkpoints_get_ordinary_file_permissions(tmp_path):
    model, params, state, _ = _everything()
    path = tmp_path / "perm.fnmlp"
    fnmlp.save(path, model, params, state=state)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
