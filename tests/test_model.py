"""The whole model: what enters the recurrence, the fused recurrence against plain keras.layers.RNN, saving."""
import argparse
import io
import json
import warnings
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import long_runs
from conftest import tensorflow_only
from learning_to_learn import (
    FusedBatchNormalization,
    MemoryAugmentedRNN,
    model_for_training,
    parse_args,
    training_batches,
)
from long_runs import save_uncompiled

TINY = ["--classes=3", "--images_per_class=2", "--lstm_dim=8", "--cell_size=4"]


def episode_inputs(episodes, rng):
    images = rng.random([episodes, 6, 28, 28, 1], dtype=np.float32)
    previous = np.array([[-1, 2, 0, 1, 2, 0], [-1, 0, 0, 1, 1, 2]][:episodes], np.int32)
    return images, previous


def recurrence_of(model):
    return next(layer for layer in model.layers if isinstance(layer, keras.layers.RNN))


def test_the_recurrence_sees_each_images_features_then_the_one_hot_previous_label():
    model = model_for_training(parse_args(TINY))
    images, previous = episode_inputs(2, np.random.default_rng(0))
    entering = keras.Model(model.inputs, recurrence_of(model).input).predict([images, previous], verbose=0)

    one_hot = np.zeros([2, 6, 3], np.float32)  # label -1, before the first step, is all zeros
    for episode, step in np.ndindex(2, 6):
        if previous[episode, step] >= 0:
            one_hot[episode, step, previous[episode, step]] = 1
    assert entering.shape == (2, 6, 2 * 2 * 32 + 3)
    np.testing.assert_array_equal(entering[..., -3:], one_hot)
    cnn = model.get_layer("image_features")
    np.testing.assert_allclose(entering[..., :-3], cnn.predict(images.reshape(12, 28, 28, 1), verbose=0)
                               .reshape(2, 6, -1), atol=1e-5)


def test_cnn_pooling_convolves_keeping_the_size_then_normalizes_rectifies_and_max_pools_by_two():
    cnn = model_for_training(parse_args([*TINY, "--cnn_pooling", "--cnn_filters=3"])).get_layer("image_features")
    convolution, normalization = cnn.layers[:2]
    rng = np.random.default_rng(0)
    for weight in [normalization.moving_mean, normalization.beta]:  # away from the initial 0s and 1s
        weight.assign(rng.normal(size=3))
    for weight in [normalization.moving_variance, normalization.gamma]:
        weight.assign(rng.uniform(0.5, 2, size=3))
    images = rng.random([2, 28, 28, 1], dtype=np.float32)

    kernel, padded = convolution.kernel.numpy(), np.pad(images[..., 0], [(0, 0), (1, 1), (1, 1)])
    convolved = sum(padded[:, dy:dy + 28, dx:dx + 28, None] * kernel[dy, dx, 0] for dy, dx in np.ndindex(3, 3))
    normalized = ((convolved - normalization.moving_mean.numpy())
                  / np.sqrt(normalization.moving_variance.numpy() + normalization.epsilon)
                  * normalization.gamma.numpy() + normalization.beta.numpy())
    pooled = np.maximum(normalized, 0).reshape(2, 14, 2, 14, 2, 3).max(axis=(2, 4))
    np.testing.assert_allclose(cnn.predict(images, verbose=0), pooled.reshape(2, -1), atol=1e-5)
    # Four blocks take 28 pixels to 14, 7, 3 and 1: as many features as the last block's filters.
    four_blocks = model_for_training(parse_args([*TINY, "--cnn_pooling", "--cnn_filters=4,4,4,6"]))
    assert four_blocks.get_layer("image_features").output.shape[-1] == 6


