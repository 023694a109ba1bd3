"""Misuse of the optimisers, Dropout and the loss gets one clear line, and a saved optimiser state stays saved."""

from __future__ import annotations

import re
import warnings

import numpy
import pytest

from cnn_backend import SGD, Adam, Sequential, get_backend
from cnn_backend.layers import Dropout, Flatten, FullyConnected, ReLU, ShapeError, SoftmaxCrossEntropy
from cnn_backend.model import plain_cnn

from layer_helpers import Block

CPU64 = get_backend("cpu", "float64")


def test_a_saved_optimiser_state_does_not_change_with_the_next_step_and_rolls_back():
    model = plain_cnn(CPU64, seed=0)
    rng = numpy.random.default_rng(0)
    x, labels = rng.random((4, 1, 28, 28)), numpy.array([0, 3, 7, 9])
    loss_fn = SoftmaxCrossEntropy(CPU64)
    optimizer = Adam(model.parameters(), lr=1e-3, backend=CPU64)

    def step():
        loss_fn(model(x), labels)
        model.backward(loss_fn.backward())
        optimizer.step()
        return model.state_dict()

    step()
    saved, saved_params = optimizer.state_dict(), model.state_dict()
    snapshot = {key: numpy.array(value, copy=True) for key, value in saved.items()}
    after_second = step()
    for key, value in snapshot.items():
        numpy.testing.assert_array_equal(saved[key], value, err_msg=key)
    assert saved["steps"] == 1

    model.load_state_dict(saved_params)
    optimizer.load_state_dict(saved)
    replayed = step()
    for name, value in after_second.items():
        numpy.testing.assert_array_equal(replayed[name], value, err_msg=name)


def _params():
    return plain_cnn(CPU64, seed=0).parameters()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: Adam(p, eps=-1, backend=CPU64), "Adam: eps must be a finite number >= 0, got -1"),
        (lambda p: Adam(p, eps=float("nan"), backend=CPU64), "Adam: eps must be a finite number >= 0, got nan"),
        (lambda p: Adam(p, weight_decay=-1, backend=CPU64), "Adam: weight_decay must be a finite number >= 0, got -1"),
        (lambda p: Adam(p, betas=(-0.1, 0.999), backend=CPU64), "Adam: betas must be in [0, 1), got (-0.1, 0.999)"),
        (lambda p: Adam(p, betas=(0.9, 1.0), backend=CPU64), "Adam: betas must be in [0, 1), got (0.9, 1.0)"),
        (lambda p: Adam(p, betas=0.9, backend=CPU64), "Adam: betas must be a pair of numbers in [0, 1), got 0.9"),
        (lambda p: Adam(p, betas=(0.9,), backend=CPU64), "Adam: betas must be a pair of numbers in [0, 1), got (0.9,)"),
        (lambda p: Adam(p, betas=("0.9", 0.999), backend=CPU64), "Adam: betas must be a pair of numbers in [0, 1), got ('0.9', 0.999)"),
        (lambda p: Adam(p, lr="1e-3", backend=CPU64), "Adam: learning rate must be a finite number > 0, got '1e-3'"),
        (lambda p: SGD(p, lr="0.1", backend=CPU64), "SGD: learning rate must be a finite number > 0, got '0.1'"),
        (lambda p: SGD(p, lr=None, backend=CPU64), "SGD: learning rate must be a finite number > 0, got None"),
        (lambda p: SGD(p, lr=True, backend=CPU64), "SGD: learning rate must be a finite number > 0, got True"),
        (lambda p: SGD(p, lr=-0.1, backend=CPU64), "SGD: learning rate must be a finite number > 0, got -0.1"),
        (lambda p: SGD(p, nesterov=True, backend=CPU64), "SGD: nesterov=True needs a momentum > 0, got momentum=0.0"),
        (lambda p: SGD(p, momentum=-0.5, backend=CPU64), "SGD: momentum must be in [0, 1), got -0.5"),
        (lambda p: SGD(p, momentum="0.9", backend=CPU64), "SGD: momentum must be a number in [0, 1), got '0.9'"),
        (lambda p: SGD(p, weight_decay=float("nan"), backend=CPU64), "SGD: weight_decay must be a finite number >= 0, got nan"),
        (lambda p: SGD(p, lr=float("inf"), backend=CPU64), "SGD: learning rate must be a finite number > 0, got inf"),
        (lambda p: Adam(p, eps=float("inf"), backend=CPU64), "Adam: eps must be a finite number >= 0, got inf"),
        (lambda p: SGD(p, momentum=0.9, nesterov="no", backend=CPU64), "SGD: nesterov must be true or false, got 'no'"),
    ],
)
def test_bad_optimiser_hyper_parameters_are_one_line_naming_them(make, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make(_params())


def test_the_hyper_parameters_pytorch_accepts_are_accepted():
    params = _params()
    assert Adam(params, eps=0, betas=[0.0, numpy.float32(0.5)], backend=CPU64).config()["betas"] == [0.0, 0.5]
    assert SGD(params, lr=numpy.float32(0.5), momentum=0.9, nesterov=True, backend=CPU64).lr == 0.5


@pytest.mark.parametrize("rate", ["0.5", None, True])
def test_a_dropout_rate_that_is_not_a_number_is_one_line(rate):
    with pytest.raises(ValueError, match=f"^{re.escape(f'Dropout: rate must be a number in [0, 1), got {rate!r}')}$"):
        Dropout(rate)
    assert Dropout(numpy.float32(0.25)).rate == 0.25


def test_the_loss_of_an_empty_batch_is_refused_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ShapeError, match=re.escape("SoftmaxCrossEntropy: expected a batch of at least one sample, got logits of shape (0, 10)")):
            SoftmaxCrossEntropy("cpu")(numpy.zeros((0, 10), numpy.float32), numpy.zeros(0, int))


