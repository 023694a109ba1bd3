"""The training loop: it learns, it is reproducible from a seed, and it names the step a loss diverged at."""

from __future__ import annotations

import numpy
import pytest

from cnn_backend import SGD, get_backend, seed_cnn
from cnn_backend.data import BatchLoader, load_fashion_mnist, prepare_images
from cnn_backend.layers import SoftmaxCrossEntropy
from cnn_backend.model import ARCHITECTURES
from cnn_backend.optim import OPTIMIZERS, ConstantSchedule, CosineSchedule, OneCycleSchedule, StepSchedule
from cnn_backend.training import (
    RECIPES,
    SCHEDULES,
    NonFiniteLossError,
    Trainer,
    evaluate,
    fit,
    schedule_for_run,
    schedule_from_config,
)


@pytest.fixture(scope="module")
def fashion():
    images, labels = load_fashion_mnist("train", "bundled")
    return (images[:512], labels[:512]), (images[9000:9500], labels[9000:9500])


def train_seed_model(fashion, epochs: int, seed: int = 0, **fit_kwargs):
    (train_x, train_y), (val_x, val_y) = fashion
    backend = get_backend("cpu")
    model = seed_cnn(backend, seed=seed)
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9, backend=backend)
    loader = BatchLoader(train_x, train_y, backend, 32, seed=seed)
    history = fit(model, optimizer, loader, epochs, validation=(prepare_images(val_x), val_y), **fit_kwargs)
    return model, history


def test_fit_learns_on_a_few_hundred_samples(fashion):
    _, history = train_seed_model(fashion, epochs=6)
    assert history[-1].train_loss < 0.7 * history[0].train_loss
    assert history[-1].train_accuracy > 0.5  # chance is 0.1
    assert history[-1].val_accuracy > 0.4
    assert [stats.epoch for stats in history] == list(range(1, 7))


def test_two_runs_from_one_seed_give_identical_weights(fashion):
    first, _ = train_seed_model(fashion, epochs=2, seed=3)
    second, _ = train_seed_model(fashion, epochs=2, seed=3)
    other, _ = train_seed_model(fashion, epochs=2, seed=4)
    for name, value in first.state_dict().items():
        numpy.testing.assert_array_equal(value, second.state_dict()[name])
    assert not numpy.array_equal(first.state_dict()["0.weight"], other.state_dict()["0.weight"])


def test_callbacks_run_at_epoch_start_each_interval_and_epoch_end(fashion):
    events = []
    train_seed_model(
        fashion, epochs=2, log_every=5,
        on_epoch_start=lambda epoch: events.append(("start", epoch)),
        on_interval=lambda steps, loss, accuracy: events.append(("interval", steps)),
        on_epoch_end=lambda stats: events.append(("end", stats.epoch)),
    )
    one_epoch = [("interval", 5), ("interval", 10), ("interval", 15), ("interval", 16)]  # 512 / 32 = 16 steps
    assert events == [("start", 1), *one_epoch, ("end", 1), ("start", 2), *one_epoch, ("end", 2)]


class PoisonedLoader:
    """Batches of a real loader, with NaN images at one (epoch, step)."""

    def __init__(self, loader, epoch: int, step: int) -> None:
        self.loader, self.bad = loader, (epoch, step)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, index: int):
        for step, (x, y) in enumerate(self.loader.epoch(index), start=1):
            yield (x * numpy.nan if (index, step) == self.bad else x), y


@pytest.mark.parametrize("log_every", [1, 2, 50])
def test_non_finite_loss_names_the_epoch_and_step_it_appeared_at(fashion, log_every):
    (train_x, train_y), _ = fashion
    backend = get_backend("cpu")
    model = seed_cnn(backend, seed=0)
    loader = PoisonedLoader(BatchLoader(train_x, train_y, backend, 32, seed=0), epoch=2, step=5)
    with numpy.errstate(invalid="ignore"), pytest.raises(NonFiniteLossError, match="epoch 2, step 5") as caught:
        fit(model, SGD(model.parameters(), lr=0.01, backend=backend), loader, 3, log_every=log_every)
    assert (caught.value.epoch, caught.value.step) == (2, 5)


def test_trainer_follows_the_schedule_by_global_step(fashion):
    (train_x, train_y), _ = fashion
    backend = get_backend("cpu")
    model = seed_cnn(backend, seed=0)
    optimizer = SGD(model.parameters(), lr=0.01, backend=backend)
    loader = BatchLoader(train_x, train_y, backend, 32, seed=0)
    seen = []
    trainer = Trainer(model, optimizer, loader, schedule=lambda step: seen.append(step) or 0.01)
    trainer.run_epoch(3)  # epoch 3 starts at global step 2 * 16
    assert seen == list(range(32, 48))


