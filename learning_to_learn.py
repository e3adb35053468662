#!/usr/bin/env python3
"""Meta-learns few-shot classification of Omniglot characters with a memory-augmented LSTM.

An episode is a shuffled sequence of drawings of a few characters, each
character given a label at random for this episode alone; with every drawing
comes the label of the previous one. Labels can therefore only be learned
within the episode: the model must store what it saw and recognise it when
the character comes again. The model follows Santoro et al., "Meta-Learning
with Memory-Augmented Neural Networks" (ICML 2016), in the simplified form of
the NPFL114 assignment `learning_to_learn`: memory is read by the cosine
similarity of a key with each cell and written by prepending a cell.

Usage: python3 learning_to_learn.py --classes=5 --epochs=20
"""
import argparse
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up notices would bury the epoch lines

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from omniglot_dataset import DataError, Omniglot

parser = argparse.ArgumentParser(
    description="Meta-learns few-shot Omniglot classification with a memory-augmented LSTM.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
data = parser.add_argument_group("data (OMNIGLOT_DATA names a local npz file, else the Keras cache or a download)")
data.add_argument("--classes", default=5, type=int, help="Classes (characters) per episode.")
data.add_argument("--images_per_class", default=10, type=int, help="Drawings of each class per episode.")
data.add_argument("--train_episodes", default=10000, type=int, help="Training episodes per epoch, fresh every epoch.")
data.add_argument("--test_episodes", default=1000, type=int, help="Validation episodes, the same every epoch.")
model_flags = parser.add_argument_group("model")
model_flags.add_argument("--lstm_dim", default=256, type=int, help="Units of the LSTM controller.")
model_flags.add_argument("--cell_size", default=40, type=int, help="Units of one memory cell.")
model_flags.add_argument("--read_heads", default=1, type=int, help="Memory reads per step.")
training = parser.add_argument_group("training")
training.add_argument("--batch_size", default=16, type=int, help="Episodes per batch.")
training.add_argument("--epochs", default=20, type=int, help="Training epochs.")
training.add_argument("--seed", default=42, type=int, help="Random seed of the weights and training episodes.")
training.add_argument("--threads", default=None, type=int, help="CPU threads; 0 is all cores (default; 1 with --recodex).")
output = parser.add_argument_group("output")
output.add_argument("--recodex", default=False, action="store_true",
                    help="Graded mode: deterministic, one line of metrics per epoch.")

# Validation episodes do not depend on --seed, so that runs with different seeds compare on the same episodes.
VALIDATION_SEED = 42
METRICS = ["loss", "acc", "acc1", "acc2", "acc5", "acc10"]


# Episodes

def previous_labels(labels):
    """The label of each step's previous image, -1 at the first step: `[..., steps]`."""
    return np.pad(labels[..., :-1], [(0, 0)] * (labels.ndim - 1) + [(1, 0)], constant_values=-1)


class EpisodeGenerator:
    """Episodes drawn from `dataset` by a generator seeded with `seed`.

    An episode takes `args.classes` distinct random characters, the i-th of
    them labelled i (the characters come in random order, so the labels are
    random), `args.images_per_class` distinct random drawings of each, and
    shuffles these `steps = classes * images_per_class` images. Calling the
    generator gives an endless iterator of `((images, previous_labels), labels)`:
    `images` `[steps, H, W, C]`, `previous_labels` the labels shifted by one
    step with -1 first, `labels` `[steps]` the targets.
    """

    def __init__(self, dataset, args, seed):
        self._images = dataset.data["images"]
        self._classes, self._images_per_class = args.classes, args.images_per_class
        self._rng = np.random.default_rng(seed)

        # drawings[c, :counts[c]] are the indices of the images of character c.
        labels = dataset.data["labels"]
        characters, character_of_image, self._counts = np.unique(labels, return_inverse=True, return_counts=True)
        by_character = np.argsort(character_of_image, kind="stable")
        first_image = np.cumsum(self._counts) - self._counts
        slot = np.arange(len(labels)) - first_image[character_of_image[by_character]]
        self._drawings = np.zeros([len(characters), self._counts.max()], np.int64)
        self._drawings[character_of_image[by_character], slot] = by_character

    def sample(self, episodes):
        """Returns `(image_indices, labels)` of `episodes` episodes, each `[episodes, steps]`."""
        classes, per_class = self._classes, self._images_per_class
        # Distinct characters: the first ones of a random permutation.
        characters = np.argsort(self._rng.random([episodes, len(self._counts)]), axis=1)[:, :classes]
        # Distinct drawings of each: the first ones of a random order, with missing drawings sorted last.
        keys = self._rng.random([episodes, classes, self._drawings.shape[1]])
        keys[np.arange(self._drawings.shape[1]) >= self._counts[characters][..., None]] = np.inf
        slots = np.argsort(keys, axis=-1)[..., :per_class]
        indices = np.take_along_axis(self._drawings[characters], slots, axis=-1).reshape(episodes, -1)
        labels = np.repeat(np.arange(classes, dtype=np.int32), per_class)[None].repeat(episodes, axis=0)

        shuffle = np.argsort(self._rng.random(indices.shape), axis=1)
        return np.take_along_axis(indices, shuffle, axis=1), np.take_along_axis(labels, shuffle, axis=1)

    def __call__(self):
        while True:
            (indices,), (labels,) = self.sample(1)
            yield (self._images[indices], previous_labels(labels)), labels


class EpisodeBatches(keras.utils.PyDataset):
    """`episodes` episodes of `EpisodeGenerator` in batches, for `model.fit`.

    Unless `fixed`, every epoch draws fresh episodes, seeded by `(seed, epoch)`
    alone, so that the episodes of an epoch do not depend on what came before.
    """

    def __init__(self, dataset, args, seed, episodes, fixed=False):
        super().__init__()
        self._dataset, self._args, self._seed = dataset, args, seed
        self._episodes, self._fixed, self._epoch = episodes, fixed, 0
        self._draw_episodes()

    def _draw_episodes(self):
        generator = EpisodeGenerator(self._dataset, self._args, seed=[self._seed, self._epoch])
        self._indices, self._labels = generator.sample(self._episodes)

    def __len__(self):
        return math.ceil(self._episodes / self._args.batch_size)

    def __getitem__(self, batch):
        episodes = slice(batch * self._args.batch_size, (batch + 1) * self._args.batch_size)
        labels = self._labels[episodes]
        images = self._dataset.data["images"][self._indices[episodes]]
        return (images, previous_labels(labels)), labels

    def on_epoch_end(self):
        if not self._fixed:
            self._epoch += 1
            self._draw_episodes()


# Model

@keras.saving.register_keras_serializable(package="learning_to_learn")
class NthOccurrenceAccuracy(keras.metrics.Mean):
    """Accuracy on the steps where a class appears for the `nth` time in its episode."""

    def __init__(self, nth, name=None, **kwargs):
        super().__init__(name=name or f"acc{nth}", **kwargs)
        self.nth = nth

    def update_state(self, y_true, y_pred, sample_weight=None):
        # y_true: (batch, steps), y_pred: (batch, steps, classes)
        y_true = ops.cast(y_true, "int32")
        one_hot = ops.one_hot(y_true, ops.shape(y_pred)[-1])
        occurrence = ops.sum(ops.cumsum(one_hot, axis=1) * one_hot, axis=-1)
        correct = ops.cast(ops.argmax(y_pred, axis=-1) == y_true, self.dtype)
        return super().update_state(correct, sample_weight=ops.cast(occurrence == self.nth, self.dtype))

    def get_config(self):
        config = super().get_config()
        config.update(nth=self.nth)
        return config


@keras.saving.register_keras_serializable(package="learning_to_learn")
class MemoryAugmentedLSTM(keras.layers.Layer):
    """An LSTM controller with an external memory of `memory_cells` cells of `cell_size` units.

    Each step the controller reads its input and the previous read value, and
    emits one write value and `read_heads` read keys. A read is a weighted sum
    of the cells, weighted by the softmax over cells of their cosine similarity
    with the key; the write value becomes the first cell and the last drops.
    """

    def __init__(self, units, memory_cells, cell_size, read_heads, **kwargs):
        super().__init__(**kwargs)
        self.units, self.memory_cells, self.cell_size, self.read_heads = units, memory_cells, cell_size, read_heads
        self.controller = keras.layers.LSTMCell(units)
        # The write value first, then the read keys.
        self.interface_layer = keras.layers.Dense((read_heads + 1) * cell_size, activation="tanh")
        self.output_layer = keras.layers.Dense(units, activation="tanh")
        # [h, c, read value, memory], the memory flat: Keras RNN states must be vectors.
        self.state_size = [units, units, read_heads * cell_size, memory_cells * cell_size]
        self.output_size = units

    def build(self, input_shape):
        read_size = self.read_heads * self.cell_size
        self.controller.build((None, input_shape[-1] + read_size))
        self.interface_layer.build((None, self.units))
        self.output_layer.build((None, self.units + read_size))

    def _read(self, memory, read_keys):
        # memory: (batch, memory_cells, cell_size), read_keys: (batch, read_heads, cell_size)
        similarity = ops.einsum("bhc,bmc->bhm", ops.normalize(read_keys), ops.normalize(memory))
        read_value = ops.matmul(ops.softmax(similarity, axis=-1), memory)
        return ops.reshape(read_value, (-1, self.read_heads * self.cell_size))

    def _write(self, memory, write_value):
        # newest write first; the oldest cell drops
        return ops.concatenate([write_value[:, None], memory[:, :-1]], axis=1)

    def call(self, inputs, states, training=None):
        # states: [h (batch, units), c (batch, units), read_value (batch, read_heads * cell_size),
        #          memory (batch, memory_cells * cell_size)]
        h, c, read_value, memory = states
        memory = ops.reshape(memory, (-1, self.memory_cells, self.cell_size))
        controller_output, (h, c) = self.controller(
            ops.concatenate([inputs, read_value], axis=-1), [h, c], training=training)

        interface = self.interface_layer(controller_output)
        write_value = interface[:, :self.cell_size]
        read_keys = ops.reshape(interface[:, self.cell_size:], (-1, self.read_heads, self.cell_size))
        read_value = self._read(memory, read_keys)
        memory = self._write(memory, write_value)

        output = self.output_layer(ops.concatenate([controller_output, read_value], axis=-1))
        return output, [h, c, read_value, ops.reshape(memory, (-1, self.memory_cells * self.cell_size))]

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, memory_cells=self.memory_cells,
                      cell_size=self.cell_size, read_heads=self.read_heads)
        return config


