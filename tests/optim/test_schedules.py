"""Composed learning-rate schedules: warm-up into a schedule, sequences and functions of the
step. Their rates by hand-computed formulas, their scaling with the state's base rate, their
checkpoints (and the refusal of a function), and their torch twins (``SequentialLR``,
``LambdaLR``) rate by rate and trained step by step."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import fnmlp
from fnmlp.interop import decode_spec, encode_spec, optimizer_from_torch, optimizer_to_torch
from helpers import leaves, relative

F64 = torch.float64
S = fnmlp.schedules


def _decay(step):  # a module-level function: the same object in every parametrization
    return 1 / (1 + 0.1 * step)


COMPOSITIONS = {
    "warmup-cosine": S.linear_warmup(S.cosine(0.1, 50, eta_min=1e-3), 10, start_factor=0.1),
    "warmup-exponential": S.linear_warmup(S.exponential(0.1, gamma=0.95), 7),
    "warmup-step-decay": S.linear_warmup(S.step_decay(0.1, step_size=5, gamma=0.5), 4),
    "sequence": S.sequence([S.constant(0.1), S.exponential(0.05, gamma=0.9),
                            S.cosine(0.2, 10, eta_min=0.01), S.step_decay(0.3, 3, 0.7)],
                           [3, 8, 20]),
    "warmup-in-sequence": S.sequence([S.linear_warmup(S.cosine(0.1, 30), 5),
                                      S.constant(0.01)], [25]),
    "lambda": S.lambda_lr(0.1, _decay),
    "lambda-in-sequence": S.sequence([S.lambda_lr(0.1, lambda step: 0.9 ** step),
                                      S.cosine(0.05, 20)], [10]),
}


def _rates(schedule, steps: int) -> list[float]:
    return [schedule(step).item() for step in range(steps)]


# --- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("call, error, message", [
    (lambda: S.sequence([S.constant(0.1)], [5]), ValueError,
     r"boundaries must hold one step per part after the first: 0 for 1 parts, got 1"),
    (lambda: S.sequence([S.constant(0.1), S.constant(0.2)], [0]), ValueError,
     r"boundaries\[0\] must be an integer >= 1, got 0"),
    (lambda: S.sequence([S.constant(0.1), S.constant(0.2)], [2.5]), ValueError,
     r"boundaries\[0\] must be an integer"),
    (lambda: S.sequence([S.constant(0.1)] * 3, [5, 5]), ValueError,
     r"boundaries must be strictly increasing, got \[5, 5\]"),
    (lambda: S.sequence([S.constant(0.1), 0.2], [3]), TypeError,
     r"parts\[1\] must be a schedule, got float"),
    (lambda: S.sequence([S.constant(0.1), lambda step: 1.0], [3]), TypeError,
     r"parts\[1\] must be a schedule, got function .*lambda_lr"),
    (lambda: S.sequence([], []), ValueError, "parts must hold at least one schedule"),
    (lambda: S.sequence(S.constant(0.1), []), TypeError, "parts must be a list of schedules"),
    (lambda: S.sequence([S.constant(0.1), S.constant(0.2)], 3), TypeError,
     "boundaries must be a list of steps"),
    (lambda: S.Sequential(base=0.5, parts=(S.constant(0.1),)), ValueError,
     r"base must be parts\[0\].base \(0.1\), got 0.5"),
    (lambda: S.Sequential((S.constant(0.1),), ()), TypeError,
     "parts= and boundaries= by keyword"),
    (lambda: S.linear_warmup(S.cosine(0.1, 10), 0), ValueError, "warmup_steps must be"),
    (lambda: S.linear_warmup(S.cosine(0.1, 10), 5, start_factor=0), ValueError,
     "start_factor must be"),
    (lambda: S.linear_warmup("0.1", 5), TypeError, "base learning rate must be a float"),
    (lambda: S.lambda_lr(0.1, 3.0), TypeError, "fn must be a function of the step"),
    (lambda: S.lambda_lr(-1.0, _decay), ValueError,
     "base learning rate must be finite and > 0"),
    (lambda: fnmlp.adam(S.Cosine), TypeError, "lr must be a float"),  # a class, no schedule
    (lambda: S.exponential(0.1, gamma=-1.0), ValueError, "gamma must be finite and > 0"),
    (lambda: S.exponential(0.1, gamma=0.0), ValueError, "gamma must be finite and > 0"),
    (lambda: S.step_decay(0.1, 5, gamma=0.0), ValueError, "gamma must be finite and > 0"),
    (lambda: S.step_decay(0.1, 5, gamma=-0.5), ValueError, "gamma must be finite and > 0"),
    (lambda: S.exponential(0.1, gamma="0.9"), TypeError, "gamma must be a float"),
    (lambda: S.cosine(0.1, 10, eta_min=0.5), ValueError,
     r"eta_min must be in \[0, lr\] .*lr=0.1\), got eta_min=0.5"),
    (lambda: S.cosine(0.1, 10, eta_min=-1e-3), ValueError,
     r"eta_min must be in \[0, lr\] .*got eta_min=-0.001"),
])
def test_bad_arguments_are_named_before_any_work(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_function_returning_no_number_is_named_when_made():
    with pytest.raises(TypeError, match=r"must return a number or a 0-d tensor, got a tensor of "
                                        r"shape \(3,\) at step 0"):
        S.lambda_lr(0.1, lambda step: torch.ones(3))
    with pytest.raises(TypeError, match="got str at step 0"):
        fnmlp.adam(lambda step: "fast")


def test_the_edges_of_the_checked_ranges_are_taken():
    assert S.cosine(0.1, 10, eta_min=0.1)(7).item() == pytest.approx(0.1)
    assert S.cosine(0.1, 10, eta_min=0.0)(10).item() == pytest.approx(0.0, abs=1e-18)
    assert S.exponential(0.1, gamma=1.5)(2).item() == pytest.approx(0.225)
    assert S.step_decay(0.1, 2, gamma=2.0)(4).item() == pytest.approx(0.4)


FIX = r"write it with torch operations on the step tensor, e\.g\. torch\.exp instead of math\.exp"


@pytest.mark.parametrize("fn", [
    lambda step: math.exp(-0.01 * step),            # math on the step
    lambda step: 0.5 ** int(step // 10),            # int(step)
    lambda step: 1 / (1 + 0.1 * float(step)),       # float(step)
    lambda step: min(1.0, (step + 1) / 10),         # min: a tensor, then a Python number
], ids=["math.exp", "int", "float", "min"])
def test_a_function_computing_the_rate_outside_torch_is_refused_when_made(fn):
    """It runs eagerly but fails once compiled (GuardOnDataDependentSymNode): a Python number
    that changes with the step tensor is named when the schedule is made."""
    with pytest.raises(TypeError, match=r"returns a Python number, not a tensor.*" + FIX):
        S.lambda_lr(0.1, fn)
    with pytest.raises(TypeError, match=r"the learning-rate function <function .*" + FIX):
        fnmlp.adam(fn)


def test_a_function_of_torch_ops_or_a_constant_number_is_taken():
    for fn in (lambda step: 1.0, lambda step: 2, lambda step: torch.exp(-0.01 * step),
               lambda step: 0.5 ** torch.floor(step / 10), lambda step: step / 100,
               lambda step: torch.clamp((step + 1) / 10, max=1.0)):
        schedule = S.lambda_lr(0.1, fn)
        assert schedule(3).dim() == 0
    assert S.lambda_lr(0.1, lambda step: step / 100)(0).item() == 0.0  # warm-up from 0


@pytest.mark.parametrize("fn, step", [
    (lambda step: -1.0, 0), (lambda step: 1 - step / 500, 1000),
    (lambda step: torch.tensor(-0.5, dtype=step.dtype), 0),
    (lambda step: torch.full((), math.nan, dtype=step.dtype), 0),
])
def test_a_function_giving_a_negative_rate_is_refused_when_made(fn, step):
    with pytest.raises(ValueError, match=rf"lr must be finite and >= 0, but the learning-rate "
                                         rf"function .* gives .* at step {step}$"):
        S.lambda_lr(0.1, fn)


def test_a_function_failing_at_step_1000_is_named():
    with pytest.raises(TypeError, match=r"failed at step 1000 \(IndexError"):
        S.lambda_lr(0.1, lambda step: [1.0, 0.5, 0.25][int(step // 10) if step else 0])


def test_a_schedule_factory_passed_uncalled_fails_when_the_optimizer_is_made():
    with pytest.raises(TypeError, match=r"failed at step 0 \(TypeError: cosine\(\) missing"):
        fnmlp.adam(S.cosine)


# --- values ---------------------------------------------------------------------------------


def test_warmup_into_a_schedule_by_formula():
    base, warmup, total, eta_min, start = 0.1, 10, 50, 1e-3, 0.2
    schedule = S.linear_warmup(S.cosine(base, total, eta_min), warmup, start_factor=start)
    expected = [base * (start + (1 - start) * t / warmup) if t < warmup else
                eta_min + (base - eta_min) * (1 + math.cos(math.pi * (t - warmup) / total)) / 2
                for t in range(80)]
    assert _rates(schedule, 80) == pytest.approx(expected, rel=1e-14)
    assert schedule == S.sequence([S.LinearWarmup(base, warmup, start), S.cosine(base, total,
                                                                                eta_min)],
                                  [warmup])
    assert S.linear_warmup(0.1, 5) == S.LinearWarmup(0.1, 5)  # a rate: as before


def test_a_sequence_by_formula():
    schedule = COMPOSITIONS["sequence"]
    expected = [0.1 if t < 3 else 0.05 * 0.9 ** (t - 3) if t < 8 else
                0.01 + 0.19 * (1 + math.cos(math.pi * (t - 8) / 10)) / 2 if t < 20 else
                0.3 * 0.7 ** ((t - 20) // 3) for t in range(40)]
    assert _rates(schedule, 40) == pytest.approx(expected, rel=1e-14)
    steps = torch.arange(40, dtype=F64)  # a tensor of steps at once: the same rates
    assert schedule(steps).tolist() == pytest.approx(expected, rel=1e-14)


def test_a_function_of_the_step_by_formula():
    assert _rates(COMPOSITIONS["lambda"], 20) == pytest.approx(
        [0.1 / (1 + 0.1 * t) for t in range(20)], rel=1e-15)
    seen = []
    S.lambda_lr(1.0, lambda step: seen.append(step) or 1.0)(3)
    assert seen[0].dtype == F64 and seen[0].dim() == 0  # a floating 0-d step


def test_nested_sequences_are_spliced_flat():
    warm, cos, const = S.LinearWarmup(0.1, 5), S.cosine(0.1, 30), S.constant(0.01)
    nested = S.sequence([S.linear_warmup(cos, 5), const], [25])
    assert nested == S.sequence([warm, cos, const], [5, 25])
    # a nested part starting after its part's end never runs, and is dropped
    assert S.sequence([S.sequence([warm, cos], [10]), const], [4]) == S.sequence(
        [warm, const], [4])
    assert S.linear_warmup(S.sequence([cos, const], [20]), 5) == S.sequence(
        [warm, cos, const], [5, 25])


def test_an_optimizer_takes_a_function_of_the_step_as_its_rate():
    def rate(step):
        return 1e-3 * 0.99 ** step

    optimizer = fnmlp.adam(rate)
    assert optimizer == fnmlp.adam(S.lambda_lr(1.0, rate))
    assert isinstance(optimizer.schedule, S.Lambda) and optimizer.base_lr == 1.0
    params = (torch.zeros(3, dtype=F64),)
    state = optimizer.init(params)
    for step in range(5):
        assert optimizer.learning_rate(state).item() == pytest.approx(1e-3 * 0.99 ** step,
                                                                      rel=1e-15)
        params, state = optimizer.update(params, (torch.ones(3, dtype=F64),), state)


@pytest.mark.parametrize("name", ["warmup-exponential", "warmup-step-decay", "lambda",
                                  "lambda-in-sequence", "warmup-in-sequence"])
def test_every_part_scales_with_the_states_base_rate(name):
    """with_learning_rate (a reduce-on-plateau's lever) scales the rate at every step by the
    same factor, in every part, whatever each part's own base."""
    optimizer = fnmlp.sgd(COMPOSITIONS[name])
    state = optimizer.init((torch.zeros(2, dtype=F64),))
    scaled = optimizer.with_learning_rate(state, 0.3 * optimizer.base_lr)
    for step in range(60):
        at = dataclasses.replace(state, step=torch.tensor(step))
        at_scaled = dataclasses.replace(scaled, step=torch.tensor(step))
        assert optimizer.learning_rate(at_scaled).item() == pytest.approx(
            0.3 * optimizer.learning_rate(at).item(), rel=1e-14)


def test_parts_with_different_bases_scale_by_the_same_factor():
    schedule = S.sequence([S.constant(0.1), S.exponential(0.05, 0.9), S.step_decay(0.3, 3)],
                          [3, 8])
    base = torch.tensor(0.1 * 2.5, dtype=F64)
    for step in range(15):
        assert schedule.rate(base, torch.tensor(float(step), dtype=F64)).item() == \
            pytest.approx(2.5 * schedule(step).item(), rel=1e-15)


# --- checkpoints ----------------------------------------------------------------------------


SAVABLE = [
    fnmlp.adam(S.linear_warmup(S.cosine(1e-3, 1000, eta_min=1e-5), 100)),
    fnmlp.sgd(COMPOSITIONS["sequence"], momentum=0.9),
    fnmlp.clip_by_global_norm(fnmlp.adamw(COMPOSITIONS["warmup-in-sequence"]), 1.0),
]


@pytest.mark.parametrize("optimizer", SAVABLE, ids=range(len(SAVABLE)))
def test_composed_schedules_round_trip_through_specs(optimizer):
    again = decode_spec(json.loads(json.dumps(encode_spec(optimizer))))
    assert again == optimizer and again.schedule == optimizer.schedule


def test_a_checkpoint_carries_a_composed_schedule_and_its_state(tmp_path):
    model = fnmlp.MLP(3, [fnmlp.Dense(4, "tanh"), fnmlp.Dense(2)])
    params = model.init(torch.Generator().manual_seed(0), dtype=F64)
    optimizer = SAVABLE[0]
    opt_state = optimizer.with_learning_rate(optimizer.init(params), 5e-4)
    fnmlp.save(tmp_path / "run.fnmlp", model, params, opt_state=opt_state, optimizer=optimizer)
    loaded = fnmlp.load(tmp_path / "run.fnmlp")
    assert loaded.optimizer == optimizer
    assert loaded.optimizer.learning_rate(loaded.opt_state) == optimizer.learning_rate(opt_state)


def test_a_schedule_made_from_a_function_cannot_be_saved(tmp_path):
    message = "a schedule made from a Python function cannot be saved; Lambda.fn holds"
    for optimizer in (fnmlp.adam(lambda step: 1e-3 * 0.99 ** step),
                      fnmlp.sgd(COMPOSITIONS["lambda-in-sequence"])):
        with pytest.raises(TypeError, match=message):
            encode_spec(optimizer)
    model = fnmlp.MLP(3, [fnmlp.Dense(2)])
    params = model.init(dtype=F64)
    x, y = torch.zeros(8, 3, dtype=F64), torch.zeros(8, 2, dtype=F64)
    epochs = []
    with pytest.raises(TypeError, match=message):
        fnmlp.fit(model, params, x, y, epochs=2, batch_size=4, optimizer=optimizer,
                  compile=False, checkpoint=tmp_path / "run.fnmlp",
                  on_epoch_end=lambda epoch, logs: epochs.append(epoch))
    assert not epochs and not list(tmp_path.iterdir())  # refused before any work
    result = fnmlp.fit(model, params, x, y, epochs=2, batch_size=4, optimizer=optimizer,
                       compile=False)  # without a checkpoint it trains
    assert int(result.opt_state.step) == 4


# --- torch twins ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_rates_match_the_torch_scheduler_step_by_step(name):
    """The twin (SequentialLR, LambdaLR) gives the same rate at each of 120 steps; torch's
    chained schedulers recompute cosine and exponential rates recursively from the last one
    (fnmlp in closed form), which agrees to ~1e-15 here, and converts back to the same
    schedule."""
    schedule = COMPOSITIONS[name]
    optimizer = fnmlp.sgd(schedule)
    twin = optimizer_to_torch(optimizer, [nn.Parameter(torch.zeros(2, dtype=F64))])
    expected = {"lambda": torch.optim.lr_scheduler.LambdaLR}.get(
        name, torch.optim.lr_scheduler.SequentialLR)
    assert type(twin.scheduler) is expected
    theirs = []
    for _ in range(120):
        theirs.append(twin.scheduler.get_last_lr()[0])
        twin.optimizer.step()
        twin.scheduler.step()
    ours = schedule(torch.arange(120, dtype=F64))
    assert relative(ours, torch.tensor(theirs, dtype=F64)) <= 1e-12
    assert optimizer_from_torch(twin.optimizer, twin.scheduler) == optimizer


def test_a_torch_lambda_lr_converts_to_a_function_schedule():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)
    converted = optimizer_from_torch(optimizer, scheduler)
    assert isinstance(converted.schedule, S.Lambda) and converted.base_lr == 0.1
    assert _rates(converted.schedule, 5) == pytest.approx([0.1 * 0.5 ** t for t in range(5)])