def test_evaluate_returns_loss_accuracy_and_predictions(fashion):
    _, (val_x, val_y) = fashion
    model = seed_cnn("cpu", seed=0)
    result = evaluate(model, prepare_images(val_x), val_y, batch_size=128, with_predictions=True)
    assert result["predictions"].shape == val_y.shape
    assert result["accuracy"] == pytest.approx(numpy.mean(result["predictions"] == val_y))
    assert numpy.isfinite(result["loss"])


def test_flip_average_scores_the_mean_logits_of_each_image_and_its_mirror(fashion):
    _, (val_x, val_y) = fashion
    model = seed_cnn(get_backend("cpu", "float64"), seed=0)
    images = prepare_images(val_x, numpy.float64)
    result = evaluate(model, images, val_y, batch_size=128, with_predictions=True, flip_average=True)
    logits = (model.predict_logits(images) + model.predict_logits(numpy.ascontiguousarray(images[..., ::-1]))) / 2
    assert numpy.array_equal(result["predictions"], logits.argmax(axis=1))
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= numpy.log(numpy.exp(log_probs).sum(axis=1, keepdims=True))
    assert result["loss"] == pytest.approx(-log_probs[numpy.arange(len(val_y)), val_y].mean(), rel=1e-10)
    plain = evaluate(model, images, val_y, batch_size=128)
    assert plain["loss"] != pytest.approx(result["loss"], rel=1e-6)
    # A mirror-symmetric set scores the same with and without flips.
    symmetric = (images + images[..., ::-1]) / 2
    assert evaluate(model, symmetric, val_y, 100, flip_average=True) == pytest.approx(evaluate(model, symmetric, val_y, 100))


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules_round_trip_through_their_config(name):
    config = schedule_for_run(name, 0.1, epochs=6, steps_per_epoch=10)
    schedule = schedule_from_config(config)
    assert schedule.config() == config
    rebuilt = schedule_from_config(schedule.config())
    assert [rebuilt(step) for step in range(60)] == [schedule(step) for step in range(60)]
    assert isinstance(schedule, {"constant": ConstantSchedule, "step": StepSchedule, "cosine": CosineSchedule, "one-cycle": OneCycleSchedule}[name])


def test_step_schedule_decays_twice_per_run():
    schedule = schedule_from_config(schedule_for_run("step", 1.0, epochs=6, steps_per_epoch=10))
    assert [schedule(step) for step in (0, 19, 20, 40, 59)] == pytest.approx([1.0, 1.0, 0.1, 0.01, 0.01])


def test_every_architecture_has_a_complete_recipe():
    assert set(RECIPES) == set(ARCHITECTURES)
    keys = set(RECIPES["seed"])
    for recipe in RECIPES.values():
        assert set(recipe) == keys
        assert recipe["optimizer"] in OPTIMIZERS and recipe["schedule"] in SCHEDULES


def test_the_epoch_training_loss_is_the_mean_over_samples_with_a_short_last_batch():
    """100 images in batches of 32: the last batch of 4 weighs 4, not as much as a full one."""
    images, labels = load_fashion_mnist("train", "bundled")
    images, labels = images[:100], labels[:100]
    model = seed_cnn(seed=3)
    optimizer = SGD(model.parameters(), lr=0.1, backend=model.backend)
    loader = BatchLoader(images, labels, model.backend, 32, seed=0)
    # A rate of zero leaves the weights as they are, so the epoch's loss is that of one model.
    (stats,) = fit(model, optimizer, loader, 1, schedule=lambda step: 0.0)
    expected = evaluate(model, prepare_images(images, "float32"), labels)
    assert stats.train_loss == pytest.approx(expected["loss"], rel=1e-5)
    assert stats.train_accuracy == pytest.approx(expected["accuracy"])


def small_run(fashion, count: int = 64, batch_size: int = 32, **loader_kwargs):
    (train_x, train_y), _ = fashion
    model = seed_cnn("cpu", seed=0)
    optimizer = SGD(model.parameters(), lr=0.01, backend=model.backend)
    return model, optimizer, BatchLoader(train_x[:count], train_y[:count], model.backend, batch_size, **loader_kwargs)


@pytest.mark.parametrize("start_epoch", [0, -1, numpy.int64(0)])
def test_fit_refuses_a_start_epoch_below_one(fashion, start_epoch):
    model, optimizer, loader = small_run(fashion)
    with pytest.raises(ValueError, match=rf"^fit: start_epoch counts from 1 \(the first epoch is 1\), got {int(start_epoch)}$"):
        fit(model, optimizer, loader, 2, start_epoch=start_epoch)


