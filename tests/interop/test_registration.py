"""Register once: one registry feeds the checkpoints' whitelist, the activation names and the
twin rules; a user's primitive is savable, loadable and twinnable after one call; an ensemble
saves and loads."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fnmlp
import fnmlp.sklearn  # noqa: F401  (its loss registers itself too)
from fnmlp import _registry
from fnmlp.interop import _spec
from fnmlp.nn import Loss, Primitive
from fnmlp.optim import Optimizer
from fnmlp.optim.schedules import Schedule

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]


@fnmlp.pytree_dataclass
class ScaleParams:
    scale: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Scale(fnmlp.Primitive):
    """y = x·s (s learnable, (n,));  dx = dy·s,  ds = sum over rows of dy·x."""

    def init(self, generator, n_in, dtype, device):
        return n_in, ScaleParams(torch.rand(n_in, generator=generator, dtype=dtype).to(device))

    def forward(self, params, x, state, context):
        return x * params.scale, x, state

    def backward(self, params, x, dy, need_input_grad=True):
        return dy * params.scale, ScaleParams((dy * x).sum(dim=0))


class TorchScale(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone())

    def forward(self, x):
        return x * self.scale


def _register_scale(**options):
    return fnmlp.register(
        Scale, torch_module=TorchScale,
        to_torch=lambda layer, params, state, n_in: TorchScale(params.scale),
        from_torch=lambda module: (Scale(), ScaleParams(module.scale.detach().clone()), ()),
        **options)


def _scale_model():
    model = fnmlp.MLP(3, [fnmlp.Linear(5), Scale(), "tanh", fnmlp.Linear(2)])
    return model, model.init(torch.Generator().manual_seed(0), dtype=F64)


def _same(a, b) -> bool:
    leaves_a, spec_a = torch.utils._pytree.tree_flatten(a)
    leaves_b, spec_b = torch.utils._pytree.tree_flatten(b)
    return spec_a == spec_b and all(x.dtype == y.dtype and torch.equal(x, y)
                                    for x, y in zip(leaves_a, leaves_b))


def test_a_user_primitive_registered_once_saves_loads_and_twins(registry, tmp_path):
    assert _register_scale() is Scale
    model, params = _scale_model()
    fnmlp.save(tmp_path / "scale.fnmlp", model, params)
    loaded = fnmlp.load(tmp_path / "scale.fnmlp")
    assert loaded.model == model and isinstance(loaded.params[1], ScaleParams)
    assert _same(loaded.params, params)

    twin = fnmlp.to_torch(model, params)
    assert isinstance(twin[1], TorchScale)
    x = torch.randn(7, 3, dtype=F64)
    y = torch.randn(7, 2, dtype=F64)
    assert torch.equal(twin(x).detach(), model.apply(params, x))
    nn.MSELoss()(twin(x), y).backward()
    _, grads = model.value_and_grad(params, x, y)
    for ours, theirs in zip(torch.utils._pytree.tree_leaves(grads), twin.parameters()):
        torch.testing.assert_close(ours, theirs.grad, rtol=1e-13, atol=1e-15)

    back, back_params, _ = fnmlp.from_torch(twin)
    assert back == model and _same(back_params, params)


def test_register_works_as_a_decorator_with_a_name_and_default_twin(registry, tmp_path):
    @fnmlp.register(name="tests.Shift", torch_module=nn.Hardtanh)
    @dataclasses.dataclass(frozen=True)
    class Shift(fnmlp.Primitive):  # a parameterless primitive, options named as its module's
        min_val: float = -1.0
        max_val: float = 1.0

        def forward(self, params, x, state, context):
            return torch.clamp(x, self.min_val, self.max_val), x, state

    assert registry.entry(Shift).name == "tests.Shift"
    model = fnmlp.MLP(2, [fnmlp.Linear(3), Shift(-0.5, 0.5)])
    params = model.init(dtype=F64)
    fnmlp.save(tmp_path / "a", model, params)
    assert json.dumps(_spec.encode_spec(model)).count('"kind": "tests.Shift"') == 1
    assert fnmlp.load(tmp_path / "a").model == model
    twin = fnmlp.to_torch(model, params)
    assert isinstance(twin[1], nn.Hardtanh) and (twin[1].min_val, twin[1].max_val) == (-0.5, 0.5)
    assert fnmlp.from_torch(twin)[0] == model


def test_a_user_activation_is_selected_by_name_once_registered(registry):
    @dataclasses.dataclass(frozen=True)
    class Cube(fnmlp.nn.Activation):
        name = "cube_for_tests"

        def forward(self, params, z, state, context):
            return z ** 3, z, state

    with pytest.raises(ValueError, match="unknown activation 'cube_for_tests'"):
        fnmlp.nn.get_activation("cube_for_tests")
    fnmlp.register(Cube)
    assert fnmlp.nn.get_activation("cube_for_tests") == Cube()
    assert fnmlp.MLP(2, [fnmlp.Linear(2), "cube_for_tests"]).layers[1] == Cube()


def test_registering_twice_or_under_a_taken_name_is_refused(registry):
    _register_scale()
    with pytest.raises(ValueError, match=r"test_registration\.Scale is registered already "
                                         r"\(as 'Scale'\)"):
        fnmlp.register(Scale)

    @dataclasses.dataclass(frozen=True)
    class Linear(fnmlp.Primitive):  # a user's class bearing a built-in's name
        pass

    with pytest.raises(ValueError, match=r"the name 'Linear' is taken by fnmlp\.nn\._linear\."
                                         r"Linear: register .*Linear under another one "
                                         r"\(name=\.\.\.\)"):
        fnmlp.register(Linear)
    fnmlp.register(Linear, name="tests.Linear")  # fine under a name of its own

    @dataclasses.dataclass(frozen=True)
    class MyReLU(fnmlp.Primitive):
        pass

    with pytest.raises(ValueError, match=r"torch\.nn\.modules\.activation\.ReLU is the twin of "
                                         r"fnmlp\.nn\._activations\.ReLU already"):
        fnmlp.register(MyReLU, torch_module=nn.ReLU)

    @dataclasses.dataclass(frozen=True)
    class Relu2(fnmlp.nn.Activation):
        name = "relu"

    with pytest.raises(ValueError, match="the activation name 'relu' is taken by ReLU"):
        fnmlp.register(Relu2)
    assert registry.entry(MyReLU) is None and registry.entry(Relu2) is None  # nothing half-done


def test_what_cannot_be_registered_is_named(registry):
    class Plain(fnmlp.Primitive):  # no dataclass decorator of its own: no spec of its fields
        pass

    with pytest.raises(TypeError, match="Plain must be a frozen dataclass"):
        fnmlp.register(Plain)

    @dataclasses.dataclass(frozen=True)
    class Stranger:
        pass

    with pytest.raises(TypeError, match="must subclass fnmlp.Primitive"):
        fnmlp.register(Stranger)

    @dataclasses.dataclass(frozen=True)
    class MySGD(fnmlp.optim.SGD):  # a loss may have a torch twin (tests/test_extension.py)
        pass

    with pytest.raises(TypeError, match="describe a primitive's nn.Module twin or a loss's"):
        fnmlp.register(MySGD, torch_module=nn.Linear)
    with pytest.raises(TypeError, match="torch_module must be an nn.Module class"):
        fnmlp.register(Scale, torch_module=lambda spec, params: None)


def test_an_unregistered_primitive_refuses_to_save_and_twin_saying_how(tmp_path):
    model, params = _scale_model()
    with pytest.raises(TypeError, match=re.escape(
            "Scale cannot be saved as a spec: it is not registered; register it once with "
            "fnmlp.register(Scale)")):
        fnmlp.save(tmp_path / "a", model, params)
    with pytest.raises(TypeError, match=re.escape(
            "Scale has no torch.nn counterpart registered; give it one when registering it: "
            "fnmlp.register(Scale, torch_module=")):
        fnmlp.to_torch(model, params)
    assert not list(tmp_path.iterdir())


def test_loading_a_class_not_registered_here_is_a_checkpoint_error(registry, tmp_path):
    _register_scale()
    model, params = _scale_model()
    fnmlp.save(tmp_path / "a", model, params)
    del registry._BY_NAME["Scale"], registry._BY_CLASS[Scale]  # as in a fresh process
    with pytest.raises(fnmlp.CheckpointError, match="unknown kind 'Scale' .*fnmlp.register"):
        fnmlp.load(tmp_path / "a")


def _examples() -> list:
    """One instance of every class fnmlp registers (those needing arguments given some)."""
    sgd = fnmlp.sgd(0.1)
    needs_arguments = {
        "Linear": fnmlp.Linear(3, "xavier_uniform"), "MLP": fnmlp.MLP(2, [fnmlp.Linear(1)]),
        "Ensemble": fnmlp.Ensemble(fnmlp.MLP(2, [fnmlp.Linear(1)]), 3),
        "SGD": sgd, "Adam": fnmlp.adamw(0.1, weight_decay=0.01),
        "RMSprop": fnmlp.rmsprop(0.1), "Adagrad": fnmlp.adagrad(0.1),
        "ClipByGlobalNorm": fnmlp.clip_by_global_norm(sgd, 1.0),
        "Constant": fnmlp.schedules.Constant(0.1), "StepDecay": fnmlp.schedules.StepDecay(
            0.1, 10, 0.5), "Exponential": fnmlp.schedules.Exponential(0.1, 0.9),
        "Cosine": fnmlp.schedules.Cosine(0.1, 100), "LinearWarmup":
            fnmlp.schedules.LinearWarmup(0.1, 10),
        "Sequential": fnmlp.schedules.sequence(
            [fnmlp.schedules.Constant(0.1), fnmlp.schedules.Cosine(0.2, 10)], [5]),
        "CrossEntropy": fnmlp.CrossEntropy(label_smoothing=0.1, weight=(1.0, 2.0)),
    }
    own = [entry for entry in _registry.entries() if entry.cls.__module__.startswith("fnmlp.")
           and entry.name != "Lambda"]  # a schedule of a Python function is never saved
    return [needs_arguments[entry.name] if entry.name in needs_arguments else entry.cls()
            for entry in own]


def _subclasses(base: type) -> set[type]:
    found = set()
    for cls in base.__subclasses__():
        found |= {cls} | _subclasses(cls)
    return found


def test_every_built_in_class_is_registered_under_its_own_name_and_round_trips():
    own = {cls for base in (Primitive, Loss, Optimizer, Schedule) for cls in _subclasses(base)
           if cls.__module__.startswith("fnmlp.") and cls is not fnmlp.nn.Activation}
    own |= {fnmlp.MLP, fnmlp.Ensemble, fnmlp.optim.ClipByGlobalNorm}
    for cls in own:
        entry = _registry.entry(cls)
        assert entry is not None, f"{cls.__qualname__} is not registered"
        assert entry.name == cls.__name__  # the names files hold since before the registry
    assert _registry.entry(fnmlp.nn.Activation) is None  # a base class, no spec
    for spec in _examples():
        data = json.loads(json.dumps(_spec.encode_spec(spec)))
        again = _spec.decode_spec(data)
        assert type(again) is type(spec) and again == spec, spec
        if isinstance(spec, Primitive):  # and every built-in primitive has its twin
            assert _registry.entry(type(spec)).twin is not None, spec


def test_the_activation_names_are_unchanged():
    assert fnmlp.nn.activation_names() == [
        "elu", "gelu", "gelu_tanh", "identity", "leaky_relu", "log_softmax", "relu", "sigmoid",
        "silu", "softmax", "softplus", "tanh"]
    assert fnmlp.nn.get_activation("swish") == fnmlp.SiLU()
    assert fnmlp.nn.get_activation("LINEAR") == fnmlp.nn.get_activation(None) == fnmlp.Identity()
    assert fnmlp.nn.get_activation("gelu_tanh") == fnmlp.GELU("tanh")
    registered = {type(fnmlp.nn.get_activation(name)) for name in fnmlp.nn.activation_names()}
    assert all(getattr(fnmlp, cls.__name__) is cls for cls in registered)  # exported too


def test_an_ensemble_saves_and_loads_bit_identically(tmp_path):
    model = fnmlp.MLP(4, [fnmlp.Linear(6), fnmlp.BatchNorm(), "relu", fnmlp.Linear(2)])
    ensemble = fnmlp.Ensemble(model, size=3)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    state = ensemble.init_state(dtype=F64)
    state = ensemble.stack([fnmlp._tree.tree_map(lambda t: t + i, ensemble.member(state, i))
                            for i in range(3)])
    optimizer = fnmlp.adam(fnmlp.schedules.Cosine(1e-3, 100))
    opt_state = ensemble.init_optimizer(optimizer, params, lr=[1e-3, 2e-3, 3e-3])
    fnmlp.save(tmp_path / "ensemble.fnmlp", ensemble, params, state=state,
               opt_state=opt_state, optimizer=optimizer, metadata={"members": 3})
    loaded = fnmlp.load(tmp_path / "ensemble.fnmlp")
    assert loaded.model == ensemble and loaded.optimizer == optimizer
    assert _same(loaded.params, params) and _same(loaded.state, state)
    assert _same(loaded.opt_state, opt_state) and loaded.metadata == {"members": 3}
    fresh = subprocess.run(  # a fresh process knows the kind by `import fnmlp` alone
        [sys.executable, "-c", "import sys, fnmlp; print(fnmlp.load(sys.argv[1]).model.size)",
         str(tmp_path / "ensemble.fnmlp")], capture_output=True, text=True, cwd=ROOT)
    assert fresh.stdout.strip() == "3", fresh.stderr[-2000:]

    with pytest.raises(ValueError, match="params must be stacked for 3 members"):
        fnmlp.save(tmp_path / "b", ensemble, model.init(dtype=F64))
    with pytest.raises(ValueError, match="opt_state must be stacked for 3 members"):
        fnmlp.save(tmp_path / "b", ensemble, params,
                   opt_state=optimizer.init(ensemble.member(params, 0)), optimizer=optimizer)
    with pytest.raises(TypeError, match="model must be a model .*got ReLU"):
        fnmlp.save(tmp_path / "b", fnmlp.ReLU(), ())


def test_the_docs_page_on_adding_a_primitive_runs_as_written(registry, tmp_path,
                                                             monkeypatch):
    page = (ROOT / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks and "fnmlp.register(" in "".join(blocks)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_adding_a_primitive"}
    for block in blocks:
        exec(compile(block, "docs/extending.md", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "scale.fnmlp").exists()


def test_loss_optimizer_and_schedule_twins_are_read_from_the_registry():
    """No hand-kept table beside the registry: every loss, optimizer and schedule that converts
    to torch has its twin in its registry entry, and converting reads it from there."""
    from fnmlp import _registry
    from fnmlp.interop import _registry as interop

    twinned = {kind: {e.cls.__name__ for e in _registry.entries(kind) if e.twin is not None}
               for kind in ("loss", "optimizer", "schedule")}
    assert twinned["loss"] == {"MSE", "L1", "Huber", "SmoothL1", "PoissonNLL", "CrossEntropy",
                               "BinaryCrossEntropyWithLogits"}
    assert twinned["optimizer"] == {"SGD", "Adam", "RMSprop", "Adagrad"}
    assert twinned["schedule"] == {"Constant", "StepDecay", "Exponential", "Cosine",
                                   "LinearWarmup", "Sequential", "Lambda"}
    assert not {"_LOSSES", "_OPTIMIZERS", "_SCHEDULES"} & set(vars(interop))
    assert type(fnmlp.interop.loss_to_torch(fnmlp.Huber(delta=0.5))) is torch.nn.HuberLoss
    assert fnmlp.interop.loss_from_torch(torch.nn.HuberLoss(delta=0.5)) == fnmlp.Huber(delta=0.5)
    with pytest.raises(ValueError, match="twin already"):
        _registry.set_twin(fnmlp.MSE, interop.LossTwin((torch.nn.MSELoss,), dict, dict))
