"""Optimisers against hand-computed steps, on tiny convex problems, and their schedules and state."""

from __future__ import annotations

import math
import re

import numpy
import pytest

from cnn_backend import SGD, Adam, CosineSchedule, OneCycleSchedule, StepSchedule, get_backend
from cnn_backend.layers import Parameter
from cnn_backend.optim import ConstantSchedule, make_optimizer

CPU64 = get_backend("cpu", "float64")


def param(values, grad):
    p = Parameter(numpy.array(values, dtype=numpy.float64))
    p.grad = numpy.array(grad, dtype=numpy.float64)
    return p


def test_plain_sgd_step():
    p = param([1.0, -2.0], [0.5, 1.0])
    SGD([p], lr=0.1, backend=CPU64).step()
    numpy.testing.assert_allclose(p.data, [0.95, -2.1])


def test_sgd_momentum_and_weight_decay_match_hand_computed_steps():
    p = param([1.0], [0.0])
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, backend=CPU64)
    w, v = 1.0, 0.0
    for grad in (0.5, -0.2, 0.3):
        p.grad = numpy.array([grad])
        opt.step()
        v = 0.9 * v + (grad + 0.01 * w)
        w = w - 0.1 * v
        assert p.data[0] == pytest.approx(w, rel=1e-14)


def test_nesterov_step():
    p = param([1.0], [0.4])
    opt = SGD([p], lr=0.5, momentum=0.5, nesterov=True, backend=CPU64)
    opt.step()  # v = 0.4; update = g + m v = 0.6
    assert p.data[0] == pytest.approx(1.0 - 0.5 * 0.6)


def test_adam_matches_its_closed_form_first_steps():
    p = param([0.0, 0.0], [0.0, 0.0])
    opt = Adam([p], lr=0.01, backend=CPU64)
    grads = [numpy.array([1.0, -3.0]), numpy.array([0.5, 2.0])]
    m = numpy.zeros(2)
    v = numpy.zeros(2)
    w = numpy.zeros(2)
    for t, g in enumerate(grads, start=1):
        p.grad = g
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - 0.01 * (m / (1 - 0.9**t)) / (numpy.sqrt(v / (1 - 0.999**t)) + 1e-8)
        numpy.testing.assert_allclose(p.data, w, rtol=1e-12)
        if t == 1:  # the first step moves every coordinate by about lr, whatever the gradient's scale
            numpy.testing.assert_allclose(p.data, [-0.01, 0.01], rtol=1e-6)


def test_adamw_decay_is_decoupled():
    p = param([2.0], [0.0])
    Adam([p], lr=0.1, weight_decay=0.5, backend=CPU64).step()
    assert p.data[0] == pytest.approx(2.0 - 0.1 * 0.5 * 2.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SGD(ps, lr=0.1, backend=CPU64),
        lambda ps: SGD(ps, lr=0.05, momentum=0.9, backend=CPU64),
        lambda ps: Adam(ps, lr=0.1, backend=CPU64),
    ],
)
def test_optimisers_minimise_a_quadratic(make):
    # f(w) = 0.5 * (w - target)^T A (w - target), A positive definite.
    target = numpy.array([1.0, -2.0, 0.5])
    a = numpy.diag([1.0, 3.0, 0.5])
    p = Parameter(numpy.zeros(3))
    opt = make([p])
    for _ in range(500):
        p.grad = a @ (p.data - target)
        opt.step()
    numpy.testing.assert_allclose(p.data, target, atol=1e-3)


def test_float32_parameters_stay_float32():
    p = Parameter(numpy.ones(3, dtype=numpy.float32))
    p.grad = numpy.ones(3, dtype=numpy.float32)
    for opt in (SGD([p], 0.1, momentum=0.9, weight_decay=1e-4, backend=get_backend("cpu")), Adam([p], backend=get_backend("cpu"), weight_decay=1e-4)):
        opt.step()
        assert p.data.dtype == numpy.float32
        assert all(buf.dtype == numpy.float32 for bufs in opt.buffers.values() for buf in bufs)