def test_loss_backward_before_forward_says_so():
    with pytest.raises(RuntimeError, match=r"^SoftmaxCrossEntropy: backward needs a forward pass first"):
        SoftmaxCrossEntropy("cpu").backward()


def test_the_documented_input_gradient_and_gradient_overwrite():
    """docs/layers.md: backward replaces ``.grad``; the first layer's dx only when asked for, and then
    it is the loss's gradient (checked against a central difference)."""
    model = plain_cnn(CPU64, seed=0)
    rng = numpy.random.default_rng(1)
    x, labels = rng.random((2, 1, 28, 28)), numpy.array([2, 5])
    loss_fn = SoftmaxCrossEntropy(CPU64)
    loss_fn(model(x), labels)
    assert model.backward(loss_fn.backward()) is None
    first = model.flat_grad.copy()
    loss_fn(model(x), labels)
    model.backward(loss_fn.backward())
    numpy.testing.assert_array_equal(model.flat_grad, first)  # the same gradient, not twice it

    model.layers[0].needs_input_grad = True
    loss_fn(model(x), labels)
    dx = model.backward(loss_fn.backward())
    assert dx.shape == x.shape
    pixel, h = (1, 0, 14, 9), 1e-6
    shifted = [x.copy(), x.copy()]
    shifted[0][pixel] += h
    shifted[1][pixel] -= h
    up, down = (float(loss_fn(model(s), labels)) for s in shifted)
    assert dx[pixel] == pytest.approx((up - down) / (2 * h), rel=1e-5)


# -- what a PyTorch or Keras user writes by habit -----------------------------------------------------


def test_sizes_given_positionally_as_keras_writes_them_say_which_argument_they_set():
    from cnn_backend.layers import Convolution, FullyConnected

    with pytest.raises(ValueError, match=r"^FullyConnected: out_features is missing; FullyConnected\(10\) sets in_features=10 "
                                         r"\(the input size comes first\): write FullyConnected\(out_features=10\)"):
        FullyConnected(10)
    with pytest.raises(ValueError, match=r"^Convolution: kernel_size is missing; Convolution\(8, 3\) sets in_channels=8, out_channels=3 "
                                         r".*write Convolution\(out_channels=8, kernel_size=3\)"):
        Convolution(8, 3, padding=1)
    assert FullyConnected(4, 3).out_features == 3 and Convolution(1, 8, 3).kernel_size == 3  # full positional calls stay


def test_a_learning_rate_set_between_steps_is_checked_at_the_step():
    from cnn_backend import SGD, Adam, seed_cnn

    for make in (SGD, Adam):
        model = seed_cnn()
        optimizer = make(model.parameters(), lr=0.01)
        model.forward(numpy.zeros((2, 1, 28, 28), numpy.float32))
        model.backward(numpy.ones((2, 10), numpy.float32))
        before = [p.data.copy() for p in model.parameters()]
        for bad in (-0.1, float("nan"), float("inf")):
            optimizer.lr = bad  # as a schedule or the user's code sets it
            with pytest.raises(ValueError, match=rf"^{make.__name__}: the learning rate must be a finite number >= 0, got {bad!r}"):
                optimizer.step()
        assert all(numpy.array_equal(p.data, b) for p, b in zip(model.parameters(), before))  # nothing updated


