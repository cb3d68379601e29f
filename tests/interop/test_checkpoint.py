"""Checkpoints: round trips, safety (no code runs from a file), atomic writes, clear errors,
files that plain torch and safetensors read, and format 1 files."""

import io
import json
import os
import pickle
import re
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import zipfile
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


@pytest.mark.parametrize("name", ["run.fnmlp", "run.safetensors"])
def test_a_checkpoint_round_trips_and_training_continues_identically(tmp_path, name):
    model, params, state, optimizer = _everything()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    kwargs = dict(epochs=2, batch_size=8, optimizer=optimizer,
                  generator=torch.Generator().manual_seed(3))
    first = fnmlp.fit(model, params, x, y, state=state, **kwargs)
    path = tmp_path / name
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
    with pytest.raises(fnmlp.CheckpointError, match=f"{truncated}: truncated"):
        fnmlp.load(truncated)
    flipped = tmp_path / "flipped.fnmlp"
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["0.weight"] = payload["state_dict"]["0.weight"].clone()
    payload["state_dict"]["0.weight"].view(torch.int64)[0] ^= 1  # one bit of one weight
    torch.save(payload, flipped)
    with pytest.raises(fnmlp.CheckpointError,
                       match=rf"{flipped}: corrupted \(checksum mismatch\)"):
        fnmlp.load(flipped)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(fnmlp.CheckpointError, match="not an fnmlp checkpoint"):
        fnmlp.load(foreign)
    with pytest.raises(fnmlp.CheckpointError, match="no such file"):
        fnmlp.load(tmp_path / "missing.fnmlp")
    from fnmlp.interop import _checkpoint

    newer_version = _checkpoint.VERSION + 1
    monkeypatch.setattr(_checkpoint, "VERSION", newer_version)
    for name in ("newer.fnmlp", "newer.safetensors"):
        newer = tmp_path / name
        fnmlp.save(newer, model, params, state=state)
        monkeypatch.undo()
        with pytest.raises(fnmlp.CheckpointError,
                           match=f"format {newer_version} by a newer fnmlp"):
            fnmlp.load(newer)
        monkeypatch.setattr(_checkpoint, "VERSION", newer_version)


def _saved_everything(path):
    """``(path, bytes)`` of a checkpoint of ``_everything`` (its format from the suffix)."""
    model, params, state, optimizer = _everything()
    fnmlp.save(path, model, params, state=state, opt_state=optimizer.init(params),
               optimizer=optimizer)
    return path, path.read_bytes()


@pytest.fixture
def saved(tmp_path):
    return _saved_everything(tmp_path / "good.fnmlp")


def _refused(path, message: str) -> str:
    """The ``CheckpointError`` that loading ``path`` raises, which must name the file, say
    ``message`` (a regex) and hold no raw reader message."""
    with pytest.raises(fnmlp.CheckpointError, match=rf"^{re.escape(str(path))}: {message}") \
            as raised:
        fnmlp.load(path)
    text = str(raised.value)
    assert not any(word in text for word in ("miniz", "PytorchStreamReader", "Errno"))
    return text


@pytest.mark.parametrize("keep", [0, 1, 3, 10, 100, 0.5, -22, -1])
def test_a_truncated_file_says_truncated_naming_it(tmp_path, saved, keep):
    _, data = saved
    cut = tmp_path / "cut.fnmlp"
    cut.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    _refused(cut, "truncated")