@pytest.mark.parametrize("epochs", [1.5, 0, -1, None])
def test_fit_refuses_epochs_that_are_not_a_positive_integer(fashion, epochs):
    model, optimizer, loader = small_run(fashion)
    with pytest.raises(ValueError, match=r"^fit: epochs must be an integer >= 1, got "):
        fit(model, optimizer, loader, epochs)


def test_fit_refuses_a_start_epoch_after_the_last_and_takes_numpy_integers(fashion):
    model, optimizer, loader = small_run(fashion)
    with pytest.raises(ValueError, match=r"^fit: start_epoch 3 is after the last epoch \(epochs=1\): nothing would be trained$"):
        fit(model, optimizer, loader, 1, start_epoch=3)
    history = fit(model, optimizer, loader, numpy.int64(2), start_epoch=numpy.int32(2))
    assert [stats.epoch for stats in history] == [2]


def test_fit_refuses_a_loader_without_epoch_and_len(fashion):
    model, optimizer, loader = small_run(fashion)
    batches = list(loader.epoch(1))
    for bad in (batches, iter(batches)):
        with pytest.raises(TypeError, match=r"^the loader must be a cnn_backend\.data\.BatchLoader \(or an object with epoch\(n\) and len\(\)\), got a (list|list_iterator)$"):
            fit(model, optimizer, bad, 1)


def test_fit_and_trainer_refuse_what_is_not_an_optimizer(fashion):
    model, optimizer, loader = small_run(fashion)
    expected = r"^the optimizer must be a cnn_backend\.optim\.Optimizer \(e\.g\. SGD\(model\.parameters\(\), lr=0\.01\)\), got "
    with pytest.raises(TypeError, match=expected + "None$"):
        fit(model, None, loader, 1)
    with pytest.raises(TypeError, match=expected + "a BatchLoader$"):
        fit(model, loader, optimizer, 1)  # swapped
    with pytest.raises(TypeError, match=expected + "a SoftmaxCrossEntropy$"):
        Trainer(model, SoftmaxCrossEntropy(model.backend), loader)


def test_an_optimiser_of_another_models_parameters_is_refused_and_a_subset_allowed(fashion):
    model, _, loader = small_run(fashion)
    other = seed_cnn("cpu", seed=0)
    with pytest.raises(ValueError, match=r"^the optimiser updates none of this model's parameters: build it with model\.parameters\(\)$"):
        fit(model, SGD(other.parameters(), lr=0.01, backend=model.backend), loader, 1)
    frozen = model.parameters()[0]
    before = frozen.data.copy()
    fit(model, SGD(model.parameters()[1:], lr=0.01, backend=model.backend), loader, 1)
    numpy.testing.assert_array_equal(frozen.data, before)


def test_a_batch_loader_with_labels_beyond_the_models_outputs_is_refused_before_training(fashion):
    (train_x, _), _ = fashion
    model = seed_cnn("cpu", seed=0)
    labels = numpy.arange(64) % 12  # labels up to 11 for a 10-output model
    loader = BatchLoader(train_x[:64], labels, model.backend, 32, num_classes=12)
    started = []
    with pytest.raises(ValueError, match=r"^the loader's labels go up to 11 but the model has 10 outputs: build the model for 12 classes or more, or give the loader the data's labels$"):
        fit(model, SGD(model.parameters(), lr=0.01, backend=model.backend), loader, 1, on_epoch_start=started.append)
    assert started == []


