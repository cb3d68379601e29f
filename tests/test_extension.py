"""Extension as a first-class path: a primitive and a loss of one's own, registered by one call
each, save, load and twin (also from ``__main__``); loading imports nothing a file names; a
loss that takes no row weights refuses them everywhere instead of ignoring them."""

import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import fnmlp
from fnmlp import _registry
from fnmlp.interop import _spec
from fnmlp.nn import Loss, check_loss_weights
from helpers import Quartic

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


# --- a primitive and a loss of one's own -------------------------------------------------------


@fnmlp.pytree_dataclass
class GainParams:
    gain: torch.Tensor  # (n,)


@dataclasses.dataclass(frozen=True)
class Gain(fnmlp.Primitive):
    """y = x·g + offset (g learnable, (n,));  dx = dy·g,  dg = sum over rows of dy·x."""

    offset: float = 0.0

    def init(self, generator, n_in, dtype, device):
        return n_in, GainParams(torch.rand(n_in, generator=generator, dtype=dtype).to(device))

    def forward(self, params, x, state, context):
        return x * params.gain + self.offset, x, state

    def backward(self, params, x, dy, need_input_grad=True):
        return dy * params.gain, GainParams((dy * x).sum(dim=0))


class TorchGain(nn.Module):
    def __init__(self, gain, offset):
        super().__init__()
        self.gain = nn.Parameter(gain.detach().clone())
        self.offset = offset

    def forward(self, x):
        return x * self.gain + self.offset


def _register_gain():
    return fnmlp.register(
        Gain, torch_module=TorchGain,
        to_torch=lambda layer, params, state, n_in: TorchGain(params.gain, layer.offset),
        from_torch=lambda module: (Gain(module.offset),
                                   GainParams(module.gain.detach().clone()), ()))


@dataclasses.dataclass(frozen=True)
class LogCosh(Loss):
    """Per element log cosh(p - y), reduced as ``reduce_per_element``; dL/dp = tanh(p - y)."""

    scale: float = 1.0

    def forward(self, pred, target, weight=None):
        diff = pred - target
        per = self.scale * (diff.abs() + torch.nn.functional.softplus(-2 * diff.abs())
                            - torch.log(torch.tensor(2.0, dtype=pred.dtype)))
        value, scale = fnmlp.nn.reduce_per_element(self, per, weight)
        return value, (diff, scale)

    def backward(self, residual, dvalue=None):
        diff, scale = residual
        gradient = self.scale * torch.tanh(diff) * scale
        if dvalue is None:
            return gradient
        return gradient * (dvalue.unsqueeze(1) if dvalue.dim() == 1 else dvalue)


class TorchLogCosh(nn.Module):
    """The same loss in torch (``reduction`` "mean", "sum" or per element "none")."""

    def __init__(self, reduction="mean", scale=1.0):
        super().__init__()
        self.reduction, self.scale = reduction, scale

    def forward(self, pred, target):
        per = self.scale * torch.log(torch.cosh(pred - target))
        return {"mean": per.mean, "sum": per.sum}.get(self.reduction, lambda: per)()


def _model():
    model = fnmlp.MLP(3, [fnmlp.Linear(5), Gain(0.25), "tanh", fnmlp.Linear(2)])
    return model, model.init(torch.Generator().manual_seed(0), dtype=F64)


def _data(rows=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(rows, 3, generator=g, dtype=F64),
            torch.randn(rows, 2, generator=g, dtype=F64), torch.rand(rows, generator=g,
                                                                     dtype=F64) + 0.5)


def _equal_trees(a, b) -> bool:
    leaves_a, spec_a = torch.utils._pytree.tree_flatten(a)
    leaves_b, spec_b = torch.utils._pytree.tree_flatten(b)
    return spec_a == spec_b and all(torch.equal(x, y) for x, y in zip(leaves_a, leaves_b))


# --- 1. one call: savable, loadable, twinnable --------------------------------------------------