@tensorflow_only
def test_fused_batch_normalization_in_training_is_keras_normalization_by_the_batchs_statistics():
    rng = np.random.default_rng(1)
    images = tf.constant(rng.normal(2, 3, [16, 14, 14, 5]).astype(np.float32))
    weights = rng.normal(size=images.shape).astype(np.float32)
    fused, plain = FusedBatchNormalization(), keras.layers.BatchNormalization()
    for layer in (fused, plain):
        layer.build(images.shape)
        layer.gamma.assign(np.linspace(0.5, 2, 5)), layer.beta.assign(np.linspace(-1, 1, 5))
        layer.moving_mean.assign(np.full(5, 0.5)), layer.moving_variance.assign(np.full(5, 2.0))
    outputs, gradients = [], []
    for layer in (fused, plain):
        with tf.GradientTape() as tape:
            tape.watch(images)
            output = layer(images, training=True)
            loss = tf.reduce_sum(output * weights)  # a per-channel weight would give images no gradient
        outputs.append(output.numpy())
        gradients.append(tape.gradient(loss, [images, layer.gamma, layer.beta]))
    # By the batch's mean and biased variance, as numpy has them; the moving ones move 1% of the way to them.
    mean, variance = images.numpy().mean(axis=(0, 1, 2)), images.numpy().var(axis=(0, 1, 2))
    expected = (images.numpy() - mean) / np.sqrt(variance + 1e-3) * np.linspace(0.5, 2, 5) + np.linspace(-1, 1, 5)
    np.testing.assert_allclose(outputs[0], expected, atol=1e-5)
    np.testing.assert_allclose(fused.moving_mean.numpy(), 0.99 * 0.5 + 0.01 * mean, rtol=1e-6)
    np.testing.assert_allclose(fused.moving_variance.numpy(), 0.99 * 2.0 + 0.01 * variance, rtol=1e-6)
    for ours, keras_ones in zip(*gradients, strict=True):  # Keras's own, by automatic differentiation
        np.testing.assert_allclose(ours.numpy(), keras_ones.numpy(), atol=1e-5 * np.abs(keras_ones.numpy()).max())
    # Out of training, Keras's layer as it is: by the moving statistics.
    fused.moving_mean.assign(plain.moving_mean), fused.moving_variance.assign(plain.moving_variance)
    np.testing.assert_array_equal(fused(images, training=False).numpy(), plain(images, training=False).numpy())


def test_the_assignments_cnn_normalizes_as_keras_does_in_graded_runs_and_the_plain_build_else_fused():
    def normalization(flags, fused=True):
        model = model_for_training(parse_args([*TINY, *flags]), fused=fused)
        return type(model.get_layer("image_features").layers[1])

    assert normalization([]) is FusedBatchNormalization
    assert normalization([], fused=False) is keras.layers.BatchNormalization
    assert normalization(["--recodex"]) is keras.layers.BatchNormalization
    # The few-shot CNN's is fused in every run: its recipes were recorded so.
    assert normalization(["--cnn_pooling"]) is normalization(["--cnn_pooling"], fused=False) is FusedBatchNormalization


@tf.custom_gradient
def stored_in_bfloat16(x):
    """`x` rounded as a bfloat16 tensor stores it, and its gradient rounded so too."""
    return tf.cast(tf.cast(x, tf.bfloat16), x.dtype), lambda gradient: tf.cast(tf.cast(gradient, tf.bfloat16),
                                                                              gradient.dtype)


def bfloat16_arithmetic(cnn, images):
    """`cnn` of float32 weights in float32 arithmetic, rounding to bfloat16 every tensor that a bfloat16 CNN
    stores: the images, the weights as used, every layer's output, and every gradient on the way back."""
    x = stored_in_bfloat16(images)
    for layer in cnn.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = stored_in_bfloat16(tf.identity(layer.kernel))
            x = tf.nn.conv2d(x, kernel, layer.strides, layer.padding.upper())
        else:
            x = layer(x, training=True)
        x = stored_in_bfloat16(x)
    return x


@tensorflow_only
@pytest.mark.skipif(long_runs.bfloat16_convolutions_problem() is not None,
                    reason="--cnn_bfloat16 needs oneDNN's bfloat16 convolutions: a CPU with AVX512F or "
                           "AVX_NE_CONVERT; elsewhere it is refused (test_bad_input.py)")
@pytest.mark.parametrize("pooling", [(), ("--cnn_pooling",)])
def test_cnn_bfloat16_stores_bfloat16_and_sums_in_float32(pooling):
    flags = [*TINY, *pooling, "--cnn_filters=4,6"]
    keras.utils.set_random_seed(0)
    cnns = [model_for_training(parse_args(flags + extra)).get_layer("image_features")
            for extra in ([], ["--cnn_bfloat16"])]
    cnns[1].set_weights(cnns[0].get_weights())
    rng = np.random.default_rng(2)
    images = tf.constant(rng.random([8, 28, 28, 1], dtype=np.float32))
    weights = rng.normal(size=[8, cnns[0].output.shape[-1]]).astype(np.float32)
    results = []
    for cnn, features_of in [(cnns[0], bfloat16_arithmetic), (cnns[1], lambda cnn, x: cnn(x, training=True))]:
        with tf.GradientTape() as tape:
            features = features_of(cnn, images)
            loss = tf.reduce_sum(features * weights)
        results.append([features, *tape.gradient(loss, cnn.trainable_variables)])
    # The activations in between are bfloat16, what goes in and out and every weight float32.
    assert cnns[1].layers[0].compute_dtype == "bfloat16" and cnns[1].output.dtype == "float32"
    assert {weight.dtype for weight in cnns[1].weights} == {"float32"}
    # Summed in another order, a float32 sum may round to the next bfloat16 (2**-8 of the largest entry) and
    # carry that on; sums in bfloat16 (TensorFlow's own kernels) put the first layer's gradients 20-35% off.
    for expected, actual in zip(*results, strict=True):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=2**-8 * np.abs(expected).max())