class NegativeLabelLoader:
    """Batches of a real loader, with one label set to -1 (which would index class 9)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, index: int):
        for x, y in self.loader.epoch(index):
            y = y.copy()
            y[0] = -1
            yield x, y


class MiscountingLoader:
    """Batches of a real loader, with a len() that is ``off`` from the count it yields."""

    def __init__(self, loader, off: int) -> None:
        self.loader, self.off = loader, off

    def __len__(self) -> int:
        return len(self.loader) + self.off

    def epoch(self, index: int):
        yield from self.loader.epoch(index)


@pytest.mark.parametrize("off, yielded", [(-1, "more than {}"), (1, "{}")])
def test_a_custom_loader_whose_len_miscounts_its_batches_is_refused(fashion, off, yielded):
    model, optimizer, loader = small_run(fashion)
    counted = MiscountingLoader(loader, off)
    with pytest.raises(ValueError) as excinfo:
        fit(model, optimizer, counted, 1)
    said = yielded.format(len(loader) - 1 if off < 0 else len(loader))
    assert str(excinfo.value) == (
        f"the loader's epoch(1) yielded {said} batches, but its len() says {len(counted)}: "
        "make MiscountingLoader.__len__ count the batches each epoch yields"
    )


def test_a_custom_loader_yielding_a_negative_label_is_refused(fashion):
    model, optimizer, loader = small_run(fashion)
    with pytest.raises(ValueError, match=r"^SoftmaxCrossEntropy: labels must be in \[0, 9\], got values from -1 to \d$"):
        fit(model, optimizer, NegativeLabelLoader(loader), 1)


def test_evaluate_refuses_float_labels(fashion):
    _, (val_x, val_y) = fashion
    model = seed_cnn("cpu", seed=0)
    with pytest.raises(ValueError, match=r"^evaluate: labels must be integer class indices, got float64$"):
        evaluate(model, prepare_images(val_x), val_y.astype(numpy.float64))


@pytest.mark.parametrize("bad, expected", [
    (lambda x, y: (prepare_images(x), y[:-1]), r"^fit: validation: expected labels of shape \(500,\), one class index per image, got \(499,\)$"),
    (lambda x, y: (prepare_images(x), y.astype(numpy.float64)), r"^fit: validation: labels must be integer class indices, got float64$"),
    (lambda x, y: (prepare_images(x), y + 1), r"^SoftmaxCrossEntropy: labels must be in \[0, 9\], got values from 1 to 10$"),
    (lambda x, y: (x, y), r"^fit: validation: the input holds uint8 values, not floats; "),
    (lambda x, y: (prepare_images(x)[:0], y[:0]), r"^fit: validation: no samples to predict \(an empty input\)$"),
    (lambda x, y: (numpy.where(numpy.arange(len(x))[:, None, None, None] < 2, numpy.nan, prepare_images(x)), y),
     r"^fit: validation: 2 of 500 samples contain NaN or infinity; clean the input first$"),
    (lambda x, y: (prepare_images(x).transpose(0, 2, 3, 1), y),
     r"^fit: validation samples have shape \(28, 28, 1\), the model takes \(1, 28, 28\); pass images as \(N, C, H, W\), not \(N, H, W, C\)$"),
    (lambda x, y: (prepare_images(x)[:, :, :20, :20], y), r"^fit: validation samples have shape \(1, 20, 20\), the model takes \(1, 28, 28\)$"),
])
def test_fit_checks_the_validation_set_before_the_first_epoch(fashion, bad, expected):
    model, optimizer, loader = small_run(fashion)
    _, (val_x, val_y) = fashion
    started = []
    with pytest.raises(ValueError, match=expected):
        fit(model, optimizer, loader, 1, validation=bad(val_x, val_y), on_epoch_start=started.append)
    assert started == []


def test_a_batchnorm_network_refuses_a_last_batch_of_one_sample_up_front(fashion):
    (train_x, train_y), _ = fashion
    model = ARCHITECTURES["default"]("cpu", seed=0)
    optimizer = SGD(model.parameters(), lr=0.01, backend=model.backend)
    loader = BatchLoader(train_x[:65], train_y[:65], model.backend, 64)
    with pytest.raises(ValueError, match=r"^the last batch of each epoch \(65 images in batches of 64\) gives BatchNorm 1 sample, and it cannot take statistics over a single one: pass drop_last=True to the BatchLoader, or another batch size$"):
        fit(model, optimizer, loader, 1)
    Trainer(model, optimizer, BatchLoader(train_x[:65], train_y[:65], model.backend, 64, drop_last=True))  # accepted


def test_a_loader_sharing_its_batches_otherwise_than_the_communicator_is_refused():
    from cnn_backend.distributed import SingleProcess
    from cnn_backend.model import seed_cnn
    from cnn_backend.optim import SGD
    from cnn_backend.training import Trainer

    images = numpy.zeros((8, 1, 28, 28), numpy.uint8)
    model = seed_cnn("cpu", seed=0)
    half = BatchLoader(images, numpy.arange(8) % 10, "cpu", 4, rank=0, size=2)  # a share, and no communicator given
    with pytest.raises(ValueError, match=r"^the loader takes share 0 of 2 of each batch, but the communicator is process 0 of 1; "
                                         r"pass the job's communicator \(fit\(\.\.\., communicator=world_communicator\(\)\)\)$"):
        Trainer(model, SGD(model.parameters(), lr=0.1), half)

    class TwoProcesses(SingleProcess):
        rank, size = 1, 2

    whole = BatchLoader(images, numpy.arange(8) % 10, "cpu", 4)  # the whole batch on every process: twice the work
    with pytest.raises(ValueError, match=r"the communicator is process 1 of 2; make it BatchLoader\(\.\.\., rank=1, size=2\)"):
        Trainer(model, SGD(model.parameters(), lr=0.1), whole, communicator=TwoProcesses())