def _data_offsets(data: bytes) -> dict[str, int]:
    """Where each zip entry's bytes start in ``data`` (after its local header)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
    offsets = {}
    for info in infos:
        name_size, extra_size = struct.unpack("<HH", data[info.header_offset + 26:
                                                          info.header_offset + 30])
        offsets[info.filename] = info.header_offset + 30 + name_size + extra_size
    return offsets


def test_a_flipped_byte_says_corrupted_naming_it(tmp_path, saved):
    """One byte flipped in the pickled header, in a tensor, in the zip's directory or in its
    first header: each says "corrupted" (with "checksum mismatch" where a checksum caught
    it), never a raw zip-reader message."""
    _, data = saved
    offsets = _data_offsets(data)
    directory = struct.unpack("<I", data[-6:-2])[0]  # the end record's offset of the directory
    positions = {
        "header": offsets["archive/data.pkl"] + 60,  # the JSON text in the pickle
        "tensor": offsets["archive/data/0"] + 3,
        "directory": data.index(b"archive/data.pkl", directory) + 9,
        "first header": 0,
        "pickle opcode": offsets["archive/data.pkl"],
    }
    for where, position in positions.items():
        flipped = tmp_path / f"flipped-{where.replace(' ', '-')}.fnmlp"
        damaged = bytearray(data)
        damaged[position] ^= 0x01  # (0x20 would flip only a letter's case: names match either)
        flipped.write_bytes(bytes(damaged))
        message = (r"corrupted \(checksum mismatch" if where in ("header", "tensor")
                   else "corrupted")
        _refused(flipped, message)


def test_a_foreign_zip_and_a_directory_are_named_as_such(tmp_path):
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    text = _refused(foreign, "not a readable fnmlp checkpoint")
    assert "truncated" not in text and "corrupted" not in text
    _refused(tmp_path, "a directory, not a checkpoint file")


@pytest.mark.parametrize("name", ["ensemble.fnmlp", "ensemble.safetensors"])
def test_an_ensemble_saves_loads_and_continues_identically(tmp_path, name):
    model = fnmlp.MLP(3, [fnmlp.Dense(5, "tanh", dropout=0.1), fnmlp.BatchNorm(),
                          fnmlp.Dense(2)])
    ensemble = fnmlp.Ensemble(model, size=3)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    optimizer = fnmlp.adam(0.01)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    kwargs = dict(epochs=2, batch_size=8, optimizer=optimizer, compile=False,
                  generator=torch.Generator().manual_seed(3))
    first = fnmlp.fit(ensemble, params, x, y, **kwargs)
    path = tmp_path / name
    fnmlp.save(path, ensemble, first.params, state=first.state, opt_state=first.opt_state,
               optimizer=optimizer, metadata={"members": 3})
    loaded = fnmlp.load(path)
    assert loaded.model == ensemble and loaded.optimizer == optimizer
    assert loaded.metadata == {"members": 3}
    saved_trees = (first.params, first.state, first.opt_state)
    loaded_trees = (loaded.params, loaded.state, loaded.opt_state)
    assert all(torch.equal(a, b) for a, b in zip(leaves(saved_trees), leaves(loaded_trees)))
    kwargs["generator"] = torch.Generator().manual_seed(4)
    again = fnmlp.fit(ensemble, first.params, x, y, state=first.state,
                      opt_state=first.opt_state, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(4)
    resumed = fnmlp.fit(loaded.model, loaded.params, x, y, state=loaded.state,
                        opt_state=loaded.opt_state, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(leaves(again.params), leaves(resumed.params)))


def _small():
    model = fnmlp.MLP(3, [fnmlp.Dense(4, "tanh"), fnmlp.Dense(2)])
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    return model, params, x, x[:, :2].clone()


def _fits(model, params, x, y, checkpoint):
    """``fnmlp.fit`` and an ensemble's fit checkpointing to ``checkpoint``, as calls that fail
    if any epoch ran."""
    def never(epoch, logs):
        raise AssertionError("an epoch ran before the checkpoint path was refused")

    ensemble = fnmlp.Ensemble(model, size=2)
    options = dict(epochs=1, batch_size=4, optimizer=fnmlp.sgd(0.1), checkpoint=checkpoint,
                   on_epoch_end=never, compile=False)
    return [lambda: fnmlp.fit(model, params, x, y, **options),
            lambda: fnmlp.fit(model, params, x, y, resume=True, **options),
            lambda: fnmlp.fit(ensemble, ensemble.stack([params, params]), x, y, **options)]


def test_a_directory_or_a_missing_folder_as_checkpoint_path_is_named_before_any_work(
        tmp_path):
    model, params, x, y = _small()
    folder = tmp_path / "run.fnmlp"
    folder.mkdir()
    (folder / "keep").write_text("kept")
    calls = [lambda: fnmlp.save(folder, model, params)] + _fits(model, params, x, y, folder)
    for call in calls:
        with pytest.raises(IsADirectoryError, match=rf"{re.escape(str(folder))}: it is a "
                                                    "directory; name a file in it"):
            call()
    assert [p.name for p in folder.iterdir()] == ["keep"] and (folder / "keep").read_text()
    missing = tmp_path / "nowhere" / "run.fnmlp"
    calls = [lambda: fnmlp.save(missing, model, params)] + _fits(model, params, x, y, missing)
    for call in calls:
        with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(missing))}: its folder "
                                                    ".* does not exist"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.fnmlp"]  # no temporary files


def test_a_read_only_folder_is_named_and_the_old_checkpoint_stays(tmp_path):
    model, params, x, y = _small()
    folder = tmp_path / "locked"
    folder.mkdir()
    path = folder / "run.fnmlp"
    fnmlp.save(path, model, params, metadata={"version": 0})
    folder.chmod(0o555)
    try:
        if _writable(folder):
            pytest.skip("this process writes into read-only folders (root, or the file system)")
        with pytest.raises(PermissionError, match=rf"{re.escape(str(path))}: its folder .* is "
                                                  "not writable"):
            fnmlp.save(path, model, params, metadata={"version": 1})
        for call in _fits(model, params, x, y, path):  # resuming too: it would write there
            with pytest.raises(PermissionError, match=re.escape(str(path))):
                call()
        assert fnmlp.load(path).metadata == {"version": 0}
        assert [p.name for p in folder.iterdir()] == ["run.fnmlp"]
    finally:
        folder.chmod(0o755)


def _writable(folder) -> bool:
    """Whether this process can create a file in ``folder`` whatever its mode says (root can)."""
    probe = folder / ".probe"
    try:
        probe.write_text("")
    except PermissionError:
        return False
    probe.unlink()
    return True


@pytest.mark.parametrize("fail_at", ["temporary file", "writing"])
def test_a_failed_write_names_the_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch,
                                                                   fail_at):
    """Whatever the user (root included) may do to a folder, a write that fails midway raises
    an ``OSError`` naming the checkpoint, not the temporary file, and leaves the old file."""
    from fnmlp import _files
    from fnmlp.interop import _checkpoint

    model, params, _, _ = _small()
    path = tmp_path / "run.fnmlp"
    fnmlp.save(path, model, params, metadata={"version": 0})

    create = os.open

    def refuse(file, flags, *args, **kwargs):  # creating the temporary file, only
        if flags & os.O_EXCL:
            raise PermissionError(13, "Permission denied", str(file))
        return create(file, flags, *args, **kwargs)

    def disk_full(payload, file):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    if fail_at == "temporary file":
        monkeypatch.setattr(_files.os, "open", refuse)
    else:
        monkeypatch.setattr(_checkpoint.torch, "save", disk_full)
    expected = PermissionError if fail_at == "temporary file" else OSError
    with pytest.raises(expected, match=rf"cannot write the checkpoint {re.escape(str(path))}: "
                                       "(Permission denied|No space left on device)"):
        fnmlp.save(path, model, params, metadata={"version": 1})
    monkeypatch.undo()
    assert fnmlp.load(path).metadata == {"version": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["run.fnmlp"]


@pytest.mark.parametrize("suffix", [".fnmlp", ".safetensors"])
def test_a_written_file_has_an_ordinary_new_files_mode_and_the_umask_is_left_alone(
        tmp_path, monkeypatch, suffix):
    """0o666 less the umask, as ``open`` gives, applied by the kernel when the temporary file
    is created: the process's umask (which other threads share) is never set, not even for a
    moment to read it."""
    from fnmlp import _files

    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    umask = _UMASK(0o022)  # the test's own reading, once
    _UMASK(umask)
    model, params, _, _ = _small()
    monkeypatch.setattr(_files.os, "umask", lambda mask: pytest.fail(
        f"os.umask({mask:#o}) was called while writing"))
    masks = sorted({umask, 0o027})
    for mask in masks:
        path = tmp_path / f"run-{mask:o}{suffix}"
        _UMASK(mask)
        try:
            fnmlp.save(path, model, params)
        finally:
            _UMASK(umask)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, oct(mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"run-{mask:o}{suffix}" for mask in masks)  # no temporary file left


_UMASK = os.umask  # the real one, for the test to set while os.umask is patched


def test_a_temporary_name_taken_already_is_drawn_again_and_never_overwritten(tmp_path,
                                                                             monkeypatch):
    from fnmlp import _files

    model, params, _, _ = _small()
    taken = tmp_path / ".fnmlp-taken.tmp"
    taken.write_bytes(b"someone else's")
    names = iter(["taken", "taken", "fresh"])
    monkeypatch.setattr(_files.secrets, "token_hex", lambda size: next(names))
    path = tmp_path / "run.fnmlp"
    fnmlp.save(path, model, params, metadata={"version": 0})
    assert taken.read_bytes() == b"someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fnmlp-taken.tmp", "run.fnmlp"]
    assert fnmlp.load(path).metadata == {"version": 0}
    monkeypatch.setattr(_files.secrets, "token_hex", lambda size: "taken")
    with pytest.raises(FileExistsError, match=rf"cannot write the checkpoint "
                                              rf"{re.escape(str(path))}: File exists"):
        fnmlp.save(path, model, params, metadata={"version": 1})
    assert fnmlp.load(path).metadata == {"version": 0}
    assert taken.read_bytes() == b"someone else's"


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
        {k: v for k, v in header.items() if k != "checksum"},
        {**payload["state_dict"], **payload["tensors"]})
    crafted = tmp_path / "crafted.fnmlp"
    torch.save({**payload, "header": json.dumps(header)}, crafted)
    with pytest.raises(fnmlp.CheckpointError, match="crafted.fnmlp: (bad spec|not a spec)"):
        fnmlp.load(crafted)


def test_checkpoints_get_ordinary_file_permissions(tmp_path):
    model, params, state, _ = _everything()
    path = tmp_path / "perm.fnmlp"
    fnmlp.save(path, model, params, state=state)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# --- format 2: the twin's names, plain torch and safetensors readers, format 1 files -----------

DATA = Path(__file__).resolve().parent / "data"


def _x(rows=6, features=3):
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(7), dtype=F64)


def _same_outputs(twin, model, params, state=None) -> None:
    """The twin (loaded from a file) computes what the twin made from ``params`` and
    ``state`` computes, bit for bit, and what fnmlp computes (to rounding)."""
    x = _x(features=model.in_features)
    twin.eval()
    reference = fnmlp.to_torch(model, params, state).eval()
    with torch.no_grad():
        assert torch.equal(twin(x), reference(x))
        torch.testing.assert_close(twin(x), model.apply(params, x, state=state))


def _trained_state(model, params):
    """A state with running statistics that are not the initial ones."""
    return model.value_and_grad(params, _x(), torch.zeros(6, model.out_features, dtype=F64),
                                state=model.init_state(dtype=F64),
                                key=fnmlp.dropout_key(0, 0))[2]


def test_plain_torch_loads_the_state_dict_into_the_twin_and_it_computes_the_same(tmp_path):
    model, params, _, optimizer = _everything()
    state = _trained_state(model, params)
    path = tmp_path / "run.fnmlp"
    fnmlp.save(path, model, params, state=state, opt_state=optimizer.init(params),
               optimizer=optimizer, extra={"generator": torch.Generator().get_state()})
    payload = torch.load(path, weights_only=True)  # what a user without fnmlp does
    assert set(payload) == {"header", "state_dict", "tensors"}
    other = model.init(torch.Generator().manual_seed(99), dtype=F64)
    twin = fnmlp.to_torch(model, other,  # another network of the same architecture
                          model.init_state(dtype=F64))
    assert list(payload["state_dict"]) == [k for k in twin.state_dict()
                                           if "running" not in k and "batches" not in k] + [
        "4.running_mean", "4.running_var", "4.num_batches_tracked"]
    twin.load_state_dict(payload["state_dict"])  # strict: every name matches
    _same_outputs(twin, model, params, state)
    names = set(payload["tensors"])
    assert {"opt_state.step", "opt_state.exp_avg.0.weight", "opt_state.exp_avg_sq.7.bias",
            "opt_state.max_exp_avg_sq.4.weight", "extra.generator"} <= names
    assert all(n.startswith(("opt_state.", "extra.")) for n in names)
    assert not any(re.fullmatch(r"t\d+", n) for n in names | set(payload["state_dict"]))


def test_the_header_names_types_by_public_names_only(tmp_path):
    model, params, state, optimizer = _everything()
    path = tmp_path / "run.fnmlp"
    fnmlp.save(path, model, params, state=state, opt_state=optimizer.init(params),
               optimizer=optimizer)
    header = torch.load(path, weights_only=True)["header"]
    assert not re.search(r"fnmlp(\.\w+)*\._", header), "a private module path in the header"
    assert '"fnmlp.nn.LinearParams"' in header and '"fnmlp.optim.AdamState"' in header
    assert json.loads(header)["version"] == 2


def test_safetensors_reads_the_same_names_without_fnmlp(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model, params, _, optimizer = _everything()
    state = _trained_state(model, params)
    path = tmp_path / "run.safetensors"
    fnmlp.save(path, model, params, state=state, opt_state=optimizer.init(params),
               optimizer=optimizer)
    tensors = load_file(path)
    state_dict = {k: v for k, v in tensors.items() if not k.startswith(("opt_state.", "extra."))}
    twin = fnmlp.to_torch(model, model.init(dtype=F64), model.init_state(dtype=F64))
    twin.load_state_dict(state_dict)
    _same_outputs(twin, model, params, state)
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
    assert metadata["format"] == "pt" and json.loads(metadata["fnmlp"])["version"] == 2
    torch_file = tmp_path / "run.fnmlp"
    fnmlp.save(torch_file, model, params, state=state, opt_state=optimizer.init(params),
               optimizer=optimizer)
    payload = torch.load(torch_file, weights_only=True)
    assert set(tensors) == set(payload["state_dict"]) | set(payload["tensors"])
    forced = tmp_path / "forced.ckpt"
    fnmlp.save(forced, model, params, format="safetensors")
    assert set(load_file(forced)) == {k for k in state_dict if "running" not in k
                                      and "batches" not in k} | {
        "4.running_mean", "4.running_var", "4.num_batches_tracked"}
    assert fnmlp.load(forced).model == model


@pytest.mark.parametrize("name", ["ensemble.fnmlp", "ensemble.safetensors"])
def test_an_ensembles_members_load_into_a_module_list_of_twins(tmp_path, name):
    model = fnmlp.MLP(3, [fnmlp.Dense(5, "tanh"), fnmlp.BatchNorm(), fnmlp.Dense(2)])
    ensemble = fnmlp.Ensemble(model, size=3)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    state = ensemble.stack([_trained_state(model, ensemble.member(params, k)) for k in range(3)])
    path = tmp_path / name
    fnmlp.save(path, ensemble, params, state=state, opt_state=ensemble.init_optimizer(
        fnmlp.adam(0.1), params), optimizer=fnmlp.adam(0.1))
    if name.endswith(".fnmlp"):
        payload = torch.load(path, weights_only=True)
        state_dict, others = payload["state_dict"], payload["tensors"]
        assert list(state_dict)[:2] == ["members.0.0.weight", "members.0.0.bias"]
    else:
        from safetensors.torch import load_file

        tensors = load_file(path)
        state_dict = {k: v for k, v in tensors.items() if k.startswith("members.")}
        others = {k: v for k, v in tensors.items() if not k.startswith("members.")}
    twins = torch.nn.ModuleDict({"members": torch.nn.ModuleList(
        fnmlp.to_torch(model, model.init(dtype=F64), model.init_state(dtype=F64))
        for _ in range(3))})
    twins.load_state_dict(state_dict)
    for k, twin in enumerate(twins["members"]):
        _same_outputs(twin, model, ensemble.member(params, k), ensemble.member(state, k))
    assert others["opt_state.exp_avg.0.weight"].shape == (3, 5, 3)  # stacked, as in fnmlp


@pytest.mark.parametrize("fixture, kind", [("v1-mlp.pt", fnmlp.MLP),
                                           ("v1-ensemble.pt", fnmlp.Ensemble)])
def test_a_format_1_file_still_loads_and_continues(tmp_path, fixture, kind):
    """Files of format 1 (tensors t0, t1, ..., the private paths of the pytree dataclasses),
    committed as the code before format 2 wrote them (tests/interop/data/README.md)."""
    path = DATA / fixture
    payload = torch.load(path, weights_only=True)
    header = json.loads(payload["header"])
    assert header["version"] == 1 and set(payload) == {"header", "tensors"}
    loaded = fnmlp.load(path)
    assert isinstance(loaded.model, kind)
    trees = leaves((loaded.params, loaded.state, loaded.opt_state))
    assert all(torch.equal(t, payload["tensors"][f"t{i}"]) for i, t in enumerate(trees))
    model = loaded.model.model if kind is fnmlp.Ensemble else loaded.model
    x = _x(features=model.in_features)
    y = torch.zeros(6, model.out_features, dtype=F64)
    options = dict(epochs=1, batch_size=3, optimizer=loaded.optimizer, compile=False)
    resumed = fnmlp.fit(loaded.model, loaded.params, x, y, opt_state=loaded.opt_state,
                        state=loaded.state, **options)
    again = tmp_path / "again.fnmlp"  # written in this format, the same trees
    fnmlp.save(again, loaded.model, loaded.params, state=loaded.state,
               opt_state=loaded.opt_state, optimizer=loaded.optimizer,
               metadata=loaded.metadata, extra=loaded.extra)
    reloaded = fnmlp.load(again)
    assert reloaded.metadata == loaded.metadata and reloaded.model == loaded.model
    assert all(torch.equal(a, b) for a, b in zip(
        leaves((reloaded.params, reloaded.state, reloaded.opt_state, reloaded.extra)),
        leaves((loaded.params, loaded.state, loaded.opt_state, loaded.extra))))
    continued = fnmlp.fit(reloaded.model, reloaded.params, x, y,
                          opt_state=reloaded.opt_state, state=reloaded.state, **options)
    assert all(torch.equal(a, b) for a, b in zip(leaves(resumed.params),
                                                 leaves(continued.params)))


@pytest.fixture
def saved_safetensors(tmp_path):
    return _saved_everything(tmp_path / "good.safetensors")


@pytest.mark.parametrize("keep", [0, 5, 8, 20, 0.5, -100, -1])
def test_a_truncated_safetensors_file_says_truncated(tmp_path, saved_safetensors, keep):
    _, data = saved_safetensors
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    _refused(cut, "truncated")


def test_a_damaged_or_foreign_safetensors_file_gets_a_clear_error(tmp_path, saved_safetensors):
    from safetensors.torch import save_file

    _, data = saved_safetensors
    length = int.from_bytes(data[:8], "little")
    for where, position, message in [
            ("tensor", len(data) - 3, r"corrupted \(checksum mismatch"),
            ("header-json", 9, "corrupted"),
            ("header-length", 7, "corrupted"),
            ("fnmlp-header", data.index(b'torch.float64') + 8, r"corrupted \(checksum")]:
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        flipped = tmp_path / f"flipped-{where}.safetensors"
        flipped.write_bytes(bytes(damaged))
        _refused(flipped, message)
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(data + b"\0" * 16)
    _refused(longer, "corrupted")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, foreign)
    _refused(foreign, "a safetensors file, but not an fnmlp checkpoint")
    assert length > 0


def test_safetensors_stays_optional_and_its_absence_is_named(tmp_path, monkeypatch,
                                                             saved_safetensors):
    model, params, x, y = _small()
    path, _ = saved_safetensors
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        fnmlp.save(tmp_path / "new.safetensors", model, params)
    with pytest.raises(ImportError, match="pip install safetensors"):
        fnmlp.load(path)
    fnmlp.save(tmp_path / "plain.fnmlp", model, params)  # the torch format needs none
    assert fnmlp.load(tmp_path / "plain.fnmlp").model == model
    with pytest.raises(ValueError, match="format must be one of"):
        fnmlp.save(tmp_path / "a.fnmlp", model, params, format="onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors", "plain.fnmlp"]


def test_a_failed_safetensors_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from fnmlp.interop import _safetensors

    model, params, _, _ = _small()
    path = tmp_path / "run.safetensors"
    fnmlp.save(path, model, params, metadata={"version": 0})

    def disk_full(file, temporary, tensors, header):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_safetensors, "write", disk_full)
    with pytest.raises(OSError, match=rf"cannot write the checkpoint {re.escape(str(path))}: "
                                      "No space left on device"):
        fnmlp.save(path, model, params, metadata={"version": 1})
    monkeypatch.undo()
    assert fnmlp.load(path).metadata == {"version": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"]


@pytest.mark.parametrize("members", [None, 3])
def test_a_fit_checkpointing_to_safetensors_resumes_bit_identically(tmp_path, members):
    """``fit(checkpoint="....safetensors")``: the fit's own checkpoints in that format (the
    generator state, best weights and early stopping's bookkeeping among the extra trees)."""
    model = fnmlp.MLP(3, [fnmlp.Dense(6, "tanh", dropout=0.1), fnmlp.BatchNorm(),
                          fnmlp.Dense(2)])
    network = model if members is None else fnmlp.Ensemble(model, size=members)
    params = network.init(torch.Generator().manual_seed(0), dtype=F64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 3, generator=g, dtype=F64)
    y = torch.randn(48, 2, generator=g, dtype=F64)
    options = dict(batch_size=16, optimizer=fnmlp.adam(1e-2), shuffle=True, compile=False,
                   valid=(x[:16], y[:16]), patience=3, restore_best=True)
    whole = fnmlp.fit(network, params, x, y, epochs=4,
                      generator=torch.Generator().manual_seed(5), **options)
    path = tmp_path / "fit.safetensors"
    fnmlp.fit(network, params, x, y, epochs=2, generator=torch.Generator().manual_seed(5),
              checkpoint=path, **options)
    assert path.read_bytes()[8:9] == b"{"  # safetensors, not a torch zip
    resumed = fnmlp.fit(network, params, x, y, epochs=4, checkpoint=path, resume=True,
                        generator=torch.Generator().manual_seed(9), **options)
    assert all(torch.equal(a, b) for a, b in zip(leaves((whole.params, whole.opt_state)),
                                                 leaves((resumed.params, resumed.opt_state))))
    assert resumed.history == whole.history