def test_feature_match_gives_each_step_its_best_cosine_with_the_earlier_images_features():
    model = model_for_training(parse_args([*TINY, "--feature_match"]))
    images, previous = episode_inputs(2, np.random.default_rng(0))
    images[0, 3] = images[0, 1]  # the same drawing again: a cosine of 1
    entering = keras.Model(model.inputs, recurrence_of(model).input).predict([images, previous], verbose=0)
    features = entering[..., :-4]
    assert entering.shape == (2, 6, 2 * 2 * 32 + 3 + 1) and features.min() >= 0

    expected = np.zeros([2, 6])
    for episode, step in np.ndindex(2, 6):
        for earlier in range(step):
            a, b = features[episode, step], features[episode, earlier]
            expected[episode, step] = max(expected[episode, step], a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    np.testing.assert_allclose(entering[..., -1], expected, atol=1e-5)
    assert entering[0, 3, -1] == pytest.approx(1, abs=1e-5) and entering[:, 0, -1].tolist() == [0, 0]


def test_feature_labels_give_each_step_the_softmax_vote_of_the_earlier_images_labels():
    model = model_for_training(parse_args([*TINY, "--feature_match", "--feature_labels"]))
    model.get_layer("earlier_label_vote").sharpness.assign(7.0)
    images, previous = episode_inputs(2, np.random.default_rng(0))
    entering = keras.Model(model.inputs, recurrence_of(model).input).predict([images, previous], verbose=0)
    features, best_match, votes = entering[..., :-7], entering[..., -4], entering[..., -3:]

    expected = np.zeros([2, 6, 3])
    for episode, step in np.ndindex(2, 6):
        if step == 0:
            continue
        cosines = np.array([features[episode, step] @ features[episode, u] / np.linalg.norm(features[episode, step])
                            / np.linalg.norm(features[episode, u]) for u in range(step)])
        weights = np.exp(7 * cosines) / np.exp(7 * cosines).sum()
        for u in range(step):
            expected[episode, step, previous[episode, u + 1]] += weights[u]  # image u's label
    np.testing.assert_allclose(votes, expected, atol=1e-5)
    np.testing.assert_allclose(votes[:, 1:].sum(-1), 1, atol=1e-5)
    assert best_match.max() <= 1 + 1e-5  # the best match still comes before the vote


# Each case compiles for seconds: the fast suite takes the one of every input and read.
@pytest.mark.parametrize("flags", [["--read_heads=2", "--read_sharpness=3", "--feature_match", "--feature_labels"],
                                   pytest.param(["--read_heads=0"], marks=pytest.mark.slow)])
@tensorflow_only  # elsewhere both are the plain one
def test_fused_and_plain_recurrence_give_the_same_predictions_and_gradients(flags):
    args = parse_args([*TINY, *flags])
    keras.utils.set_random_seed(0)
    fused, plain = model_for_training(args), model_for_training(args, fused=False)
    assert type(recurrence_of(fused)) is MemoryAugmentedRNN and type(recurrence_of(plain)) is keras.layers.RNN
    plain.set_weights(fused.get_weights())
    images, previous = episode_inputs(2, np.random.default_rng(1))
    labels = np.array([[2, 0, 1, 2, 0, 1], [0, 0, 1, 1, 2, 2]])

    def predictions_and_gradients(model):
        with tf.GradientTape() as tape:
            predictions = model([images, previous], training=True)
            loss = keras.losses.sparse_categorical_crossentropy(labels, predictions)
        return [predictions, *tape.gradient(loss, model.trainable_variables)]

    expected, actual = predictions_and_gradients(plain), predictions_and_gradients(fused)
    assert len(actual) == 1 + len(fused.trainable_variables)
    for value, reference in zip(actual, expected, strict=True):  # the fused normalisation rounds in its own order
        np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


@tensorflow_only  # a gradient tape
def test_the_votes_sharpness_is_trained():
    model = model_for_training(parse_args([*TINY, "--feature_labels"]), fused=False)
    sharpness = model.get_layer("earlier_label_vote").sharpness
    images, previous = episode_inputs(2, np.random.default_rng(0))
    labels = np.array([[2, 0, 1, 2, 0, 1], [0, 0, 1, 1, 2, 2]])
    with tf.GradientTape() as tape:
        loss = model.loss(labels, model([images, previous], training=True))
    gradients = tape.gradient(loss, model.trainable_variables)
    [gradient] = [gradient for variable, gradient in zip(model.trainable_variables, gradients, strict=True)
                  if variable is sharpness]
    assert gradient is not None and float(gradient) != 0


def test_saved_model_loads_with_plain_keras_quietly_and_predicts_the_same_without_an_optimizer(tmp_path):
    args = parse_args([*TINY, "--read_heads=2", "--read_sharpness=3", "--feature_match", "--feature_labels",
                       "--cnn_filters=4,6,8"])
    # The plain recurrence, compiled in less time: the shipped models, of the fused one, load in test_program.py.
    model = model_for_training(args, fused=False)
    model.get_layer("earlier_label_vote").sharpness.assign(4.5)  # not its initial value
    path = tmp_path / "model.keras"
    save_uncompiled(model, str(path))
    assert model.compiled  # the model in training keeps its optimizer
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
        assert "optimizer" not in weights and not json.loads(archive.read("config.json")).get("compile_config")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # as Keras warns of saved optimizer state it cannot load
        loaded = keras.models.load_model(path)
    assert not loaded.compiled
    inputs = episode_inputs(2, np.random.default_rng(0))
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0), atol=1e-6)
    assert [(layer.cell.read_heads, layer.cell.read_sharpness) for layer in loaded.layers
            if hasattr(layer, "cell")] == [(2, 3.0)]
    cnn = loaded.get_layer("image_features")
    assert [layer.filters for layer in cnn.layers if isinstance(layer, keras.layers.Conv2D)] == [4, 6, 8]
    # 3x3 valid convolutions of stride 2 take 28 pixels to 13, 6 and 2: 2 x 2 x 8 features.
    assert cnn.output.shape[-1] == 2 * 2 * 8
    assert float(keras.ops.convert_to_numpy(loaded.get_layer("earlier_label_vote").sharpness)) == 4.5