def test_one_register_call_makes_a_primitive_savable_loadable_and_twinnable(registry,
                                                                          tmp_path):
    assert _register_gain() is Gain
    model, params = _model()
    fnmlp.save(tmp_path / "gain.fnmlp", model, params)
    loaded = fnmlp.load(tmp_path / "gain.fnmlp")
    assert loaded.model == model and loaded.model.layers[1] == Gain(0.25)
    assert isinstance(loaded.params[1], GainParams) and _equal_trees(loaded.params, params)

    twin = fnmlp.to_torch(model, params)
    assert isinstance(twin[1], TorchGain)
    x, y, _ = _data()
    assert torch.equal(twin(x).detach(), model.apply(params, x))
    back, back_params, _ = fnmlp.from_torch(twin)
    assert back == model and _equal_trees(back_params, params)


class TorchGainNamedOtherwise(nn.Module):
    """The same twin, its parameter under another name than the field's (``factor``)."""

    def __init__(self, gain, offset):
        super().__init__()
        self.factor = nn.Parameter(gain.detach().clone())
        self.offset = offset

    def forward(self, x):
        return x * self.factor + self.offset


@pytest.mark.parametrize("name", ["gain.fnmlp", "gain.safetensors"])
def test_a_registered_primitive_round_trips_in_either_file_format(registry, tmp_path, name):
    _register_gain()
    model, params = _model()
    path = tmp_path / name
    fnmlp.save(path, model, params, opt_state=fnmlp.sgd(0.1).init(params),
               optimizer=fnmlp.sgd(0.1))
    loaded = fnmlp.load(path)
    assert loaded.model == model and isinstance(loaded.params[1], GainParams)
    assert _equal_trees(loaded.params, params)


def test_check_primitive_reports_twin_names_that_checkpoints_cannot_give(registry, tmp_path):
    """A checkpoint stores a primitive's tensors under their field paths, which plain torch
    loads into the twin when they are its state_dict names: checked by check_primitive."""
    _register_gain()
    x = torch.randn(4, 3, dtype=F64)
    assert fnmlp.testing.check_primitive(Gain(0.25), x).passed
    model, params = _model()
    fnmlp.save(tmp_path / "gain.fnmlp", model, params)
    weights = torch.load(tmp_path / "gain.fnmlp", weights_only=True)["state_dict"]
    twin = fnmlp.to_torch(model, model.init(torch.Generator().manual_seed(9), dtype=F64))
    twin.load_state_dict(weights)  # plain torch, strict names
    assert torch.equal(twin(x).detach(), model.apply(params, x))

    del registry._BY_NAME["Gain"], registry._BY_CLASS[Gain]
    fnmlp.register(Gain, torch_module=TorchGainNamedOtherwise,
                   to_torch=lambda layer, params, state, n_in: TorchGainNamedOtherwise(
                       params.gain, layer.offset),
                   from_torch=lambda module: (Gain(module.offset),
                                              GainParams(module.factor.detach().clone()), ()))
    result = fnmlp.testing.check_primitive(Gain(0.25), x, raise_on_failure=False)
    assert not result.passed
    assert any("the twin's state_dict names ['factor'] differ from the field paths of the "
               "parameters and state ['gain']" in problem for problem in result.problems)
    with pytest.raises(RuntimeError, match="factor"):
        fnmlp.to_torch(model, params).load_state_dict(weights)


def test_the_spec_is_the_registered_name_the_fields_and_the_qualified_class(registry):
    _register_gain()
    data = _spec.encode_spec(Gain(0.5))
    assert data == {"kind": "Gain", "options": {"offset": 0.5},
                    "class": f"{__name__}.Gain"}
    assert _spec.decode_spec(json.loads(json.dumps(data))) == Gain(0.5)
    assert "class" not in _spec.encode_spec(fnmlp.ReLU())  # fnmlp's own files are unchanged