@pytest.mark.parametrize("make", [lambda ps, b: Adam(ps, lr=0.01, backend=b), lambda ps, b: SGD(ps, 0.1, momentum=0.9, backend=b)])
def test_state_follows_a_model_moved_to_float64_after_the_optimiser_was_built(make):
    """``model.to`` after the optimiser: its state is converted to float64, not kept in float32
    (nor reset), so the next step equals that of an optimiser built after the move with the same state."""
    from cnn_backend import seed_cnn

    cpu32 = get_backend("cpu")
    x = numpy.random.default_rng(0).random((4, 1, 28, 28))

    def step(model, opt):
        for p in model.parameters():
            p.grad = numpy.sin(numpy.arange(p.data.size).reshape(p.data.shape)).astype(p.data.dtype)
        opt.step()

    moved, rebuilt = seed_cnn(cpu32, seed=0), seed_cnn(cpu32, seed=0)
    moved_opt, rebuilt_opt = make(moved.parameters(), cpu32), make(rebuilt.parameters(), cpu32)
    step(moved, moved_opt), step(rebuilt, rebuilt_opt)
    state = rebuilt_opt.state_dict()
    moved.to(CPU64), rebuilt.to(CPU64)
    rebuilt_opt = make(rebuilt.parameters(), CPU64)
    rebuilt_opt.load_state_dict(state)
    step(moved, moved_opt), step(rebuilt, rebuilt_opt)

    assert all(buf.dtype == numpy.float64 for bufs in moved_opt.buffers.values() for buf in bufs)
    for a, b in zip(moved.parameters(), rebuilt.parameters()):
        numpy.testing.assert_array_equal(a.data, b.data)
    assert moved.forward(x).dtype == numpy.float64


def test_state_follows_a_model_moved_to_another_device_after_the_optimiser_was_built():
    from cnn_backend import seed_cnn
    from cnn_backend.testing import standin_backend

    device = standin_backend("float64")
    model = seed_cnn(CPU64, seed=0)
    opt = Adam(model.parameters(), lr=0.01, backend=CPU64)
    model.to(device)
    for p in model.parameters():
        p.grad = device.to_device(numpy.ones(p.data.shape))
    before = device.to_numpy(model.parameters()[0].data).copy()
    opt.step()  # a step on NumPy state arrays would mix host and device arrays and fail
    assert opt.backend is device and all(type(buf) is type(model.parameters()[0].data) for buf in opt.buffers["first_moment"])
    numpy.testing.assert_allclose(device.to_numpy(model.parameters()[0].data), before - 0.01, rtol=0, atol=1e-9)


def test_state_dict_round_trip_continues_identically():
    def run(steps, resume_at=None):
        p = param([1.0, 1.0], [0.0, 0.0])
        opt = Adam([p], lr=0.05, backend=CPU64)
        for step in range(steps):
            if step == resume_at:
                state, data = opt.state_dict(), p.data.copy()
                p = Parameter(data)
                opt = Adam([p], lr=0.05, backend=CPU64)
                opt.load_state_dict(state)
            p.grad = numpy.array([math.sin(step), math.cos(step)])
            opt.step()
        return p.data

    numpy.testing.assert_array_equal(run(6), run(6, resume_at=3))


def test_state_dict_with_wrong_shape_is_refused():
    opt = SGD([param([1.0], [0.0])], lr=0.1, momentum=0.9, backend=CPU64)
    with pytest.raises(ValueError, match=r"optimiser state 'velocity/0' is missing or has the wrong shape"):
        opt.load_state_dict({"velocity/0": numpy.zeros(2), "steps": 1})


def adam_state(**changes):
    """A one-step Adam state over one two-element parameter, with ``changes`` applied."""
    opt = Adam([param([1.0, 2.0], [0.5, -0.5])], lr=0.1, backend=CPU64)
    opt.step()
    return {**opt.state_dict(), **changes}