def test_a_part_without_a_twin_is_named(registry):
    @fnmlp.register
    @dataclasses.dataclass(frozen=True)
    class Halving(S.Schedule):
        def factor(self, step):
            return 0.5 ** step

    optimizer = fnmlp.sgd(S.sequence([S.constant(0.1), Halving(0.1)], [3]))
    with pytest.raises(TypeError, match="Halving has no torch scheduler registered"):
        optimizer_to_torch(optimizer, [nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("optimizer", [
    fnmlp.sgd(COMPOSITIONS["warmup-cosine"], momentum=0.9),
    fnmlp.adam(COMPOSITIONS["sequence"]),
    fnmlp.adamw(lambda step: 1e-2 * 0.9 ** step, weight_decay=0.1),
], ids=["sgd-warmup-cosine", "adam-sequence", "adamw-function"])
def test_fit_trains_like_the_twin_with_its_scheduler(optimizer):
    model = fnmlp.MLP(3, [fnmlp.Dense(5, "tanh"), fnmlp.Dense(2)])
    g = torch.Generator().manual_seed(1)
    params = model.init(g, dtype=F64)
    x, y = torch.randn(24, 3, generator=g, dtype=F64), torch.randn(24, 2, generator=g, dtype=F64)
    twin = fnmlp.TorchTwin(model, params, optimizer=optimizer)
    result = fnmlp.fit(model, params, x, y, epochs=8, batch_size=8, optimizer=optimizer,
                       shuffle=False, compile=False)
    for _ in range(8):
        for start in range(0, 24, 8):
            twin.step(x[start:start + 8], y[start:start + 8])
    assert int(result.opt_state.step) == 24
    assert max(relative(a, b) for a, b in zip(leaves(result.params),
                                              leaves(twin.params()))) <= 1e-12


# --- compiled ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_function_schedule_compiles_once_and_never_recompiles():
    model = fnmlp.MLP(3, [fnmlp.Dense(4, "tanh"), fnmlp.Dense(2)])
    g = torch.Generator().manual_seed(0)
    params = model.init(g, dtype=F64)
    x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64)
    optimizer = fnmlp.adam(S.linear_warmup(S.lambda_lr(1e-2, lambda step: 0.8 ** step), 3))
    compiled = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=True)
    eager = fnmlp.train_step(model, fnmlp.mse, optimizer, compile=False)
    state = optimizer.init(params)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(8):  # through the warm-up and the function: the rate changes each step
            new_c, _, loss_c = compiled(params, state, x, y)
            params, state, loss_e = eager(params, state, x, y)
            assert max(relative(a, b) for a, b in zip(leaves(new_c) + [loss_c],
                                                      leaves(params) + [loss_e])) <= 1e-13
    assert compiled.executor.graphs.count() == 1


# --- the short module name ------------------------------------------------------------------


def test_fnmlp_schedules_imports_as_a_module_and_is_fnmlp_optim_schedules():
    import importlib

    import fnmlp.optim.schedules as full
    from fnmlp.schedules import cosine, lambda_lr, linear_warmup, sequence

    assert (cosine, linear_warmup, sequence, lambda_lr) == (
        full.cosine, full.linear_warmup, full.sequence, full.lambda_lr)
    assert importlib.import_module("fnmlp.schedules") is full
    assert fnmlp.schedules is full  # the attribute stays the one module
    namespace: dict = {}
    exec("from fnmlp.schedules import *", namespace)
    public = {name for name, value in vars(full).items() if not name.startswith("_")
              and getattr(value, "__module__", None) == full.__name__}
    assert public <= set(namespace) and set(full.__all__) <= set(namespace)