def test_one_register_call_makes_a_loss_savable_and_twinnable(registry, tmp_path):
    assert fnmlp.register(LogCosh, torch_module=TorchLogCosh) is LogCosh
    loss = LogCosh("sum", scale=2.0)
    assert _spec.decode_spec(json.loads(json.dumps(_spec.encode_spec(loss)))) == loss
    module = fnmlp.interop.loss_to_torch(loss)
    assert isinstance(module, TorchLogCosh) and (module.reduction, module.scale) == ("sum", 2.0)
    assert fnmlp.interop.loss_from_torch(module) == loss

    x, y, _ = _data()
    pred = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(module(pred, y), loss(pred, y), rtol=1e-12, atol=1e-12)
    _register_gain()
    model, params = _model()
    optimizer = fnmlp.sgd(0.1)
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer, loss=LogCosh())
    expected = model.value_and_grad(params, x, y, LogCosh())[0]
    torch.testing.assert_close(twin.step(x, y), expected, rtol=1e-12, atol=1e-12)


def test_a_loss_twin_can_be_given_as_functions(registry):
    fnmlp.register(
        LogCosh, torch_module=TorchLogCosh,
        to_torch=lambda loss, reduction, dtype, device: TorchLogCosh(reduction, loss.scale),
        from_torch=lambda module: LogCosh(module.reduction, scale=module.scale))
    assert fnmlp.interop.loss_from_torch(
        fnmlp.interop.loss_to_torch(LogCosh(scale=3.0))) == LogCosh(scale=3.0)
    assert fnmlp.interop.loss_to_torch(LogCosh(), reduction="none").reduction == "none"


def test_registration_refusals_name_the_problem(registry):
    with pytest.raises(TypeError, match="in_width is a primitive's"):
        fnmlp.register(LogCosh, torch_module=TorchLogCosh, in_width=lambda module: 3)
    with pytest.raises(TypeError, match="a function making the module goes in to_torch"):
        fnmlp.register(Gain, torch_module=lambda layer, params: TorchGain(params.gain, 0.0))

    @dataclasses.dataclass(frozen=True)
    class MySGD(fnmlp.optim.SGD):
        pass

    with pytest.raises(TypeError, match="an optimizer has none of its own"):
        fnmlp.register(MySGD, torch_module=nn.Linear)

    @dataclasses.dataclass(frozen=True)
    class MyMSE(fnmlp.MSE):
        pass

    with pytest.raises(ValueError, match=r"MSELoss is the twin of fnmlp\.nn\._losses\.MSE"):
        fnmlp.register(MyMSE, torch_module=nn.MSELoss)
    assert registry.entry(LogCosh) is None and registry.entry(MyMSE) is None


def test_an_unregistered_loss_cannot_be_saved_or_twinned():
    with pytest.raises(TypeError, match=re.escape("LogCosh cannot be saved as a spec: it is not "
                                                  "registered; register it once with "
                                                  "fnmlp.register(LogCosh)")):
        _spec.encode_spec(LogCosh())
    with pytest.raises(TypeError, match="LogCosh has no torch.nn counterpart registered"):
        fnmlp.interop.loss_to_torch(LogCosh())


def test_an_option_a_spec_cannot_store_is_named(registry):
    @dataclasses.dataclass(frozen=True)
    class Listy(fnmlp.Primitive):
        sizes: list = dataclasses.field(default_factory=list, hash=False)

    fnmlp.register(Listy)
    with pytest.raises(TypeError, match=r"Listy\.sizes holds a list, which a spec cannot "
                                        r"store: options are numbers, strings"):
        _spec.encode_spec(Listy([1, 2]))


# --- __main__ and the safety of loading ---------------------------------------------------------