@pytest.mark.parametrize(
    "make, state, message",
    [
        (lambda: SGD([param([1.0, 2.0], [0.0, 0.0])], lr=0.1, backend=CPU64), adam_state(),
         r"^SGD: this optimiser state was saved by Adam \(its 'first_moment', 'second_moment' buffers\); load it into Adam"),
        (lambda: Adam([param([1.0, 2.0], [0.0, 0.0])], backend=CPU64), {"velocity/0": numpy.zeros(2), "steps": 1},
         r"^Adam: this optimiser state was saved by SGD \(its 'velocity' buffers\)"),
        (lambda: Adam([param([1.0, 2.0], [0.0, 0.0])], backend=CPU64), adam_state(steps=-5),
         r"^Adam: optimiser state 'steps' must be an integer >= 0, got -5$"),
        (lambda: Adam([param([1.0, 2.0], [0.0, 0.0])], backend=CPU64), adam_state(steps=2.5),
         r"'steps' must be an integer >= 0, got 2.5$"),
        (lambda: Adam([param([1.0, 2.0], [0.0, 0.0])], backend=CPU64), {k: v for k, v in adam_state().items() if k != "steps"},
         r"^Adam: optimiser state has no 'steps' entry"),
        (lambda: Adam([param([1.0, 2.0], [0.0, 0.0])], backend=CPU64), adam_state(**{"second_moment/0": numpy.array([1.0, numpy.inf])}),
         r"^Adam: optimiser state 'second_moment/0' holds NaN or infinite values"),
        (lambda: Adam([param([1.0, 2.0], [0.0, 0.0])], backend=CPU64), adam_state(**{"first_moment/0": [numpy.nan, 0.0]}),
         r"^Adam: optimiser state 'first_moment/0' holds NaN or infinite values"),
        (lambda: Adam([param([1.0, 2.0], [0.0, 0.0])], backend=CPU64), adam_state(**{"first_moment/0": [1.0, "a"]}),
         r"^Adam: optimiser state 'first_moment/0' must be an array of numbers, got \[1.0, 'a'\]$"),
        (lambda: Adam([param([1.0, 2.0], [0.0, 0.0])], backend=CPU64), adam_state(**{"moment/0": numpy.zeros(2)}),
         r"^Adam: optimiser state holds unknown buffers 'moment'"),
    ],
)
def test_load_state_dict_refuses_a_bad_state_in_one_line_and_changes_nothing(make, state, message):
    opt = make()
    before = {key: (value.copy() if isinstance(value, numpy.ndarray) else value) for key, value in opt.state_dict().items()}
    with pytest.raises(ValueError, match=message) as caught:
        opt.load_state_dict(state)
    assert "\n" not in str(caught.value)
    after = opt.state_dict()
    assert after.keys() == before.keys() and all(numpy.array_equal(after[key], before[key]) for key in before)


def test_load_state_dict_takes_lists_and_numpy_integers():
    """Array-likes are converted (as ``numpy.savez``/JSON round trips give them), with the same result."""
    saved = adam_state()
    as_lists = {key: (value.tolist() if isinstance(value, numpy.ndarray) else numpy.int64(value)) for key, value in saved.items()}
    opt = Adam([param([1.0, 2.0], [0.0, 0.0])], lr=0.1, backend=CPU64)
    opt.load_state_dict(as_lists)
    assert opt.steps == 1 and type(opt.steps) is int
    for key, value in opt.state_dict().items():
        numpy.testing.assert_array_equal(value, saved[key], err_msg=key)