def image_features():
    """The CNN applied to every image on its own: `[images, H, W, C]` -> `[images, features]`."""
    layers = [keras.Input([Omniglot.H, Omniglot.W, Omniglot.C])]
    for filters in [8, 16, 32]:
        layers += [
            keras.layers.Conv2D(filters, 3, strides=2, padding="valid", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    return keras.Sequential(layers + [keras.layers.Flatten()], name="image_features")


def build_model(args):
    steps = args.classes * args.images_per_class
    images = keras.Input([steps, Omniglot.H, Omniglot.W, Omniglot.C], name="images")
    labels = keras.Input([steps], dtype="int32", name="previous_labels")

    # One pass of the CNN over all images of the batch, then back to episodes.
    features = image_features()(ops.reshape(images, (-1, Omniglot.H, Omniglot.W, Omniglot.C)))
    features = ops.reshape(features, (-1, steps, features.shape[-1]))
    inputs = ops.concatenate([features, ops.one_hot(labels, args.classes)], axis=-1)  # label -1: all zeros

    cell = MemoryAugmentedLSTM(args.lstm_dim, memory_cells=steps, cell_size=args.cell_size,
                               read_heads=args.read_heads)
    outputs = keras.layers.RNN(cell, return_sequences=True)(inputs)
    predictions = keras.layers.Dense(args.classes, activation="softmax")(outputs)

    model = keras.Model([images, labels], predictions)
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc"),
                 *[NthOccurrenceAccuracy(nth) for nth in [1, 2, 5, 10]]],
        # XLA fuses the many small ops of each recurrent step: 1.5x faster training on CPU. Graded
        # runs do without it, since TF's op determinism does not cover XLA.
        jit_compile=not args.recodex,
    )
    return model