_MAIN = textwrap.dedent('''
    import dataclasses, sys, torch, fnmlp
    from torch import nn

    @fnmlp.pytree_dataclass
    class ScaleParams:
        scale: torch.Tensor

    @dataclasses.dataclass(frozen=True)
    class Scale(fnmlp.Primitive):
        bias: float = 0.0
        def init(self, generator, n_in, dtype, device):
            return n_in, ScaleParams(torch.rand(n_in, generator=generator, dtype=dtype))
        def forward(self, params, x, state, context):
            return x * params.scale + self.bias, x, state
        def backward(self, params, x, dy, need_input_grad=True):
            return dy * params.scale, ScaleParams((dy * x).sum(dim=0))

    class TorchScale(nn.Module):
        def __init__(self, scale, bias):
            super().__init__()
            self.scale, self.bias = nn.Parameter(scale.detach().clone()), bias
        def forward(self, x):
            return x * self.scale + self.bias

    action, path = sys.argv[1], sys.argv[2]
    if action != "load-unregistered":
        fnmlp.register(Scale, torch_module=TorchScale,
                       to_torch=lambda p, params, state, n_in: TorchScale(params.scale, p.bias),
                       from_torch=lambda m: (Scale(m.bias), ScaleParams(m.scale), ()))
    model = fnmlp.MLP(3, [fnmlp.Linear(4), Scale(0.5), fnmlp.Linear(1)])
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)
    if action == "save":
        params = model.init(torch.Generator().manual_seed(0), dtype=torch.float64)
        fnmlp.save(path, model, params)
        print(model.apply(params, x).sum().item())
    else:
        try:
            loaded = fnmlp.load(path)
        except fnmlp.CheckpointError as error:
            print("CheckpointError:", error)
            raise SystemExit(0)
        assert loaded.model == model and type(loaded.params[1]) is ScaleParams
        twin = fnmlp.to_torch(loaded.model, loaded.params)
        assert fnmlp.from_torch(twin)[0] == model
        print(twin(x).sum().item())
''')


def _run_main(script: Path, *args) -> str:
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_a_primitive_defined_in_main_round_trips_across_processes(tmp_path):
    script, path = tmp_path / "user_script.py", str(tmp_path / "main.fnmlp")
    script.write_text(_MAIN)
    saved = _run_main(script, "save", path)
    assert _run_main(script, "load", path) == saved  # registered again: loads and twins
    refused = _run_main(script, "load-unregistered", path)
    assert "CheckpointError" in refused and "the class __main__.Scale is not registered in " \
        "this process" in refused and "fnmlp.register(Scale) before loading" in refused


def test_loading_imports_nothing_that_a_file_names():
    assert "this" not in sys.modules, "the canary module is imported already"
    with pytest.raises(_spec.SpecError, match=r"unknown kind 'Zen' \(the class this\.Zen is "
                                              r"not registered in this process; .*"
                                              r"fnmlp\.register\(Zen\)"):
        _spec.decode_spec({"kind": "Zen", "class": "this.Zen", "options": {}})
    with pytest.raises(_spec.SpecError, match=r"name='this\.Zen'"):
        _spec.decode_spec({"kind": "this.Zen", "class": "this.Zen", "options": {}})
    with pytest.raises(_spec.SpecError, match="unknown pytree dataclass 'this.Params'"):
        _spec.decode_tree({"dataclass": "this.Params", "fields": {}}, {})
    assert "this" not in sys.modules


def test_a_checkpoint_naming_an_unregistered_class_is_refused_with_its_name(registry,
                                                                            tmp_path):
    _register_gain()
    model, params = _model()
    fnmlp.save(tmp_path / "a.fnmlp", model, params)
    del registry._BY_NAME["Gain"], registry._BY_CLASS[Gain]  # as in a process that did not
    with pytest.raises(fnmlp.CheckpointError, match=re.escape(
            f"the class {__name__}.Gain is not registered in this process; define it and "
            "register it with fnmlp.register(Gain) before loading")):
        fnmlp.load(tmp_path / "a.fnmlp")


# --- 3. row weights: supported or refused -------------------------------------------------------


def test_supports_weights_follows_the_forward_unless_the_class_says():
    built_in = [e.cls for e in _registry.entries("loss")]
    assert built_in and all(cls.supports_weights for cls in built_in)
    assert LogCosh.supports_weights and not Quartic.supports_weights

    @dataclasses.dataclass(frozen=True)
    class Declared(LogCosh):  # takes a weight argument but declares it cannot use it
        supports_weights = False

    @dataclasses.dataclass(frozen=True)
    class Inherits(Quartic):
        pass

    assert not Declared.supports_weights and not Inherits.supports_weights
    _, y, weight = _data()
    pred = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    torch.testing.assert_close(Declared()(pred, y), LogCosh()(pred, y))
    for loss in (Declared(), Inherits(), Quartic()):
        with pytest.raises(TypeError, match=f"{type(loss).__name__} takes no row weights"):
            loss.forward(pred, y, weight)