def test_load_state_dict_ignores_a_velocity_sgd_without_momentum_does_not_keep():
    """Resuming an SGD run with momentum 0 drops the velocity: the same kind's buffer, not another kind's."""
    with_momentum = SGD([param([1.0], [1.0])], lr=0.1, momentum=0.9, backend=CPU64)
    with_momentum.step()
    plain = SGD([param([1.0], [1.0])], lr=0.1, backend=CPU64)
    plain.load_state_dict(with_momentum.state_dict())
    assert plain.steps == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SGD([], lr=0, backend=CPU64), r"SGD: learning rate must be a finite number > 0"),
        (lambda: SGD([], lr=0.1, momentum=1.0, backend=CPU64), r"SGD: momentum must be in \[0, 1\)"),
        (lambda: Adam([], betas=(0.9, 1.0), backend=CPU64), r"Adam: betas must be in \[0, 1\)"),
        (lambda: make_optimizer("rmsprop", [], CPU64), r"unknown optimizer 'rmsprop'; choose one of sgd, adam"),
    ],
)
def test_bad_hyper_parameters_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_schedules():
    assert ConstantSchedule(0.1)(1000) == 0.1
    step = StepSchedule(0.1, step_size=10, gamma=0.5)
    assert [step(s) for s in (0, 9, 10, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    cosine = CosineSchedule(1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert cosine(0) == pytest.approx(0.1)  # first warm-up step
    assert cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55)  # half way: midpoint of base and min
    assert cosine(110) == pytest.approx(0.1)
    assert cosine(500) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"CosineSchedule: need total_steps >= 1"):
        CosineSchedule(1.0, total_steps=5, warmup_steps=5)


def test_one_cycle_schedule_rises_to_the_base_rate_then_falls_to_its_floor():
    cycle = OneCycleSchedule(1.0, total_steps=101, pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    rates = [cycle(step) for step in range(101)]
    peak = round(0.3 * 101 - 1)  # 29.3: the rate peaks between steps 29 and 30
    assert rates[0] == pytest.approx(1.0 / 25)
    assert rates[-1] == pytest.approx(1.0 / 25 / 1e4)
    assert max(rates) == pytest.approx(1.0, abs=1e-3) and rates.index(max(rates)) in (peak, peak + 1)
    assert all(a < b for a, b in zip(rates[: peak + 1], rates[1 : peak + 1]))
    assert all(a > b for a, b in zip(rates[peak + 1 :], rates[peak + 2 :]))
    # half way up and half way down: the midpoints of the two cosines
    peak_at_100 = OneCycleSchedule(2.0, total_steps=202, pct_start=0.5)
    assert peak_at_100(50) == pytest.approx((2.0 / 25 + 2.0) / 2)
    peak_at_66 = OneCycleSchedule(2.0, total_steps=201, pct_start=1 / 3)  # the last step is 200
    assert peak_at_66(133) == pytest.approx((2.0 + 2.0 / 25 / 1e4) / 2)
    assert cycle(500) == pytest.approx(rates[-1])


def test_one_cycle_schedule_matches_pytorch():
    torch = pytest.importorskip("torch")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=137, cycle_momentum=False)
    expected = []
    for _ in range(137):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if len(expected) < 137:  # PyTorch refuses to step past total_steps
            reference.step()
    cycle = OneCycleSchedule(0.1, total_steps=137)
    numpy.testing.assert_allclose([cycle(step) for step in range(137)], expected, rtol=1e-12)


@pytest.mark.parametrize("make, message", [
    (lambda: OneCycleSchedule(1.0, 10, pct_start=1.0), "OneCycleSchedule: pct_start must be in (0, 1), got 1.0"),
    (lambda: OneCycleSchedule(1.0, 10, pct_start=0.0), "OneCycleSchedule: pct_start must be in (0, 1), got 0.0"),
    (lambda: OneCycleSchedule(1.0, 10, div_factor=0.0), "OneCycleSchedule: div_factor must be a finite number > 0, got 0.0"),
    (lambda: OneCycleSchedule(1.0, 10, div_factor="25"), "OneCycleSchedule: div_factor must be a finite number > 0, got '25'"),
    (lambda: OneCycleSchedule(1.0, 10, final_div_factor=float("nan")), "OneCycleSchedule: final_div_factor must be a finite number > 0, got nan"),
    (lambda: StepSchedule(0.1, 10, gamma=-2), "StepSchedule: gamma must be a finite number > 0, got -2"),
    (lambda: StepSchedule(float("nan"), 10), "StepSchedule: base_lr must be a finite number > 0, got nan"),
    (lambda: StepSchedule("abc", 10), "StepSchedule: base_lr must be a finite number > 0, got 'abc'"),
    (lambda: CosineSchedule(0.1, 100, min_lr=-0.5), "CosineSchedule: min_lr must be a finite number >= 0, got -0.5"),
    (lambda: ConstantSchedule(0), "ConstantSchedule: base_lr must be a finite number > 0, got 0"),
])
def test_schedules_refuse_bad_settings_when_made_not_mid_training(make, message):
    with pytest.raises(ValueError) as excinfo:
        make()
    assert str(excinfo.value) == message


@pytest.mark.parametrize("value", [1.5, "3", True, -1, numpy.float64(4.0)])
@pytest.mark.parametrize("make, name, low", [
    (lambda v: StepSchedule(0.1, step_size=v), "StepSchedule: step_size", 1),
    (lambda v: CosineSchedule(0.1, total_steps=v), "CosineSchedule: total_steps", 1),
    (lambda v: CosineSchedule(0.1, total_steps=20, warmup_steps=v), "CosineSchedule: warmup_steps", 0),
    (lambda v: OneCycleSchedule(0.1, total_steps=v), "OneCycleSchedule: total_steps", 2),
], ids=["step-size", "cosine-total", "cosine-warmup", "one-cycle-total"])
def test_schedules_refuse_step_counts_that_are_not_integers_in_one_line(make, name, low, value):
    # Truncating 1.5 to 1 would make StepSchedule decay every step; "3" would fail later with a raw TypeError.
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= {low}, got {re.escape(repr(value))}$"):
        make(value)


def test_schedules_refuse_step_counts_below_their_minimum_with_the_same_words():
    with pytest.raises(ValueError, match=r"^StepSchedule: step_size must be an integer >= 1, got 0$"):
        StepSchedule(0.1, step_size=0)
    with pytest.raises(ValueError, match=r"^OneCycleSchedule: total_steps must be an integer >= 2, got 1$"):
        OneCycleSchedule(0.1, total_steps=1)
    with pytest.raises(ValueError, match=r"^CosineSchedule: total_steps must be an integer >= 1, got 0$"):
        CosineSchedule(0.1, total_steps=0)


def test_schedules_keep_integer_step_counts_as_python_ints():
    assert StepSchedule(0.1, step_size=numpy.int64(3)).config()["step_size"] == 3
    assert type(StepSchedule(0.1, step_size=numpy.int64(3)).step_size) is int
    cosine = CosineSchedule(0.1, total_steps=numpy.int32(10), warmup_steps=numpy.int32(2))
    assert (type(cosine.total_steps), type(cosine.warmup_steps)) == (int, int)
    assert type(OneCycleSchedule(0.1, total_steps=numpy.int64(10)).total_steps) is int


@pytest.mark.parametrize("make", [SGD, Adam])
def test_an_optimiser_without_backend_takes_the_parameters_device(make):
    from cnn_backend import default_cnn
    from cnn_backend.testing import standin_backend

    for backend in (get_backend("cpu", "float64"), standin_backend("float32")):
        model = default_cnn(backend, seed=0)
        assert make(model.parameters(), lr=0.01).backend is backend  # the model's flat buffer knows its device
    model = default_cnn(get_backend("cpu", "float64"), seed=0)
    subset = make(model.parameters()[-2:], lr=0.01)  # host arrays outside the flat buffer: the CPU, their dtype
    assert subset.backend.name == "cpu" and subset.backend.dtype == numpy.float64
    x = numpy.random.default_rng(0).random((4, 1, 28, 28))
    model.forward(x)
    model.backward(numpy.ones((4, 10)))
    before = model.parameters()[-1].data.copy()
    subset.step()
    assert not numpy.array_equal(model.parameters()[-1].data, before)


def test_an_optimiser_without_backend_takes_the_device_of_a_subset_of_a_device_model():
    from cnn_backend import default_cnn
    from cnn_backend.testing import standin_backend

    device = standin_backend()
    model = default_cnn(device, seed=0)
    subset = model.parameters()[:2]  # device arrays outside the optimiser's flat path, each still in the model's buffer
    opt = Adam(subset, lr=0.01)
    assert opt.backend is device and opt._flat is None
    assert all(type(buf) is type(subset[0].data) for buf in opt.buffers["first_moment"])
    for p in model.parameters():
        p.grad = device.to_device(numpy.ones(p.data.shape, dtype=numpy.float32))
    before = [device.to_numpy(p.data).copy() for p in model.parameters()[:3]]
    opt.step()
    after = [device.to_numpy(p.data) for p in model.parameters()[:3]]
    numpy.testing.assert_allclose(after[0], before[0] - 0.01, rtol=0, atol=1e-6)
    numpy.testing.assert_allclose(after[1], before[1] - 0.01, rtol=0, atol=1e-6)
    numpy.testing.assert_array_equal(after[2], before[2])  # not in the subset


def test_an_optimiser_without_backend_refuses_what_it_cannot_place(standin):
    device_params = [Parameter(standin.to_device(numpy.zeros(3, dtype=numpy.float32)))]  # in no flat buffer
    with pytest.raises(ValueError, match=r"^Adam: cannot tell which device these parameters are on; pass backend=model\.backend$"):
        Adam(device_params)
    assert Adam(device_params, backend=standin).backend is standin
    with pytest.raises(ValueError, match=r"^SGD: the parameter list is empty; pass model\.parameters\(\)$"):
        SGD([], lr=0.1)


def _named_parameters():
    from cnn_backend import default_cnn

    return default_cnn(CPU64, seed=0).named_parameters()


def _model_and_layer():
    from cnn_backend import default_cnn

    model = default_cnn(CPU64, seed=0)
    return model, model[0]


EXPECTED = r"expected parameters \(model\.parameters\(\)\), got"


@pytest.mark.parametrize("make", [SGD, Adam])
@pytest.mark.parametrize(
    "given, message",
    [
        (lambda: _model_and_layer()[0], rf"{EXPECTED} a Sequential: pass model\.parameters\(\)$"),
        (_named_parameters, rf"{EXPECTED} \(name, parameter\) pairs: pass model\.parameters\(\), not named_parameters\(\)$"),
        (lambda: iter(_named_parameters()), rf"{EXPECTED} \(name, parameter\) pairs: pass model\.parameters\(\), not named_"),
        (lambda: _model_and_layer()[1], rf"{EXPECTED} a Convolution layer: pass \[param for _, param in layer\.named_parameters\(\)\]$"),
        (lambda: list(_model_and_layer()[0]), rf"{EXPECTED} a Convolution at index 0; every item must be a cnn_backend Parameter$"),
        (lambda: param([1.0], [0.0]), rf"{EXPECTED} a single Parameter: pass a list of it, \[param\]$"),
        (lambda: {"w": param([1.0], [0.0])}, rf"{EXPECTED} a dict: pass a list of its parameters, list\(params\.values\(\)\)$"),
        (lambda: 0.1, rf"{EXPECTED} 0\.1$"),
        (lambda: None, rf"{EXPECTED} None$"),
        (lambda: [Parameter([1.0, 2.0])], r"parameter 0 holds a list, not an array; make it Parameter\(array\)$"),
    ],
    ids=["model", "named", "named-iterator", "layer", "layers", "one-parameter", "dict", "number", "none", "list-data"],
)
def test_anything_but_a_list_of_parameters_is_refused_in_one_line_naming_what_was_given(make, given, message):
    with pytest.raises(TypeError, match=rf"^{make.__name__}: {message}") as caught:
        make(given(), lr=0.1)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("make", [SGD, Adam])
@pytest.mark.parametrize("dtype", ["float16", "int32", "int64"])
@pytest.mark.parametrize("backend", [None, CPU64], ids=["inferred", "given"])
def test_parameters_of_a_dtype_no_update_suits_are_refused_naming_the_optimiser(make, dtype, backend):
    p = Parameter(numpy.zeros(3, dtype=dtype))
    with pytest.raises(ValueError, match=rf"^{make.__name__}: parameters of dtype {dtype} cannot be updated; use float32 or float64$"):
        make([p], lr=0.1, backend=backend)


def test_a_generator_of_parameters_is_taken():
    p = param([1.0, -2.0], [0.5, 1.0])
    opt = SGD((q for q in [p]), lr=0.1)
    opt.step()
    numpy.testing.assert_allclose(p.data, [0.95, -2.1])


def test_zero_grad_clears_the_gradients_as_pytorchs_does():
    from cnn_backend.model import seed_cnn

    model = seed_cnn("cpu")
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.forward(numpy.random.default_rng(0).random((2, 1, 28, 28), dtype=numpy.float32))
    model.backward(numpy.ones((2, 10), dtype=numpy.float32))
    assert all(numpy.abs(p.grad).sum() > 0 for p in model.parameters())
    optimizer.zero_grad()
    assert all(not p.grad.any() for p in model.parameters())
    before = [p.data.copy() for p in model.parameters()]
    optimizer.step()  # a zero gradient and no velocity yet: no update
    assert all(numpy.array_equal(p.data, old) for p, old in zip(model.parameters(), before))


def test_nesterov_takes_numpys_booleans_as_python_ones():
    from cnn_backend.model import seed_cnn

    assert SGD(seed_cnn("cpu").parameters(), lr=0.1, momentum=0.9, nesterov=numpy.True_).nesterov is True