def test_cosine_decay_takes_the_learning_rate_to_zero_at_the_last_step():
    # 100 episodes in batches of 16 are 7 steps an epoch: 14 steps in all.
    args = parse_args(["--learning_rate=0.002", "--learning_rate_decay=cosine", "--train_episodes=100",
                       "--epochs=2", "--lstm_dim=8", "--cell_size=4"])
    optimizer = model_for_training(args).optimizer
    for step in [0, 3, 7, 14]:
        optimizer.iterations.assign(step)
        assert float(optimizer.learning_rate) == pytest.approx(0.002 * (1 + np.cos(np.pi * step / 14)) / 2, abs=1e-9)


def test_first_occurrence_weight_multiplies_the_loss_of_first_drawings_in_the_mean_over_steps():
    args = parse_args([*TINY, "--first_occurrence_weight=3", "--learning_rate=1e-9"])
    rng = np.random.default_rng(2)
    dataset = argparse.Namespace(data={"images": rng.random([24, 28, 28, 1], dtype=np.float32),
                                       "labels": np.repeat(np.arange(6), 4)})
    batches = training_batches(dataset, args.classes, args.images_per_class, batch_size=4, episodes=4, seed=3,
                               epochs=range(1), first_occurrence_weight=args.first_occurrence_weight)
    (images, previous), labels, _ = batches[0]
    model = model_for_training(args, fused=False)  # the fused recurrence's function, compiled in less time
    predictions = keras.ops.convert_to_numpy(model([images, previous], training=True))  # fit's step, before learning

    cross_entropy = -np.log(np.take_along_axis(predictions, labels[..., None], axis=-1)[..., 0])
    first = np.array([[label not in episode[:step] for step, label in enumerate(episode)]
                      for episode in labels])
    expected = np.where(first, 3, 1) * cross_entropy
    history = model.fit(batches, epochs=1, steps_per_epoch=1, shuffle=False, verbose=0).history
    assert history["loss"][0] == pytest.approx(expected.mean(), rel=1e-4)
    assert history["loss"][0] != pytest.approx(cross_entropy.mean(), rel=1e-2)