def test_check_loss_weights_refuses_weights_for_a_loss_without_them():
    check_loss_weights(fnmlp.mse, torch.ones(3))
    check_loss_weights(Quartic(), None)
    with pytest.raises(TypeError, match=re.escape(
            "Quartic takes no row weights (Quartic.supports_weights is False), so "
            "sample_weight cannot be used with it; drop sample_weight, or give Quartic.forward "
            "a third argument")):
        check_loss_weights(Quartic(), [1.0, 2.0])
    with pytest.raises(TypeError, match="so bagging cannot be used"):
        check_loss_weights(Quartic(), True, "bagging")


def test_a_loss_without_weights_trains_and_refuses_sample_weight_everywhere():
    model, params = _model()
    x, y, weight = _data()
    loss = Quartic()
    value, grads = model.value_and_grad(params, x, y, loss)
    assert value.dim() == 0
    refused = "Quartic takes no row weights"
    with pytest.raises(TypeError, match=refused):
        model.value_and_grad(params, x, y, loss, sample_weight=weight)
    with pytest.raises(TypeError, match=refused):
        model.evaluate(params, x, y, loss, sample_weight=weight)
    result = fnmlp.fit(model, params, x, y, epochs=3, batch_size=4, loss=loss,
                       optimizer=fnmlp.sgd(0.05), compile=False)
    assert result.history.train_loss[-1] < result.history.train_loss[0]
    with pytest.raises(TypeError, match=refused):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=4, loss=loss,
                  optimizer=fnmlp.sgd(0.05), compile=False, sample_weight=weight)
    optimizer = fnmlp.sgd(0.05)
    step = fnmlp.train_step(model, loss, optimizer, compile=False)
    step(params, optimizer.init(params), x, y)
    with pytest.raises(TypeError, match=refused):
        step(params, optimizer.init(params), x, y, sample_weight=weight)


def test_a_loss_without_weights_is_never_compiled():
    """A compiled step pads a short batch with rows of weight 0: compile="auto" stays eager
    for a loss without row weights, and compile=True is refused before any work, naming it."""
    model, params = _model()
    x, y, _ = _data()
    loss, optimizer = Quartic(), fnmlp.sgd(0.05)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=3, loss=loss, optimizer=optimizer,
                  verbose=True)
    assert "eager steps (auto: the loss takes no row weights" in printed.getvalue()
    with pytest.raises(ValueError, match="a compiled step needs a loss that takes row weights"):
        fnmlp.train_step(model, loss, optimizer, compile=True)
    with pytest.raises(ValueError, match="Quartic takes none: pass compile=False"):
        fnmlp.fit(model, params, x, y, epochs=1, batch_size=3, loss=loss, optimizer=optimizer,
                  compile=True)


def test_an_ensemble_refuses_sample_weight_and_bagging_for_a_loss_without_weights():
    model, _ = _model()
    ensemble = fnmlp.Ensemble(model, 2)
    params = ensemble.init(torch.Generator().manual_seed(0), dtype=F64)
    x, y, weight = _data()
    loss = Quartic()
    assert ensemble.value_and_grad(params, x, y, loss)[0].shape == (2,)
    with pytest.raises(TypeError, match="Quartic takes no row weights .* so sample_weight"):
        ensemble.value_and_grad(params, x, y, loss, sample_weight=weight)
    options = dict(epochs=1, batch_size=4, optimizer=fnmlp.sgd(0.05), loss=loss, compile=False)
    with pytest.raises(TypeError, match="so sample_weight cannot"):
        ensemble.fit(params, x, y, sample_weight=weight, **options)
    with pytest.raises(TypeError, match=r"so bagging \(bootstrap counts as weights\) cannot"):
        ensemble.fit(params, x, y, bagging=True, **options)
    ensemble.fit(params, x, y, **options)
    optimizer = fnmlp.sgd(0.05)
    step = ensemble.train_step(loss, optimizer, compile=False)
    opt_state = ensemble.init_optimizer(optimizer, params)
    step(params, opt_state, x, y)
    with pytest.raises(TypeError, match="so sample_weight cannot"):
        step(params, opt_state, x, y, sample_weight=weight)