def test_prepare_images_takes_uint8_pixels_only():
    from cnn_backend.data import prepare_images

    pixels = numpy.full((2, 4, 4), 255, numpy.uint8)
    assert prepare_images(pixels).max() == 1.0
    with pytest.raises(ValueError, match=r"^prepare_images takes uint8 images \(0-255\), got float64: images already scaled"):
        prepare_images(pixels / 255.0)
    with pytest.raises(ValueError, match=r"^dtype must be one of float32, float64, got 'int32'"):
        prepare_images(pixels, dtype="int32")
    with pytest.raises(ValueError, match=r"^prepare_images takes images of shape \(N, H, W\) or \(N, C, H, W\), got \(4, 4\)"):
        prepare_images(pixels[0])


def test_load_state_dict_refuses_non_finite_weights_and_changes_nothing():
    from cnn_backend import seed_cnn

    model = seed_cnn()
    state = model.state_dict()
    before = {name: value.copy() for name, value in state.items()}
    state["0.weight"] = state["0.weight"].copy()
    state["0.weight"][0, 0, 0, 0] = numpy.nan
    with pytest.raises(ValueError, match=r"^parameter 0\.weight holds NaN or infinite values, so the model's outputs would too"):
        model.load_state_dict(state)
    assert all(numpy.array_equal(model.state_dict()[name], value) for name, value in before.items())
    state["0.weight"] = before["0.weight"].astype(numpy.float64)
    state["0.weight"][0, 0, 0, 1] = 1e300  # finite in float64, infinite once cast to the model's float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no overflow warning on the way
        with pytest.raises(ValueError, match=r"^parameter 0\.weight holds values too large for float32: load it into a float64 model \(dtype='float64'\)$"):
            model.load_state_dict(state)
    assert all(numpy.array_equal(model.state_dict()[name], value) for name, value in before.items())


def test_load_state_dict_without_the_buffers_says_to_pass_them_and_an_unfinished_layer_names_what_it_lacks():
    from cnn_backend import default_cnn
    from cnn_backend.layers import Layer
    from cnn_backend.serialization import ModelFileError

    model = default_cnn()
    with pytest.raises(ModelFileError, match=r"^the model has buffers \(.*, \.\.\.\) and none were given: pass model\.buffer_state_dict\(\) as the second argument"):
        model.load_state_dict(default_cnn(seed=1).state_dict())
    model.load_state_dict(default_cnn(seed=1).state_dict(), default_cnn(seed=1).buffer_state_dict())

    class Unfinished(Layer):
        pass

    with pytest.raises(NotImplementedError, match=r"^Unfinished defines no forward\(x\): a layer implements forward and backward$"):
        Unfinished().forward(numpy.zeros(2))


def test_predicting_a_number_or_one_unbatched_sample_says_what_to_pass():
    from cnn_backend import seed_cnn
    from cnn_backend.layers import ShapeError

    model = seed_cnn()
    with pytest.raises(ShapeError, match=r"^Sequential\.predict_logits: expected a batch of samples, got a single number \(float32\)$"):
        model.predict(numpy.float32(1.0))
    image = numpy.zeros((1, 28, 28), numpy.float32)
    with pytest.raises(ShapeError, match=r"this batch's are \(28, 28\); for a single sample, pass x\[None\] \(a batch of one\)$"):
        model.predict(image)
    assert model.predict(image[None]).shape == (1,)


def test_one_layer_object_in_two_places_is_refused_naming_both():
    from cnn_backend import Sequential
    from cnn_backend.layers import Flatten, FullyConnected, ReLU

    dense = FullyConnected(4, 4)
    with pytest.raises(ValueError, match=r"^Sequential: layer 3 \(FullyConnected\) is the same layer object as layer 1 \(FullyConnected\); a layer takes one place"):
        Sequential([Flatten(), dense, ReLU(), dense], input_shape=(1, 2, 2))