# Training

class GradedEpochLine(keras.callbacks.Callback):
    """Prints `Epoch 1/3 loss: ... - val_acc10: ...`, the metrics in a fixed order (Keras sorts its own)."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        names = METRICS + [f"val_{name}" for name in METRICS]
        metrics = " - ".join(f"{name}: {logs[name]:.4f}" for name in names)
        print(f"Epoch {epoch + 1}/{self.epochs} {metrics}", flush=True)


def main(args):
    threads = args.threads if args.threads is not None else int(args.recodex)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    keras.utils.set_random_seed(args.seed)  # seeds the weight initializers too
    if args.recodex:
        tf.config.experimental.enable_op_determinism()

    omniglot = Omniglot()
    train = EpisodeBatches(omniglot.train, args, args.seed, args.train_episodes)
    dev = EpisodeBatches(omniglot.test, args, VALIDATION_SEED, args.test_episodes, fixed=True)

    model = build_model(args)
    logs = model.fit(
        train, epochs=args.epochs, validation_data=dev,
        verbose=0 if args.recodex else "auto",
        callbacks=[GradedEpochLine(args.epochs)] if args.recodex else [],
    )
    return logs.history


if __name__ == "__main__":
    args = parser.parse_args()
    try:
        main(args)
    except DataError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