def test_one_layer_object_in_two_places_inside_containers_is_refused_naming_both():
    from cnn_backend import Sequential
    from cnn_backend.layers import Convolution, FullyConnected, GlobalAvgPool, ReLU, Residual, Tanh

    def conv():
        return Convolution(out_channels=2, kernel_size=3, padding=1)

    tail = [GlobalAvgPool(), FullyConnected(out_features=3)]
    shared = conv()
    looped = Block([ReLU()])
    looped.layers.append(looped)
    cases = [
        ([conv(), Block([shared, Tanh(), shared])], r"layer 1 \(Block\) > layer 2 \(Convolution\) is the same layer object as layer 1 \(Block\) > layer 0 \(Convolution\)"),
        ([shared, Block([shared])], r"layer 1 \(Block\) > layer 0 \(Convolution\) is the same layer object as layer 0 \(Convolution\)"),
        ([shared, Residual([Tanh(), shared])], r"layer 1 \(Residual\) > layer 1 \(Convolution\) is the same layer object as layer 0 \(Convolution\)"),
        ([Block([Residual([shared]), Block([shared])])],
         r"layer 0 \(Block\) > layer 1 \(Block\) > layer 0 \(Convolution\) is the same layer object as layer 0 \(Block\) > layer 0 \(Residual\) > layer 0 \(Convolution\)"),
        ([looped], r"layer 0 \(Block\) > layer 1 \(Block\) is the same layer object as layer 0 \(Block\)"),  # a block inside itself
    ]
    for layers, places in cases:
        with pytest.raises(ValueError, match=rf"^Sequential: {places}; a layer takes one place in a network: make another \(weights are not shared\)$"):
            Sequential(layers + tail, input_shape=(2, 6, 6))


def test_children_that_are_not_layers_are_refused_in_one_line():
    from cnn_backend import Sequential
    from cnn_backend.layers import Layer

    class Listing(Layer):
        def children(self):
            return [("layers.0", "Convolution")]

    with pytest.raises(ValueError, match=r"^layer 0 \(Listing\): children\(\) gives a str as 'layers.0', not a layer; children\(\) lists \(name, layer\) pairs"):
        Sequential([Listing()])


def test_children_that_are_not_name_layer_pairs_are_refused_in_one_line():
    from cnn_backend import Sequential
    from cnn_backend.gradcheck import check_layer_gradients
    from cnn_backend.layers import ReLU, Tanh

    class Bare(Block):  # the layers themselves, without their names
        def children(self):
            return list(self.layers)

    pairs = r"children\(\) lists \(name, layer\) pairs of the layers inside$"
    # A traceback before ("cannot unpack non-iterable ReLU object"), from Sequential and from the gradient check alike.
    with pytest.raises(ValueError, match=rf"^layer 1 \(Block\) > layer 0 \(Bare\): children\(\) gives ReLU\(\), not a \(name, layer\) pair; {pairs}"):
        Sequential([Tanh(), Block([Bare([ReLU()])])])
    with pytest.raises(ValueError, match=rf"^Bare: children\(\) gives ReLU\(\), not a \(name, layer\) pair; {pairs}"):
        check_layer_gradients(Bare([ReLU()]), input_shape=(3,))


@pytest.mark.parametrize("make, message", [
    (lambda: Flatten(1), "Flatten: backend must be a device name (cpu, cuda, auto) or a Backend, got 1; Flatten takes no other arguments"),
    (lambda: ReLU(True), "ReLU: backend must be a device name (cpu, cuda, auto) or a Backend, got True; ReLU takes no other arguments"),
])
def test_a_pytorch_style_positional_argument_to_a_layer_without_options_is_named(make, message):
    with pytest.raises(TypeError) as excinfo:
        make()
    assert str(excinfo.value) == message


def test_text_given_as_input_is_called_text_not_a_single_number():
    from cnn_backend import seed_cnn

    model = seed_cnn("cpu")
    for call, who in ((model.predict, "Sequential.predict_logits"), (model.forward, "Sequential")):
        with pytest.raises(ValueError) as excinfo:
            call("abc")
        assert str(excinfo.value) == f"{who}: expected real numbers, got an array of dtype <U3; pass the images as numbers"


@pytest.mark.parametrize("make", [
    lambda: Dropout("0.5"),
    lambda: SGD(Sequential([FullyConnected(4, 3, rng=0)]).parameters(), lr="0.1"),
    lambda: FullyConnected(out_features="4"),
])
def test_an_argument_of_the_wrong_type_is_a_type_error_that_except_value_error_also_catches(make):
    with pytest.raises(TypeError) as excinfo:
        make()
    assert isinstance(excinfo.value, ValueError) and "\n" not in str(excinfo.value)
