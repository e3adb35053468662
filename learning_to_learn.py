#!/usr/bin/env python3
"""Meta-learns few-shot classification of Omniglot characters with a memory-augmented LSTM.

An episode is a shuffled sequence of drawings of a few characters, each
character given a label at random for this episode alone; with every drawing
comes the label of the previous one. Labels can therefore only be learned
within the episode: the model must store what it saw and recognise it when
the character comes again. The model follows Santoro et al., "Meta-Learning
with Memory-Augmented Neural Networks" (ICML 2016), in the simplified form of
the NPFL114 assignment `learning_to_learn`: memory is read by the cosine
similarity of a key with each cell and written by prepending a cell. What
its flags reach, and in what time, is in README.md.

Usage: python3 learning_to_learn.py --classes=5 --epochs=20

The file reads top to bottom as the method: flags, episodes, the metric, the
memory cell, the model, training, `main`. After `main` come what long runs
need (checks, checkpoints, signals), the graded lines, TensorBoard's pictures
and the fused recurrence: the same cell, faster, by a hand-written backward pass.
"""
import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C or SIGTERM while TensorFlow loads ends the program as later: in one line
    for number, status in [(signal.SIGINT, 130), (signal.SIGTERM, 143)]:
        signal.signal(number, lambda *_, status=status: (print(f"{os.path.basename(sys.argv[0])}: interrupted",
                                                               file=sys.stderr), os._exit(status)))

import argparse
import contextlib
import importlib.util
import json
import math
import time
import zipfile
from typing import NamedTuple

# TensorFlow's C++ start-up notices would bury the epoch lines; 3 also hides the cuInit error of a machine
# without a GPU. Failures still arrive as Python exceptions. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

try:
    import keras
    import numpy as np
    import tensorflow as tf
    from keras import ops
    from tensorflow.python.framework.config import is_op_determinism_enabled  # what Keras asks before using XLA
except ImportError as error:  # not installed, or no room to load it (ulimit -v)
    if __name__ != "__main__":
        raise
    print(f"{os.path.basename(sys.argv[0])}: error: cannot load TensorFlow ({error}): install it with pip install "
          "-r requirements.txt, in memory enough for it", file=sys.stderr)
    sys.exit(2)

from omniglot_dataset import ALPHABETS_FILE, DataError, Omniglot, leftovers, not_a_file, unwritable, write_atomically

# Flags

def filter_counts(text):
    """An argparse type: the CNN's filters, integers above 0 separated by commas."""
    counts = text.split(",")
    if not all(count.strip().isdigit() and int(count) > 0 for count in counts):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected integers above 0, one a convolution, "
                                         "as in 8,16,32")
    return [int(count) for count in counts]


class FlagRole(NamedTuple):
    of_the_run: bool  # it shapes what a run computes: a resumed run must have the checkpoint's value
    training_only: bool  # --evaluate refuses it: the model file has its own architecture, nothing is trained
    least: float | None  # the smallest value of a number
    most: float | None  # the largest
    above: float | None  # a bound the number must be above, and finite


FLAGS: dict[str, FlagRole] = {}  # every flag's role, filled as the flags are added; parse_args checks the bounds


def add_flag(group, name, *, of_the_run=True, training_only=True, least=None, most=None, above=None, **options):
    FLAGS[name] = FlagRole(of_the_run, training_only, least, most, above)
    group.add_argument(f"--{name}", **options)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help, with its default where it has one."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


parser = argparse.ArgumentParser(
    description="Meta-learns few-shot Omniglot classification with a memory-augmented LSTM.",
    formatter_class=lambda prog: HelpFormatter(prog, max_help_position=30))
data = parser.add_argument_group("data (OMNIGLOT_DATA names a local npz file, else the Keras cache or a download)")
# An episode needs two classes to tell apart.
add_flag(data, "classes", training_only=False, default=5, type=int, least=2, metavar="N",
         help="Classes (characters) per episode.")
add_flag(data, "images_per_class", training_only=False, default=10, type=int, least=1, metavar="N",
         help="Drawings of each class per episode.")
add_flag(data, "train_episodes", default=10000, type=int, least=1, metavar="N",
         help="Training episodes per epoch, fresh every epoch.")
add_flag(data, "rotations", default=False, action="store_true",
         help="Train also on every character rotated by 90, 180 and 270 degrees, each a new character.")
add_flag(data, "within_alphabet", default=0.0, nargs="?", const=1.0, type=float, least=0, most=1, metavar="SHARE",
         help="Take each training episode's characters from one alphabet, as in Lake's runs; or only SHARE of them.")
add_flag(data, "shift", default=0, type=int, least=0, most=Omniglot.H - 1, metavar="N",
         help="Move every training image by up to N pixels each way, at random.")
add_flag(data, "test_episodes", training_only=False, default=1000, type=int, least=1, metavar="N",
         help="Validation episodes, the same every epoch.")
model_flags = parser.add_argument_group("model")
add_flag(model_flags, "cnn_filters", default="8,16,32", type=filter_counts, metavar="A,B,...",
         help="Filters of the CNN's convolutions, one number a convolution.")
add_flag(model_flags, "cnn_pooling", default=False, action="store_true",
         help="Convolve with stride 1 and 'same' padding, then max-pool by 2: with --cnn_filters=64,64,64,64 the "
              "standard few-shot encoder.")
add_flag(model_flags, "cnn_bfloat16", default=False, action="store_true",
         help="The CNN in bfloat16 (weights float32): faster with AMX or AVX512_BF16; needs AVX512F or AVX_NE_CONVERT.")
add_flag(model_flags, "lstm_dim", default=256, type=int, least=1, metavar="N", help="Units of the LSTM controller.")
add_flag(model_flags, "cell_size", default=40, type=int, least=1, metavar="N", help="Units of one memory cell.")
add_flag(model_flags, "read_heads", default=1, type=int, least=0, metavar="N", help="Memory reads per step.")
add_flag(model_flags, "read_sharpness", default=1.0, type=float, above=0, metavar="X",
         help="Multiplies the cosine similarities before the read's softmax (1: the assignment's).")
add_flag(model_flags, "feature_match", default=False, action="store_true",
         help="Give the controller each image's best cosine with the CNN features of the earlier images.")
add_flag(model_flags, "feature_labels", default=False, action="store_true",
         help="Give the controller the earlier images' labels, weighted by a softmax of their features' cosines "
              "with each image's: a nearest-neighbour vote.")
training = parser.add_argument_group("training")
add_flag(training, "batch_size", training_only=False, default=16, type=int, least=1, metavar="N",
         help="Episodes per batch.")
add_flag(training, "learning_rate", default=0.001, type=float, above=0, metavar="X", help="Adam's learning rate.")
add_flag(training, "learning_rate_decay", default="none", choices=["none", "cosine"],
         help="How the learning rate falls: not at all, or along a cosine to 0 at the last step.")
add_flag(training, "first_occurrence_weight", default=1.0, type=float, above=0, metavar="X",
         help="Weigh the training loss X times at each class's first drawing in an episode: above 1, the model "
              "answers with an unused label more readily, at some cost at the 2nd.")
add_flag(training, "epochs", default=20, type=int, least=1, metavar="N", help="Training epochs.")
add_flag(training, "seed", training_only=False, default=42, type=int, least=0, most=2**32 - 1, metavar="N",
         help="Random seed of the weights and training episodes, 0 to 2**32 - 1.")
add_flag(training, "threads", of_the_run=False, training_only=False, default=None, type=int, least=0, metavar="N",
         help="CPU threads, at most the cores this process may use; 0 for all (default: 0; 1 with --recodex).")
add_flag(training, "checkpoint_dir", of_the_run=False, default=None, metavar="DIR",
         help="Save after every epoch here; the same command run again resumes after the last epoch.")
output = parser.add_argument_group("output")
add_flag(output, "recodex", training_only=False, default=False, action="store_true",
         help="Graded mode: deterministic, one line of metrics per epoch.")
add_flag(output, "logdir", of_the_run=False, default=None, metavar="DIR",
         help="Write TensorBoard logs here: every metric and pictures of validation episodes per epoch.")
add_flag(output, "save_model", of_the_run=False, default=None, metavar="PATH", help="Write the trained model here.")
add_flag(output, "evaluate", of_the_run=False, training_only=False, default=None, metavar="PATH",
         help="Do not train: load this .keras model and print its metrics on --test_episodes episodes.")


# Episodes

# Validation episodes do not depend on --seed, so that runs with different seeds compare on the same episodes.
VALIDATION_SEED = 42


def episode_length(classes, images_per_class):
    """The steps of an episode, one a drawing; the memory has a cell for each."""
    return classes * images_per_class


def previous_labels(labels):
    """The label of each step's previous image, -1 at the first step: `[..., steps]`."""
    return np.pad(labels[..., :-1], [(0, 0)] * (labels.ndim - 1) + [(1, 0)], constant_values=-1)


class EpisodeGenerator:
    """Episodes drawn from `dataset` by a generator seeded with `seed`.

    An episode takes `classes` distinct random characters, the i-th of them
    labelled i (the characters come in random order, so the labels are
    random), `images_per_class` distinct random drawings of each, and shuffles
    these `episode_length(classes, images_per_class)` images. `within_alphabet`:
    the share of episodes (0 to 1) whose characters come from one alphabet, drawn
    uniformly from those of `classes` characters or more (`dataset.alphabets`).
    """

    def __init__(self, dataset, classes, images_per_class, seed, within_alphabet=0.0):
        self._classes, self._images_per_class = classes, images_per_class
        self._rng = np.random.default_rng(seed)

        # drawings[c, :counts[c]] are the indices of the images of character c.
        labels = dataset.data["labels"]
        characters, character_of_image, self._counts = np.unique(labels, return_inverse=True, return_counts=True)
        by_character = np.argsort(character_of_image, kind="stable")
        first_image = np.cumsum(self._counts) - self._counts
        slot = np.arange(len(labels)) - first_image[character_of_image[by_character]]
        self._drawings = np.zeros([len(characters), self._counts.max()], np.int64)
        self._drawings[character_of_image[by_character], slot] = by_character
        if within_alphabet:
            _, self._alphabet_of_character = np.unique(dataset.alphabets[characters], return_inverse=True)
            sizes = np.bincount(self._alphabet_of_character)
            self._alphabets_large_enough = np.flatnonzero(sizes >= classes)
            if not len(self._alphabets_large_enough):
                raise ValueError(f"no alphabet has {classes} characters: the largest has {sizes.max()}")
        self._within_alphabet = within_alphabet

    def sample(self, episodes):
        """Returns `(image_indices, labels)` of `episodes` episodes, each `[episodes, steps]`."""
        classes, per_class = self._classes, self._images_per_class
        # Distinct characters: the first ones of a random permutation (of one alphabet's, the others sorted last).
        keys = self._rng.random([episodes, len(self._counts)])
        if self._within_alphabet:
            alphabets = self._rng.choice(self._alphabets_large_enough, episodes)
            chosen = self._rng.random([episodes, 1]) < self._within_alphabet if self._within_alphabet < 1 else True
            keys[(self._alphabet_of_character[None] != alphabets[:, None]) & chosen] = np.inf
        characters = np.argsort(keys, axis=1)[:, :classes]
        # Distinct drawings of each: the first ones of a random order, with missing drawings sorted last.
        keys = self._rng.random([episodes, classes, self._drawings.shape[1]])
        keys[np.arange(self._drawings.shape[1]) >= self._counts[characters][..., None]] = np.inf
        slots = np.argsort(keys, axis=-1)[..., :per_class]
        indices = np.take_along_axis(self._drawings[characters], slots, axis=-1).reshape(episodes, -1)
        labels = np.repeat(np.arange(classes, dtype=np.int32), per_class)[None].repeat(episodes, axis=0)

        shuffle = np.argsort(self._rng.random(indices.shape), axis=1)
        return np.take_along_axis(indices, shuffle, axis=1), np.take_along_axis(labels, shuffle, axis=1)


def with_rotations(dataset):
    """`dataset` with every character also rotated by 90, 180 and 270 degrees, each rotation a new character.

    Four times the characters, at no cost in data (Santoro et al.); each rotation of an alphabet is one of its own.
    """
    images = dataset.data["images"]
    characters, labels = np.unique(dataset.data["labels"], return_inverse=True)  # 0, 1, ...: no rotation collides
    alphabets = getattr(dataset, "alphabets", None)
    return argparse.Namespace(data={
        "images": np.concatenate([np.rot90(images, quarter, axes=(1, 2)) for quarter in range(4)]),
        "labels": np.concatenate([labels + quarter * len(characters) for quarter in range(4)]),
    }, alphabets=None if alphabets is None else np.concatenate(
        [np.char.add(alphabets[characters], f" rotated by {90 * quarter}") for quarter in range(4)]))


def shifted(images, offsets, shift):
    """`images` `[batch, steps, H, W, C]`, each moved `shift - offsets` pixels down and right (`offsets`
    `[batch, steps, 2]` in 0..2 * shift), blank paper coming in at the edges."""
    padded = tf.pad(images, [[0, 0], [0, 0], [shift, shift], [shift, shift], [0, 0]])
    rows = tf.gather(padded, offsets[..., :1] + tf.range(Omniglot.H, dtype=offsets.dtype), axis=2, batch_dims=2)
    return tf.gather(rows, offsets[..., 1:] + tf.range(Omniglot.W, dtype=offsets.dtype), axis=3, batch_dims=2)


def with_images(batches, dataset, shift=0):
    """Batches of `(image indices, previous labels, labels[, offsets])` as the model's
    `((images, previous labels), labels)`: the images gathered in the graph, with no Python per batch,
    and moved by `shifted` where `shift`."""
    images = tf.constant(dataset.data["images"])

    def gather(indices, previous, labels, offsets=None):
        episode_images = tf.gather(images, indices)
        return (shifted(episode_images, offsets, shift) if shift else episode_images, previous), labels

    return batches.map(gather).prefetch(2)


def validation_batches(dataset, classes, images_per_class, batch_size, episodes):
    """`episodes` episodes of `dataset` in batches: the same ones in every epoch and every run."""
    indices, labels = EpisodeGenerator(dataset, classes, images_per_class, seed=[VALIDATION_SEED, 0]).sample(episodes)
    return with_images(tf.data.Dataset.from_tensor_slices((indices, previous_labels(labels), labels))
                       .batch(batch_size), dataset)


def training_batches(dataset, classes, images_per_class, batch_size, episodes, seed, epochs, shift=0,
                     first_occurrence_weight=1.0, within_alphabet=0.0):
    """The batches of `episodes` fresh episodes an epoch, for each epoch of the `range` `epochs`, one after another.

    An epoch's episodes, and the moves of its images by up to `shift` pixels,
    are drawn with the seed `(seed, epoch)` alone: a resumed run sees the
    epochs it has left as an uninterrupted run does. `fit` needs `steps_per_epoch`.
    With a `first_occurrence_weight` other than 1, each batch also carries the
    loss weights of its steps: that weight at a class's first drawing, 1 elsewhere.
    """
    steps = episode_length(classes, images_per_class)

    def sample(epoch):
        indices, labels = EpisodeGenerator(dataset, classes, images_per_class, [seed, epoch],
                                           within_alphabet).sample(episodes)
        offsets = np.random.default_rng([seed, epoch, 1]).integers(0, 2 * shift + 1, [episodes, steps, 2])
        return indices, previous_labels(labels), labels, offsets

    def epoch_batches(epoch):
        *arrays, offsets = tf.numpy_function(sample, [epoch], [tf.int64, tf.int32, tf.int32, tf.int64])
        # numpy_function forgets shapes; batching needs them back.
        arrays = [tf.ensure_shape(array, (episodes, steps)) for array in arrays]
        arrays.append(tf.ensure_shape(offsets, (episodes, steps, 2)))
        return tf.data.Dataset.from_tensor_slices(tuple(arrays)).batch(batch_size)

    batches = with_images(tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch_batches), dataset, shift)
    if first_occurrence_weight == 1:
        return batches

    # The weighed loss is least where each label not yet seen gets X times the probability the plain one gives
    # it: the model answers "new" with less certainty that nothing earlier matches. Only training is weighed
    # (its loss is the weighed mean); val_loss stays the plain cross-entropy, comparable across runs.
    def with_loss_weights(inputs, labels):
        first = occurrences(labels, classes) == 1
        return inputs, labels, ops.where(first, first_occurrence_weight, 1.0)

    return batches.map(with_loss_weights)


# The metric

OCCURRENCES = [1, 2, 5, 10]  # the occurrences of a class whose accuracy is reported


def occurrences(labels, classes):
    """How many times each step's label has come so far in its episode, this step included: `[episodes, steps]`."""
    one_hot = ops.one_hot(labels, classes)
    return ops.sum(ops.cumsum(one_hot, axis=1) * one_hot, axis=-1)


@keras.saving.register_keras_serializable(package="learning_to_learn")
class NthOccurrenceAccuracy(keras.metrics.Mean):
    """Accuracy on the steps where a class appears for the `nth` time in its episode."""

    def __init__(self, nth, name=None, **kwargs):
        super().__init__(name=name or f"acc{nth}", **kwargs)
        self.nth = nth

    def update_state(self, y_true, y_pred, sample_weight=None):
        # y_true: (batch, steps), y_pred: (batch, steps, classes)
        y_true = ops.cast(y_true, "int32")
        nth = ops.cast(occurrences(y_true, ops.shape(y_pred)[-1]) == self.nth, self.dtype)
        correct = ops.cast(ops.argmax(y_pred, axis=-1) == y_true, self.dtype)
        return super().update_state(correct, sample_weight=nth)

    def get_config(self):
        return {**super().get_config(), "nth": self.nth}


def reported_occurrences(images_per_class):
    """The occurrences in OCCURRENCES that an episode has: a class shows up `images_per_class` times."""
    return [nth for nth in OCCURRENCES if nth <= images_per_class]


# The memory cell

EPSILON = keras.config.epsilon()  # the floor of ops.normalize on a norm


def unit_vectors(x):
    """`ops.normalize(x)` over the last axis, and the inverse norms it used (the backward pass needs them)."""
    inverse_norms = ops.minimum(ops.rsqrt(ops.sum(ops.square(x), axis=-1, keepdims=True)), 1 / EPSILON)
    return x * inverse_norms, inverse_norms


class CellState(NamedTuple):
    """What the cell carries from one step to the next."""
    h: tf.Tensor  # (batch, units): the controller's output
    c: tf.Tensor  # (batch, units): the controller's cell
    read_value: tf.Tensor  # (batch, read_heads * cell_size): the last read of every head
    memory: tf.Tensor  # (batch, memory_cells, cell_size): the newest write first


@keras.saving.register_keras_serializable(package="learning_to_learn")
class MemoryAugmentedLSTM(keras.layers.Layer):
    """An LSTM controller with an external memory of `memory_cells` cells of `cell_size` units.

    Each step the controller reads its input and the previous read value, and
    emits one write value and `read_heads` read keys. A read is a weighted sum
    of the cells, weighted by the softmax over cells of their cosine similarity
    with the key times `read_sharpness`; the write value becomes the first cell
    and the last drops.

    With `read_sharpness=1`, the assignment's read, no cell can weigh more than
    e^2 = 7.389 times any other, as cosines lie in [-1, 1]: among 50 cells even a
    perfect match gets at most 13% of the read. A larger factor lets a read
    pick out the one cell that matches.
    """

    def __init__(self, units, memory_cells, cell_size, read_heads, read_sharpness=1.0, **kwargs):
        super().__init__(**kwargs)
        self.units, self.memory_cells, self.cell_size, self.read_heads = units, memory_cells, cell_size, read_heads
        self.read_sharpness = read_sharpness
        self.read_size = read_heads * cell_size
        # Owns the controller's weights, with Keras's LSTM initializers; `step` spells out its equations.
        self.controller = keras.layers.LSTMCell(units)
        # The write value, then the read keys.
        self.interface_size = (read_heads + 1) * cell_size
        self.interface_layer = keras.layers.Dense(self.interface_size)
        self.output_layer = keras.layers.Dense(units, activation="tanh")
        # CellState with the memory flat: Keras RNN states must be vectors.
        self.state_size = [units, units, self.read_size, memory_cells * cell_size]
        self.output_size = units

    def build(self, input_shape):
        self.input_size = input_shape[-1]
        self.controller.build((None, self.input_size + self.read_size))
        self.interface_layer.build((None, self.units))
        self.output_layer.build((None, self.units + self.read_size))

    def project(self, inputs):
        """The part of the controller's gates that comes from the cell's input alone: it does not recur."""
        return ops.matmul(inputs, self.controller.kernel[:self.input_size]) + self.controller.bias

    def step_weights(self):
        """The weights `step` uses: [h, read value] -> gates, and the interface layer's kernel and bias."""
        recurrent = ops.concatenate([self.controller.recurrent_kernel, self.controller.kernel[self.input_size:]])
        return recurrent, self.interface_layer.kernel, self.interface_layer.bias

    def _read(self, memory, read_keys):
        """Returns the read value (batch, read_size) and the read weights (batch, read_heads, cells)."""
        # memory: (batch, memory_cells, cell_size), read_keys: (batch, read_heads, cell_size)
        similarity = ops.einsum("bhc,bmc->bhm", unit_vectors(read_keys)[0], unit_vectors(memory)[0])
        read_weights = ops.softmax(self.read_sharpness * similarity, axis=-1)
        read_value = ops.matmul(read_weights, memory)  # all heads in one product
        return ops.reshape(read_value, (ops.shape(memory)[0], self.read_size)), read_weights

    def _write(self, memory, write_value):
        # newest write first; the oldest cell drops
        return ops.concatenate([write_value[:, None], memory[:, :-1]], axis=1)

    def step(self, projected_input, state, weights):
        """One step, from `project(input)` (batch, 4 * units) and the `CellState` before it, with `step_weights()`.

        Returns the `CellState` after the step and its `StepActivations`. The
        fused recurrence differentiates these lines by hand
        (`MemoryAugmentedRNN._step_backward`): a change here must be made there too,
        and `tests/test_memory_cell.py` compares the two.
        """
        recurrent_kernel, interface_kernel, interface_bias = weights
        # The controller: an LSTM over the input and the last read value.
        gates = projected_input + ops.matmul(ops.concatenate([state.h, state.read_value], axis=-1), recurrent_kernel)
        input_gate, forget_gate, candidate, output_gate = ops.split(gates, 4, axis=-1)
        gates = [ops.sigmoid(input_gate), ops.sigmoid(forget_gate), ops.tanh(candidate), ops.sigmoid(output_gate)]
        c = gates[1] * state.c + gates[0] * gates[2]
        h = gates[3] * ops.tanh(c)

        # The interface: one write value and a key for each read head. Two tanh: one over the whole product
        # gives other last bits on CPUs, and would move the graded lines.
        interface = ops.matmul(h, interface_kernel) + interface_bias
        write_value, read_keys = ops.tanh(interface[:, :self.cell_size]), ops.tanh(interface[:, self.cell_size:])
        interface = ops.concatenate([write_value, read_keys], axis=-1)
        # An explicit batch size: with --read_heads=0 the keys are empty and -1 could not be inferred.
        read_keys = ops.reshape(read_keys, (ops.shape(h)[0], self.read_heads, self.cell_size))

        # Read the memory as it was, then write.
        read_value, read_weights = self._read(state.memory, read_keys)
        memory = self._write(state.memory, write_value)
        return CellState(h, c, read_value, memory), StepActivations(ops.concatenate(gates, axis=-1), interface,
                                                                    read_weights)

    def call(self, inputs, states, training=None):
        # states: [h (batch, units), c (batch, units), read_value (batch, read_heads * cell_size),
        #          memory (batch, memory_cells * cell_size)]
        h, c, read_value, memory = states
        state = CellState(h, c, read_value, ops.reshape(memory, (-1, self.memory_cells, self.cell_size)))
        state, _ = self.step(self.project(inputs), state, self.step_weights())
        output = self.output_layer(ops.concatenate([state.h, state.read_value], axis=-1))
        flat_memory = ops.reshape(state.memory, (-1, self.memory_cells * self.cell_size))
        return output, [state.h, state.c, state.read_value, flat_memory]

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, memory_cells=self.memory_cells, cell_size=self.cell_size,
                      read_heads=self.read_heads, read_sharpness=self.read_sharpness)
        return config


# The model

def image_features(conv_filters, pooling=False, bfloat16=False, fused=True):
    """The CNN applied to every image on its own: `[images, H, W, C]` -> `[images, features]`.

    The assignment's convolutions have stride 2 and no padding; with `pooling`, each block is the one of
    matching and prototypical networks (Vinyals et al., 2016; Snell et al., 2017): a convolution keeping
    the image's size, then a 2x2 max-pooling. Of stride 1, a convolution has 4 times the outputs to compute.
    Without `fused`, the assignment's CNN normalises with Keras's layer, whose last bits the graded lines hold.
    """
    dtype = "mixed_bfloat16" if bfloat16 else None
    layers = [keras.Input([Omniglot.H, Omniglot.W, Omniglot.C])]
    for filters in conv_filters:
        strides, padding = (1, "same") if pooling else (2, "valid")
        convolution = keras.layers.Conv2D(filters, 3, strides, padding, use_bias=False, dtype=dtype)
        # TensorFlow's fused kernel saves a third of the assignment CNN's time, half of the few-shot CNN's.
        normalization = (FusedBatchNormalization if fused or pooling else keras.layers.BatchNormalization)(dtype=dtype)
        layers += [convolution, normalization, keras.layers.ReLU(dtype=dtype)]
        if pooling:
            layers.append(keras.layers.MaxPooling2D(2, dtype=dtype))
    to_float32 = [keras.layers.Activation("linear", dtype="float32")] if bfloat16 else []  # the features
    return keras.Sequential(layers + [keras.layers.Flatten(dtype=dtype)] + to_float32, name="image_features")


def earlier_cosines(features):
    """The cosine of each step's image features `[episodes, steps, features]` with every step's,
    `[episodes, steps, steps]`, and which of them came earlier in the episode, `[steps, steps]`."""
    units = unit_vectors(features)[0]
    return ops.einsum("btf,buf->btu", units, units), np.tri(features.shape[1], k=-1, dtype=bool)


def best_earlier_match(features):
    """Each step's largest cosine similarity between its image's features `[episodes, steps, features]` and those
    of the earlier images of its episode, `[episodes, steps, 1]`: 0 at the first step, where nothing came before.

    Unlike a read, it needs no memory: all images of an episode are known from the start.
    A CNN ending in a ReLU has no negative features, so no cosine lies below 0.
    """
    similarity, earlier = earlier_cosines(features)
    return ops.max(ops.where(earlier, similarity, 0.0), axis=-1, keepdims=True)


@keras.saving.register_keras_serializable(package="learning_to_learn")
class EarlierLabelVote(keras.layers.Layer):
    """Each step's vote `[episodes, steps, classes]` among the labels of its episode's earlier images: a softmax
    over them of a learned `sharpness` times the cosine of their features `[episodes, steps, features]` with
    the step's own, 0 at the first step.

    The label of image u enters as the previous label of step u + 1, so a step votes only with labels it
    has been given. Trained through the vote, the CNN is pushed to put the drawings of one character
    together, as in matching networks (Vinyals et al., 2016).
    """

    def __init__(self, classes, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes

    def build(self, input_shape):
        # Cosines lie in [0, 1]: times 1 the softmax would be nearly even whatever matches.
        self.sharpness = self.add_weight(shape=(), initializer=keras.initializers.Constant(10.0), name="sharpness")

    def call(self, features, previous_labels):
        similarity, earlier = earlier_cosines(features)
        weights = ops.softmax(ops.where(earlier, self.sharpness * similarity, -1e9), axis=-1)
        weights = ops.where(earlier, weights, 0.0)  # the first step, with nothing earlier, votes for nothing
        labels = ops.one_hot(previous_labels[:, 1:], self.classes)  # image u's label; the last image's is unused
        labels = ops.pad(labels, [[0, 0], [0, 1], [0, 0]])
        return ops.einsum("btu,buc->btc", weights, labels)

    def get_config(self):
        config = super().get_config()
        config.update(classes=self.classes)
        return config


def cell_inputs(features, previous_labels, classes, feature_match=False, vote=None):
    """The cell's input at each step of episodes of image `features` `[episodes, steps, features]` and their
    `previous_labels`: the features, the one-hot previous label (zeros for -1), with `feature_match` the best
    earlier match, with an `EarlierLabelVote` its vote. A step's input depends on it and earlier steps alone."""
    inputs = ops.concatenate([features, ops.one_hot(previous_labels, classes)], axis=-1)
    if feature_match:
        inputs = ops.concatenate([inputs, best_earlier_match(features)], axis=-1)
    if vote is not None:
        inputs = ops.concatenate([inputs, vote(features, previous_labels)], axis=-1)
    return inputs


def build_model(classes, images_per_class, cnn_filters=(8, 16, 32), cnn_pooling=False, cnn_bfloat16=False,
                lstm_dim=256, cell_size=40, read_heads=1, read_sharpness=1.0, feature_match=False,
                feature_labels=False, fused=True):
    """The model of episodes of `classes` x `images_per_class` steps, not compiled: CNN, memory cell, softmax at
    every step. The defaults are the assignment's; each argument is the flag of its name. `fused=False` runs the
    cell with plain `keras.layers.RNN`, step by step with automatic gradients, and the assignment's CNN normalising
    in Keras's layers, as deterministic (graded) runs do: the same function, slower."""
    steps = episode_length(classes, images_per_class)
    images = keras.Input([steps, Omniglot.H, Omniglot.W, Omniglot.C], name="images")
    labels = keras.Input([steps], dtype="int32", name="previous_labels")

    # One pass of the CNN over all images of the batch, then back to episodes.
    cnn = image_features(cnn_filters, cnn_pooling, cnn_bfloat16, fused and not is_op_determinism_enabled())
    features = cnn(ops.reshape(images, (-1, Omniglot.H, Omniglot.W, Omniglot.C)))
    features = ops.reshape(features, (-1, steps, features.shape[-1]))
    vote = EarlierLabelVote(classes, name="earlier_label_vote") if feature_labels else None
    inputs = cell_inputs(features, labels, classes, feature_match, vote)

    cell = MemoryAugmentedLSTM(lstm_dim, memory_cells=steps, cell_size=cell_size, read_heads=read_heads,
                               read_sharpness=read_sharpness)
    recurrence = MemoryAugmentedRNN if fused else keras.layers.RNN
    outputs = recurrence(cell, return_sequences=True)(inputs)
    predictions = keras.layers.Dense(classes, activation="softmax")(outputs)
    return keras.Model([images, labels], predictions)


# Training

def steps_per_epoch(train_episodes, batch_size):
    """Training batches an epoch: the last one may hold fewer episodes."""
    return math.ceil(train_episodes / batch_size)


def model_for_training(args, fused=True):
    """`build_model` of the flags `args`, compiled for their training: Adam, at a rate that with
    --learning_rate_decay=cosine falls along a cosine to 0 at the last step."""
    model = build_model(args.classes, args.images_per_class, cnn_filters=args.cnn_filters, cnn_pooling=args.cnn_pooling,
                        cnn_bfloat16=args.cnn_bfloat16, lstm_dim=args.lstm_dim, cell_size=args.cell_size,
                        read_heads=args.read_heads, read_sharpness=args.read_sharpness,
                        feature_match=args.feature_match, feature_labels=args.feature_labels, fused=fused)
    learning_rate = args.learning_rate
    if args.learning_rate_decay == "cosine":
        # A function of the optimizer's step count, which checkpoints keep: a resumed run goes on along the curve.
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=args.epochs * steps_per_epoch(args.train_episodes, args.batch_size))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), **loss_and_metrics(args.images_per_class))
    return model


def loss_and_metrics(images_per_class):
    """What `compile` needs besides the optimizer, for episodes of `images_per_class` drawings of each class. XLA
    compiles the recurrence's loops alone (MemoryAugmentedRNN): TensorFlow's own CPU kernels convolve faster."""
    nth_occurrences = [NthOccurrenceAccuracy(nth) for nth in reported_occurrences(images_per_class)]
    return dict(loss=keras.losses.SparseCategoricalCrossentropy(), jit_compile=False,
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc"), *nth_occurrences])


def main(args, callbacks=()):
    """Trains as `args` say, or evaluates; returns the last epoch's metrics by name. `callbacks` join fit's."""
    threads = min(int(args.recodex) if args.threads is None else args.threads, usable_cores())  # more wait their turn
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    keras.utils.set_random_seed(args.seed)  # seeds the weight initializers too
    if args.recodex:
        tf.config.experimental.enable_op_determinism()

    omniglot = Omniglot()
    check_episodes_fit(args, omniglot)
    checkpoint = EpochCheckpoint(args.checkpoint_dir, run_flags(args)).claim() if args.checkpoint_dir else None
    names = metric_names(args.images_per_class)
    validation = validation_batches(omniglot.test, args.classes, args.images_per_class, args.batch_size,
                                    args.test_episodes)
    verbose = 0 if args.recodex else "auto"

    if args.evaluate:
        model = load_trained_model(args.evaluate, args.classes, args.images_per_class)
        logs = model.evaluate(validation, return_dict=True, verbose=verbose)
        print(f"Test {metrics_line(logs, names)}", flush=True)
        return {name: float(value) for name, value in logs.items()}

    model = model_for_training(args)
    initial_epoch = checkpoint.restore(model) if checkpoint else 0
    callbacks = [StopOnDivergence(), *callbacks] + ([checkpoint] if checkpoint else [])
    if args.logdir:
        callbacks += [keras.callbacks.TensorBoard(args.logdir), EpisodePictures(args.logdir, next(iter(validation)))]
    if args.recodex:
        callbacks.append(GradedEpochLine(args.epochs, names))

    train = training_batches(with_rotations(omniglot.train) if args.rotations else omniglot.train,
                             args.classes, args.images_per_class, args.batch_size, args.train_episodes,
                             args.seed, epochs=range(initial_epoch, args.epochs), shift=args.shift,
                             first_occurrence_weight=args.first_occurrence_weight, within_alphabet=args.within_alphabet)
    with told_what_is_kept(checkpoint, args.save_model):
        # shuffle=False: the episodes are drawn at random already, and a tf.data input cannot be shuffled by fit.
        history = model.fit(train, epochs=args.epochs, initial_epoch=initial_epoch,
                            steps_per_epoch=steps_per_epoch(args.train_episodes, args.batch_size),
                            shuffle=False, validation_data=validation, verbose=verbose, callbacks=callbacks)
        if args.save_model:
            save_uncompiled(model, args.save_model)
    return {name: float(values[-1]) for name, values in history.history.items()}


# Long runs
#
# What keeps an hour of training from being lost or silently wrong: flags and
# write places checked before any work, the memory a run needs, a checkpoint
# after every epoch that knows its run, divergence and signals ending the run
# with one line that says what is kept, and saved models loaded with care.

def defaults():
    """Every flag's default value, as parsed."""
    return vars(parser.parse_args([]))


def parse_args(argv=None):
    """The flags of `argv` (default: the command line), checked: a bad one ends the program as argparse does."""
    args = parser.parse_args(argv)

    def refuse(flag, reason):
        value = getattr(args, flag)
        parser.error(f"argument --{flag}: invalid value {f'{value:g}' if isinstance(value, float) else value}: "
                     f"{reason}")

    def refuse_path(flag, reason):
        parser.error(f"argument --{flag}: invalid path {getattr(args, flag)!r}: {reason}")

    for flag, role in FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if role.least is not None and value < role.least:
            refuse(flag, f"must be at least {role.least}")
        # A count with no bound of its own is at most 2**31 - 1: TensorFlow's shapes and counts are int32.
        most = role.most if role.most is not None else 2**31 - 1 if type(value) is int else None
        if most is not None and value > most:
            refuse(flag, f"must be at most {most}")
        if role.above is not None and not role.above < value < math.inf:  # nan too
            refuse(flag, f"must be a finite number above {role.above}")

    default = defaults()
    if args.evaluate and (ignored := [f"--{flag}" for flag, role in FLAGS.items()
                                      if role.training_only and getattr(args, flag) != default[flag]]):
        parser.error(f"argument --evaluate: it only evaluates the saved model, so {', '.join(ignored)} "
                     "would be ignored: leave them out")
    convolutions = len(args.cnn_filters)
    if image_side(convolutions, args.cnn_pooling) < 1:
        most = max(layers for layers in range(1, 10) if image_side(layers, args.cnn_pooling) >= 1)
        parser.error(f"argument --cnn_filters: invalid value {','.join(map(str, args.cnn_filters))!r}: "
                     f"{convolutions} convolutions leave no pixel of a {Omniglot.H}x{Omniglot.W} image; at most "
                     f"{most} {'with' if args.cnn_pooling else 'without'} --cnn_pooling")

    if args.save_model and not args.save_model.endswith(".keras"):
        refuse_path("save_model", "expected a name ending in .keras")
    if args.save_model and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_model))):
        refuse_path("save_model", "its folder does not exist")
    if args.evaluate and not os.path.exists(args.evaluate):
        refuse_path("evaluate", "no such file")
    # A folder, a named pipe or a device: reading one waits forever or never ends, replacing one fails at the end.
    for flag, path in [("evaluate", args.evaluate), ("save_model", args.save_model),
                       *[("checkpoint_dir", os.path.join(args.checkpoint_dir, name)) for name in CHECKPOINT_FILES
                         if args.checkpoint_dir]]:
        if path and (kind := not_a_file(path)):
            refuse_path(flag, f"{'its ' + os.path.basename(path) if flag == 'checkpoint_dir' else 'it'} is {kind}, "
                              "not a file")
    for flag in ["checkpoint_dir", "logdir"]:
        folder = getattr(args, flag)
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            refuse_path(flag, "it exists and is not a folder")
    # Tried now, not found out after an hour of training.
    for flag, folder in [("save_model", os.path.dirname(os.path.abspath(args.save_model or "."))),
                         ("checkpoint_dir", args.checkpoint_dir), ("logdir", args.logdir)]:
        if getattr(args, flag) and (problem := unwritable(folder)):
            refuse_path(flag, problem)
    for package in ["tensorboard", "matplotlib"]:  # the logs and the episode pictures
        if args.logdir and importlib.util.find_spec(package) is None:
            parser.error(f"argument --logdir: needs the {package} package: pip install {package}")

    if args.cnn_bfloat16 and (problem := bfloat16_convolutions_problem()):
        parser.error(f"argument --cnn_bfloat16: {problem}: TensorFlow's own bfloat16 kernels would convolve, slower "
                     "than in float32 and with weight gradients up to a third off; leave it out")
    if reported_occurrences(args.images_per_class) != OCCURRENCES:
        print(f"Note: with --images_per_class={args.images_per_class} no class appears {OCCURRENCES[-1]} times "
              f"in an episode: only {', '.join(metric_names(args.images_per_class))} are reported.", file=sys.stderr)
    needs, limits = memory_needed(args), memory_limits()
    total = sum(size for *_, size in needs)
    if limits and total > (left := min(limits))[0]:
        what, flags, size = max(needs, key=lambda need: need[2])
        parser.error(f"argument{'s' * (len(flags) > 1)} {', '.join(f'--{flag}' for flag in flags)}: {what} need "
                     f"about {size / 2**30:.1f} GiB, the run {total / 2**30:.1f} GiB in all, more than the "
                     f"{max(left[0], 0) / 2**30:.1f} GiB left of {left[1]}")
    return args


def cpu_flags():
    """The feature flags of this machine's CPU, as Linux names them in /proc/cpuinfo; None where unknown."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return None


# The instruction sets below which oneDNN has no bfloat16 convolutions, as ONEDNN_MAX_CPU_ISA names them.
ONEDNN_ISAS_WITHOUT_BFLOAT16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI"}


def bfloat16_convolutions_problem():
    """Why --cnn_bfloat16 would be slow and imprecise here, in words; None where it is not.

    TensorFlow hands bfloat16 convolutions to oneDNN, which sums in float32 (storing bfloat16), on a CPU with
    AVX512F or AVX_NE_CONVERT. Elsewhere its own kernels run them, summing in bfloat16: slower than float32 and
    with weight gradients up to a third off (tests/test_model.py compares both with float32 sums).
    """
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower() in ("0", "false"):
        return "TF_ENABLE_ONEDNN_OPTS turns oneDNN off"
    flags = cpu_flags()
    if flags is not None and not flags & {"avx512f", "avx_ne_convert"}:
        return "this CPU has neither AVX512F nor AVX_NE_CONVERT"
    if (isa := os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()) in ONEDNN_ISAS_WITHOUT_BFLOAT16:
        # TensorFlow asks the CPU, not the cap: oneDNN would then fail on the first convolution.
        return f"ONEDNN_MAX_CPU_ISA={isa} leaves oneDNN no bfloat16 convolutions"
    return None


def image_side(convolutions, pooling):
    """How many pixels a side of the image keeps after the CNN's `convolutions`."""
    side = Omniglot.H
    for _ in range(convolutions):
        side = side // 2 if pooling else (side - 3) // 2 + 1
    return side


def memory_needed(args):
    """About the bytes a run holds at its peak, less TensorFlow's own: `[(what, the flags that size it, bytes)]`.

    A lower bound: a run refused for it could not have run. The episodes count the release's characters.
    """
    steps = episode_length(args.classes, args.images_per_class)
    batch = min(args.batch_size, max(args.train_episodes, args.test_episodes))
    # Training keeps each step's memory, read weights and controller state for the backward pass, 4 bytes a number,
    side, activations = Omniglot.H, 3 * steps * args.cell_size + 3 * args.read_heads * steps + 16 * args.lstm_dim
    for filters in args.cnn_filters:  # and about 4 arrays an image a convolution: its output, normalised, rectified
        side = side if args.cnn_pooling else (side - 3) // 2 + 1  # and its gradient
        activations += 4 * side * side * filters
        side = side // 2 if args.cnn_pooling else side
    # Drawing episodes sorts a random key for each character in each episode, 16 bytes with its rank, and keeps
    # each step's image, labels and move.
    characters = {split: count * (4 if args.rotations and split == "train" else 1)
                  for split, count in Omniglot.CHARACTERS.items()}
    episodes = {split: count * (characters[split] * 16 + steps * 40)
                for split, count in [("train", 0 if args.evaluate else args.train_episodes),
                                     ("test", args.test_episodes)]}
    # The controller's and the convolutions' weights; Adam keeps two more of each, and training a gradient.
    features = args.cnn_filters[-1] * image_side(len(args.cnn_filters), args.cnn_pooling) ** 2
    reads, channels = args.read_heads * args.cell_size, (1, *args.cnn_filters)
    weights = (4 * args.lstm_dim * (features + args.classes + 2 + reads + args.lstm_dim)
               + args.lstm_dim * (reads + args.cell_size) + (args.lstm_dim + reads) * args.lstm_dim
               + sum(9 * before * after for before, after in zip(channels[:-1], channels[1:], strict=True)))
    images = (sum(characters.values())) * 20 * Omniglot.H * Omniglot.W * 4
    return [("the memory states of a batch", ["classes", "images_per_class", "batch_size", "cell_size", "lstm_dim",
                                              "read_heads", "cnn_filters"], 4 * steps * batch * activations),
            ("a training epoch's episodes", ["train_episodes"], episodes["train"]),
            ("the validation episodes", ["test_episodes"], episodes["test"]),
            ("the model's weights", ["lstm_dim", "cell_size", "read_heads", "cnn_filters"], 4 * 4 * weights),
            ("the images", ["rotations"], images)]


CGROUP_ROOT, OWN_CGROUP, OWN_STATUS = "/sys/fs/cgroup", "/proc/self/cgroup", "/proc/self/status"


def memory_limits():
    """`[(bytes left, what limits them)]`: the machine's RAM and the cgroup's limit less what this process holds,
    the address space limit (`ulimit -v`) less what it maps. Empty where none is known."""
    status = {}
    with contextlib.suppress(OSError), open(OWN_STATUS) as lines:
        status = dict(line.split(":", 1) for line in lines if ":" in line)
    resident, mapped = (int(status.get(key, "0 kB").split()[0]) * 1024 for key in ["VmRSS", "VmSize"])
    limits = []
    with contextlib.suppress(ValueError, OSError, AttributeError):
        limits.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") - resident, "this machine's RAM"))
    if cgroup := cgroup_memory_limit():
        limits.append((cgroup[0] - resident, f"the cgroup's memory limit ({cgroup[1]})"))
    with contextlib.suppress(ImportError):  # Windows has no resource module
        import resource

        address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
        if address_space != resource.RLIM_INFINITY:
            limits.append((address_space - mapped, "the address space limit RLIMIT_AS (ulimit -v)"))
    return limits


def cgroup_memory_limit():
    """This process's cgroup memory limit and the file that sets it, `(bytes, path)`, or None: cgroup v2's
    memory.max, v1's memory.limit_in_bytes (whose "no limit" is near 2**63)."""
    with contextlib.suppress(OSError), open(OWN_CGROUP) as lines:
        for line in lines.read().splitlines():
            _, controllers, group = line.split(":", 2)
            if controllers == "":
                paths = [f"{CGROUP_ROOT}{group}/memory.max", f"{CGROUP_ROOT}/memory.max"]
            elif "memory" in controllers.split(","):
                paths = [f"{CGROUP_ROOT}/memory{group}/memory.limit_in_bytes",
                         f"{CGROUP_ROOT}/memory/memory.limit_in_bytes"]
            else:
                continue
            for path in paths:
                with contextlib.suppress(OSError, ValueError), open(path) as file:
                    limit = file.read().strip()
                    if limit != "max" and int(limit) < 2**62:
                        return int(limit), os.path.normpath(path)
    return None


def check_episodes_fit(args, omniglot):
    """Refuses, as argparse does, episodes that a split cannot fill."""
    for split in ["train", "test"]:
        labels = getattr(omniglot, split).data["labels"]
        characters, drawings = np.unique(labels, return_counts=True)
        if args.classes > len(characters):
            parser.error(f"argument --classes: invalid value {args.classes}: "
                         f"the {split} split has only {len(characters)} characters")
        if args.images_per_class > drawings.min():
            parser.error(f"argument --images_per_class: invalid value {args.images_per_class}: "
                         f"some characters of the {split} split have only {drawings.min()} drawings")
    if args.within_alphabet:
        if omniglot.train.alphabets is None:
            raise DataError(f"--within_alphabet needs each character's alphabet, and {omniglot.path} names none: "
                            f"put a {ALPHABETS_FILE} of the columns split, label and alphabet beside it, or remove "
                            "it and unset OMNIGLOT_DATA: the next run downloads the data set, which names them")
        largest = np.unique(omniglot.train.alphabets, return_counts=True)[1].max()
        if args.classes > largest:
            parser.error(f"argument --classes: invalid value {args.classes}: with --within_alphabet at most "
                         f"{largest}, the characters of the train split's largest alphabet")


class RunEnded(Exception):
    """Training ended before its end: a write failed, the loss diverged, or the user interrupted it."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt."""


signals_received = []  # TensorFlow turns an exception raised inside its own calls into another: remember the cause


def interrupt(signal_number, frame):
    signals_received.append(signal_number)
    raise Terminated if signal_number == signal.SIGTERM else KeyboardInterrupt


def raise_swallowed_interruption():
    """Raises the interruption a signal began where TensorFlow caught it on the way: in a thread of tf.data's it
    ends fit's or evaluate's epoch early, as if the episodes ran out."""
    if signals_received:
        raise Terminated if signals_received[-1] == signal.SIGTERM else KeyboardInterrupt


def print_unless_interrupted(kind, error, traceback):
    """`sys.excepthook`, which C code calls to print an exception it caught: after a signal that is the
    interruption in another form (TensorFlow printed a SystemError so), and the program's last line says it."""
    if not signals_received:
        sys.__excepthook__(kind, error, traceback)


def leave(status, message):
    """Ends the program with one line on stderr, at once: a run that ends early leaves TensorFlow's threads still
    feeding batches, and the interpreter's usual exit tears down what they use under them (a segmentation fault,
    now and then, instead of the status)."""
    sys.stdout.flush()
    print(f"{parser.prog}: {message}", file=sys.stderr, flush=True)
    os._exit(status)


def interruption_status(error):
    """130 or 143 where `error` is an interruption, or the form TensorFlow gave one; None where it is not."""
    if isinstance(error, KeyboardInterrupt):
        return 143 if isinstance(error, Terminated) else 130
    if signals_received and isinstance(error, Exception):
        return 143 if signals_received[-1] == signal.SIGTERM else 130
    return None


class StopOnDivergence(keras.callbacks.Callback):
    """Ends training at the first batch whose loss is not finite or above -ln(epsilon) = 16.1, the loss of
    answering every step with certainty and wrongly: such a model will not come back.

    `keras.callbacks.TerminateOnNaN` catches NaN and infinity only, and a loss computed from the softmax's
    logits, as Keras does, diverges to large finite values too (1e10 at --learning_rate=1e9).
    """

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = float(logs["loss"])
        if not loss <= -math.log(EPSILON):
            raise RunEnded(f"training diverged in epoch {self.epoch + 1}: the loss was {loss:.4g} after batch "
                           f"{batch + 1}; a smaller --learning_rate is the likely cure")


def run_flags(args):
    """The flags that make a run what it is: those of its model, its episodes and its training."""
    return {flag: getattr(args, flag) for flag, role in FLAGS.items() if role.of_the_run}


def differing_flags(saved, current):
    """The flags in which two runs differ, in words."""
    def text(value):
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    # A flag newer than the checkpoint had its default value there.
    saved = {flag: saved.get(flag, defaults()[flag]) for flag in current}
    # Without a decaying learning rate, nothing depends on --epochs: more epochs continue the same run.
    ignored = ["epochs"] if saved["learning_rate_decay"] == current["learning_rate_decay"] == "none" else []
    return [f"--{flag} {text(saved[flag])} in the checkpoint, {text(value)} now"
            for flag, value in current.items() if flag not in ignored and saved[flag] != value]


CHECKPOINT_FILES = ["checkpoint.npz", "lock"]  # what a checkpoint folder holds


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch, saves the weights, the optimizer state, the run's flags and the number of epochs
    done into one npz file, replaced atomically: a kill leaves the last epoch's file or the one before.

    `keras.callbacks.BackupAndRestore` keeps the epoch in a second file, which a kill can tear from the
    weights, and knows no flags. The file is written by numpy rather than h5py, which can crash the
    process when the disk fills. A lock, held while the run trains, keeps a second run out of the folder.
    """

    def __init__(self, directory, run):
        super().__init__()
        self.directory, self.run, self.saved = directory, run, None
        self.path, self.lock_path = (os.path.join(directory, name) for name in CHECKPOINT_FILES)

    def claim(self):
        """Locks the folder for this process, checks that a checkpoint in it is one of this run, and removes what
        killed writes left; returns itself."""
        os.makedirs(self.directory, exist_ok=True)
        for path in [self.path, self.lock_path]:  # as parse_args does: either may have changed since
            if kind := not_a_file(path):
                raise DataError(f"{path} is {kind}, not a file: choose another --checkpoint_dir")
        self.lock = open(self.lock_path, "w")  # the kernel releases it when we die
        try:
            with contextlib.suppress(ImportError):  # Windows has no fcntl: its folders go unlocked
                import fcntl

                fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another run is training into {self.directory}: let it finish, "
                            "or choose another --checkpoint_dir") from None
        if os.path.exists(self.path):
            try:
                self.saved = self.read()
            except Exception as error:
                raise self.refusal(error) from None
            if differences := differing_flags(self.saved[0], self.run):
                raise DataError(f"{self.directory} holds a run of other flags ({'; '.join(differences)}): run its "
                                "original command to continue it, or choose another --checkpoint_dir to start anew")
        for leftover in leftovers(self.path):
            os.remove(leftover)
        return self

    def refusal(self, reason):
        return DataError(f"cannot read the checkpoint {self.path} ({reason}); "
                         "choose another --checkpoint_dir to start anew")

    def read(self):
        """`(run, epochs, arrays)` of the checkpoint file, each held to what `on_epoch_end` writes: a ValueError
        says what differs. The arrays' shapes are the model's to check, in `restore`."""
        if not zipfile.is_zipfile(self.path):
            raise ValueError("not an npz file")
        with np.load(self.path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
        count = len(set(arrays) - {"run", "epochs"})
        if set(arrays) != {"run", "epochs", *[f"variable_{index}" for index in range(count)]}:
            raise ValueError(f"it holds {', '.join(sorted(arrays))}; expected run, epochs and variable_0 onwards")
        run, epochs = arrays.pop("run"), arrays.pop("epochs")
        if run.shape or run.dtype.kind != "U" or not isinstance(run := json.loads(str(run)), dict):
            raise ValueError("its run is not a JSON object of flags")
        for flag, value in run.items():
            expected = self.run.get(flag)
            if type(value) is bool and type(expected) is float:  # an earlier version's switch, now a share
                run[flag] = value = float(value)
            if flag in self.run and not (type(value) is type(expected) and (
                    not isinstance(value, list) or all(type(item) is int for item in value))):
                raise ValueError(f"its run's --{flag} is {value!r}, not of the type of {expected!r}")
        most = run.get("epochs", defaults()["epochs"])
        if epochs.shape or epochs.dtype.kind not in "iu" or not 0 <= int(epochs) <= most:
            raise ValueError(f"its epochs are {epochs.tolist()!r}; expected a whole number from 0 to {most}")
        if strange := [name for name, array in arrays.items() if array.dtype.kind not in "fiu"]:
            raise ValueError(f"{', '.join(strange)} hold no numbers")
        return run, int(epochs), [arrays[f"variable_{index}"] for index in range(count)]

    @staticmethod
    def variables(model):
        """What a checkpoint holds, in the order it is saved and restored: every weight, then Adam's state."""
        return model.weights + model.optimizer.variables

    def restore(self, model):
        """Loads the claimed checkpoint, if any, into `model`; returns the number of epochs it has done."""
        if self.saved is None:
            return 0
        _, epochs, arrays = self.saved
        model.optimizer.build(model.trainable_variables)
        variables = self.variables(model)
        if len(arrays) != len(variables):
            raise self.refusal(f"it holds {len(arrays)} arrays of weights and optimizer state, this model "
                               f"{len(variables)}")
        for index, (array, variable) in enumerate(zip(arrays, variables, strict=True)):
            if array.shape != tuple(variable.shape) or array.dtype != variable.dtype:
                raise self.refusal(f"its variable_{index} is {array.dtype} {array.shape}, this model's "
                                   f"{variable.dtype} {tuple(variable.shape)}")
        if not all(np.isfinite(array).all() for array in arrays):
            raise self.refusal("it holds numbers that are not finite: it is damaged")
        for variable, array in zip(variables, arrays, strict=True):
            variable.assign(array)
        if epochs >= self.run["epochs"]:
            print(f"{epochs} epochs are done in {self.directory}: nothing to train.", file=sys.stderr)
        return epochs

    def on_epoch_end(self, epoch, logs=None):
        arrays = {f"variable_{index}": variable.numpy()
                  for index, variable in enumerate(self.variables(self.model))}
        try:
            write_atomically(self.path, lambda path: np.savez(path, run=json.dumps(self.run), epochs=epoch + 1,
                                                              **arrays), suffix=".npz")
        except OSError as error:
            raise RunEnded(f"cannot write the checkpoint {self.path} ({error.strerror})") from None

    def epochs_on_disk(self):
        """The epochs done that the checkpoint file holds now, read back: 0 where none is there to resume."""
        if not_a_file(self.path):
            return 0
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                return int(saved["epochs"])
        except Exception:  # gone, or not what a run wrote
            return 0

    def kept(self):
        """What a run that ends now leaves on disk for the next one, in words."""
        if epochs := self.epochs_on_disk():
            return f"{self.path} keeps epoch {epochs}: run the same command to resume"
        return f"no epoch is saved in {self.directory}"


@contextlib.contextmanager
def told_what_is_kept(checkpoint, model_path=None):
    """Turns an early end of training (an interruption, a RunEnded) into a RunEnded that says what is on disk at
    that moment, read back: the epochs the checkpoint holds, and the model if this run wrote it."""
    started = time.time()

    def kept():
        words = [checkpoint.kept() if checkpoint else "nothing was saved"]
        if model_path and not not_a_file(model_path) and os.path.exists(model_path) \
                and os.path.getmtime(model_path) >= started:
            words = [f"the trained model is in {model_path}"] + (words if checkpoint else [])
        return "; ".join(words)

    try:
        yield
        raise_swallowed_interruption()
    except RunEnded as ended:
        raise RunEnded(f"{ended}; {kept()}", ended.status) from None
    except (MemoryError, tf.errors.ResourceExhaustedError):  # more than memory_needed's lower bound
        raise RunEnded(f"training ran out of memory: a smaller --batch_size or model needs less; {kept()}") from None
    except BaseException as error:
        if (status := interruption_status(error)) is None:
            raise
        if checkpoint and (epochs := checkpoint.epochs_on_disk()):
            raise RunEnded(f"interrupted after epoch {epochs}; run the same command to resume", status) from None
        raise RunEnded(f"interrupted; {kept()}", status) from None


def save_uncompiled(model, path):
    """Writes `model` to `path` atomically, without its optimizer: Adam's state is twice the weights' size,
    resuming a run is the checkpoint's job, and `load_trained_model` compiles what it loads."""
    uncompiled = keras.Model(model.inputs, model.outputs, name=model.name)  # the same layers and weights
    try:
        write_atomically(path, uncompiled.save, suffix=".keras")
    except OSError as error:
        raise RunEnded(f"cannot write the model {path} ({error.strerror})") from None


def load_trained_model(path, classes=None, images_per_class=None):
    """Loads a model saved by --save_model, compiled for evaluation, refusing other files and, where given,
    models of other episodes."""
    try:
        model = keras.models.load_model(path, compile=False)  # an optimizer it was saved with is of no use here
    except Exception as error:
        raise DataError(f"{path} is not a model saved by this program ({error})") from None
    if not any(isinstance(getattr(layer, "cell", None), MemoryAugmentedLSTM) for layer in model.layers):
        raise DataError(f"{path} is a Keras model but not one of this program: it has no MemoryAugmentedLSTM")
    steps, model_classes = model.inputs[0].shape[1], model.outputs[0].shape[-1]
    if classes and (steps, model_classes) != (episode_length(classes, images_per_class), classes):
        raise DataError(f"{path} was trained on episodes of --classes={model_classes} "
                        f"--images_per_class={steps // model_classes}: evaluate it with those flags")
    model.compile(**loss_and_metrics(steps // model_classes))
    return model


# The graded lines
#
# `--recodex` prints one line of every metric an epoch, in the order a grader compares; `--evaluate` one
# line of the same.

def metric_names(images_per_class):
    """The metrics that training reports, in the order of the graded lines (each also with `val_` before it)."""
    return ["loss", "acc"] + [f"acc{nth}" for nth in reported_occurrences(images_per_class)]


def metrics_line(logs, names):
    return " - ".join(f"{name}: {logs[name]:.4f}" for name in names)


class GradedEpochLine(keras.callbacks.Callback):
    """Prints `Epoch 1/3 loss: ... - val_acc10: ...`, the metrics in a fixed order (Keras sorts its own)."""

    def __init__(self, epochs, names):
        super().__init__()
        self.epochs, self.names = epochs, names + [f"val_{name}" for name in names]

    def on_epoch_end(self, epoch, logs=None):
        print(f"Epoch {epoch + 1}/{self.epochs} {metrics_line(logs, self.names)}", flush=True)


# TensorBoard's pictures

def episode_figure(images, labels, guesses, classes):
    """A matplotlib figure of one episode: every image in order, and under it the how-many-th occurrence of its
    class (grey), its label (black) and the model's guess (green, or red with the image framed in red if wrong)."""
    from matplotlib.figure import Figure  # only --logdir needs matplotlib

    figure = Figure(figsize=(0.4 * len(labels), 1.2), dpi=100)
    figure.subplots_adjust(left=0, right=1, top=1, bottom=0.4, wspace=0.1)
    steps = zip(figure.subplots(1, len(labels), squeeze=False)[0], images, labels, guesses,
                ops.convert_to_numpy(occurrences(labels[None], classes))[0], strict=True)
    for axes, image, label, guess, occurrence in steps:
        axes.imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=1)  # dark ink on white paper
        axes.set(xticks=[], yticks=[])
        if guess != label:
            for spine in axes.spines.values():
                spine.set(color="red", linewidth=2)
        for row, (number, colour) in enumerate([(int(occurrence), "grey"), (label, "black"),
                                                (guess, "green" if guess == label else "red")]):
            axes.text(0.5, -0.1 - 0.3 * row, str(number), color=colour, fontsize=8, ha="center", va="top",
                      transform=axes.transAxes)
    return figure


def figure_pixels(figure):
    """The RGB pixels of a matplotlib figure: `[height, width, 3]` uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


class EpisodePictures(keras.callbacks.Callback):
    """After every epoch, writes pictures of the first `count` episodes of a validation batch to TensorBoard."""

    def __init__(self, logdir, batch, count=3):
        super().__init__()
        (images, previous), labels = keras.tree.map_structure(np.asarray, batch)
        self.inputs, self.labels = (images[:count], previous[:count]), labels[:count]
        self.writer = tf.summary.create_file_writer(os.path.join(logdir, "episodes"))

    def on_epoch_end(self, epoch, logs=None):
        predictions = self.model.predict(self.inputs, verbose=0)
        episodes = zip(self.inputs[0], self.labels, np.argmax(predictions, axis=-1), strict=True)
        pictures = np.stack([figure_pixels(episode_figure(*episode, predictions.shape[-1])) for episode in episodes])
        with self.writer.as_default():
            tf.summary.image("validation episodes", pictures, step=epoch, max_outputs=len(pictures))
        self.writer.flush()



# The fused batch normalisation

@keras.saving.register_keras_serializable(package="learning_to_learn")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras's batch normalisation, of images in training through TensorFlow's fused kernel: one pass over the
    activations forward and one back, where Keras's separate ops make several, over the few-shot CNN's largest
    tensors. The same function and moving statistics, to float rounding."""

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or len(inputs.shape) != 4:
            return super().call(inputs, training=training, mask=mask)
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(inputs, self.gamma, self.beta,
                                                                   epsilon=self.epsilon, is_training=True)
        # The kernel's variance is the unbiased one; Keras's moving variance follows the biased one.
        values = ops.cast(ops.size(inputs) // ops.shape(inputs)[-1], variance.dtype)
        variance = variance * (values - 1) / values
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs


# The fused recurrence
#
# What `keras.layers.LSTM` does with cuDNN, this section does for the memory
# cell: the same function by a faster route. The method depends on it in
# `build_model`, which can do without it (`fused=False`), and for the
# `StepActivations` that the cell's `step` returns for the backward pass.

def unit_vectors_backward(units, inverse_norms, gradient):
    """The gradient with respect to x, given the `gradient` with respect to `unit_vectors(x)`."""
    # An empty cell's norm is floored: the cell was only scaled, with no projection to undo.
    floored = ops.cast(inverse_norms >= 1 / EPSILON, units.dtype)
    along = ops.sum(units * gradient, axis=-1, keepdims=True)
    return inverse_norms * (gradient - (1 - floored) * units * along)


class StepActivations(NamedTuple):
    """What a step computes on the way, kept for the fused backward pass."""
    gates: tf.Tensor  # (batch, 4 * units): the controller's input, forget, candidate and output gates, activated
    interface: tf.Tensor  # (batch, (read_heads + 1) * cell_size): the write value, then the read keys
    read_weights: tf.Tensor  # (batch, read_heads, memory_cells)


class StepRecord(NamedTuple):
    """One forward step as its backward pass needs it."""
    d_h: tf.Tensor  # (batch, units): the gradient of the loss through the step's output
    d_read_value: tf.Tensor  # (batch, read_size): likewise
    c_before: tf.Tensor  # (batch, units)
    c_after: tf.Tensor  # (batch, units)
    memory_before: tf.Tensor  # (batch, memory_cells, cell_size): the memory the step read
    activations: StepActivations


class StepGradients(NamedTuple):
    """Gradients of the loss that one step sends back to the step before it."""
    h_read_before: tf.Tensor  # (batch, units + read_size): of [h, read value], through the gates
    c_before: tf.Tensor  # (batch, units)
    memory_before: tf.Tensor  # (batch, memory_cells, cell_size)
    gates: tf.Tensor  # (batch, 4 * units): of the step's gates before their activations
    interface: tf.Tensor  # (batch, (read_heads + 1) * cell_size): of the interface before its tanh


def scan_steps(step, steps, carry, one_step, reverse=False):
    """`carry, outputs = step(t, carry)` for t = 0 .. steps - 1 (with `reverse`, from the last): the last carry
    and every step's outputs stacked, a structure like `one_step`. tf.scan would stack the carry as well: here
    the memory, steps times over."""
    arrays = [tf.TensorArray(output.dtype, size=steps, element_shape=output.shape)
              for output in tf.nest.flatten(one_step)]

    def body(i, carry, arrays):
        t = steps - 1 - i if reverse else i
        carry, outputs = step(t, carry)
        outputs = tf.nest.flatten(outputs)
        return i + 1, carry, [array.write(t, output) for array, output in zip(arrays, outputs, strict=True)]

    _, carry, arrays = tf.while_loop(lambda i, *_: i < steps, body, (0, carry, arrays))
    return carry, tf.nest.pack_sequence_as(one_step, [array.stack() for array in arrays])


def usable_cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cores_in_use():
    """The cores TensorFlow runs ops on at once: --threads (which `main` holds to the usable cores), else all."""
    return min(tf.config.threading.get_inter_op_parallelism_threads() or math.inf, usable_cores())


@keras.saving.register_keras_serializable(package="learning_to_learn")
class MemoryAugmentedRNN(keras.layers.RNN):
    """`keras.layers.RNN` over a `MemoryAugmentedLSTM`, the same results in a fast loop with its own gradient.

    As `keras.layers.LSTM` hands its loop to cuDNN, this layer runs the cell's
    `step` in a loop (one a core, each over its share of the episodes), and
    backpropagates through time with a second loop written by hand: automatic
    differentiation of a loop adds up every weight's gradient step by step in
    small matrix products, while here the backward loop emits the gradients
    of each step's gates and interface, and each weight's gradient is then
    one large product over all steps. The input projection and the output
    layer do not recur: they run over all steps at once. Nor is the memory
    kept at every step: before step t it is the last writes and what was
    there before the first.
    """

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if mask is not None or self.go_backwards or self.unroll:
            return super().inner_loop(sequences, initial_state, mask, training=training)
        cell = self.cell
        h, c, read_value, memory = initial_state
        state = CellState(h, c, read_value, ops.reshape(memory, (-1, cell.memory_cells, cell.cell_size)))
        # (steps, batch, 4 * units), time first: the inputs turn, not their 8 times wider projection.
        projected = cell.project(ops.transpose(sequences, [1, 0, 2]))
        # Tensors, not variables: tf.custom_gradient would want to differentiate variables itself.
        weights = [tf.identity(weight) for weight in cell.step_weights()]
        # A step's small ops keep one core busy: each core runs the loops over its own share of the episodes, all
        # at once. Graded runs keep one loop, so that their results do not depend on the cores.
        parts = 1 if is_op_determinism_enabled() else min(cores_in_use(), h.shape[0] or math.inf)
        batch_size = ops.shape(h)[0]
        shares = [(batch_size + part) // parts for part in range(parts)]  # within one episode of each other
        pieces = zip(tf.split(projected, shares, axis=1), *[tf.split(tensor, shares) for tensor in state], strict=True)
        hs, read_values, c, memory = zip(*[self._recurrence(*piece, *weights) for piece in pieces], strict=True)
        hs, read_values = ops.concatenate(hs, axis=1), ops.concatenate(read_values, axis=1)  # time first
        c, memory = ops.concatenate(c), ops.concatenate(memory)
        outputs = cell.output_layer(ops.concatenate([hs, read_values], axis=-1))
        outputs = ops.transpose(outputs, [1, 0, 2])
        states = [hs[-1], c, read_values[-1], ops.reshape(memory, (-1, cell.memory_cells * cell.cell_size))]
        return outputs[:, -1], outputs, states

    def _recurrence(self, projected, h, c, read_value, memory, *weights):
        """The cell's steps over `projected` (steps, batch, 4 * units) from the state (h, c, read value, memory).

        Returns every step's h and read value, the last c and the last memory.
        """
        cell = self.cell

        def compiled(loop):
            # XLA fuses the many small ops of each step into a few kernels. Graded runs do without it, as Keras
            # does for jit_compile, since TensorFlow's op determinism does not cover XLA.
            return loop if is_op_determinism_enabled() else tf.function(loop, jit_compile=True)

        @tf.custom_gradient
        def recurrence(*inputs):
            # The gradient is `backward`'s: an eager tape must not record the loop as well (through XLA it cannot).
            projected, h, c, read_value, memory, *weights = [tf.stop_gradient(tensor) for tensor in inputs]
            steps, batch_size = projected.shape[0], ops.shape(h)[0]

            def forward_step(t, state):
                state, activations = cell.step(projected[t], state, weights)
                return state, (state.h, state.c, state.read_value, state.memory[:, 0], activations)

            one_step = (h, c, read_value, memory[:, 0],
                        StepActivations(projected[0], ops.zeros((batch_size, cell.interface_size)),
                                        ops.zeros((batch_size, cell.read_heads, cell.memory_cells))))
            last, (hs, cs, read_values, writes, activations) = compiled(lambda: scan_steps(
                forward_step, steps, CellState(h, c, read_value, memory), one_step))()
            c_before = ops.concatenate([c[None], cs[:-1]])  # (steps, batch, units)
            # The memory is a shift register: before step t it holds the last writes, newest first, then the
            # memory before the first step. All of them in one tensor, (steps + cells, batch, cell_size).
            written = ops.concatenate([ops.flip(writes, axis=0), ops.transpose(memory, [1, 0, 2])])

            def backward(d_hs, d_read_values, d_c_last, d_memory_last):
                # Turned once, outside the loop: XLA's products with a turned operand take twice as long.
                recurrent_kernel_turned, interface_kernel_turned = [ops.transpose(weight) for weight in weights[:2]]

                def backward_step(t, d_after):
                    memory_before = ops.transpose(tf.slice(written, [steps - t, 0, 0], [cell.memory_cells, -1, -1]),
                                                  [1, 0, 2])
                    record = StepRecord(d_hs[t], d_read_values[t], c_before[t], cs[t], memory_before,
                                        StepActivations(*[field[t] for field in activations]))
                    d = self._step_backward(d_after, record, recurrent_kernel_turned, interface_kernel_turned)
                    return d, (d.gates, d.interface)

                from_last = StepGradients(ops.zeros_like(ops.concatenate([h, read_value], axis=-1)), d_c_last,
                                          d_memory_last, ops.zeros_like(activations.gates[0]),
                                          ops.zeros_like(activations.interface[0]))
                d_first, (d_gates, d_interface) = compiled(lambda: scan_steps(
                    backward_step, steps, from_last, (from_last.gates, from_last.interface), reverse=True))()

                # Each weight's gradient: one product over all steps and episodes.
                h_read_before = ops.concatenate([ops.concatenate([h[None], hs[:-1]]),
                                                 ops.concatenate([read_value[None], read_values[:-1]])], axis=-1)
                d_weights = [ops.tensordot(h_read_before, d_gates, [[0, 1], [0, 1]]),
                             ops.tensordot(hs, d_interface, [[0, 1], [0, 1]]), ops.sum(d_interface, axis=[0, 1])]
                d_h, d_read_value = d_first.h_read_before[:, :cell.units], d_first.h_read_before[:, cell.units:]
                return d_gates, d_h, d_first.c_before, d_read_value, d_first.memory_before, *d_weights

            return (hs, read_values, last.c, last.memory), backward

        return recurrence(projected, h, c, read_value, memory, *weights)

    def _step_backward(self, d_after, step, recurrent_kernel_turned, interface_kernel_turned):
        """`MemoryAugmentedLSTM.step` differentiated by hand: the `StepGradients` it sends to the step before,
        from those it got from the step after (`d_after`) and the `StepRecord` of its forward pass."""
        cell = self.cell
        batch_size = ops.shape(step.d_h)[0]
        heads_shape = (batch_size, cell.read_heads, cell.cell_size)
        d_h = step.d_h + d_after.h_read_before[:, :cell.units]
        d_read_value = ops.reshape(step.d_read_value + d_after.h_read_before[:, cell.units:], heads_shape)
        gates, interface, read_weights = step.activations

        # The read: read_value = read_weights @ memory, read_weights = softmax(sharpness * unit keys @ unit cells).
        unit_keys, key_norms = unit_vectors(ops.reshape(interface[:, cell.cell_size:], heads_shape))
        unit_cells, cell_norms = unit_vectors(step.memory_before)
        d_read_weights = ops.einsum("bhc,bmc->bhm", d_read_value, step.memory_before)
        d_logits = read_weights * (d_read_weights - ops.sum(read_weights * d_read_weights, -1, keepdims=True))
        d_similarity = cell.read_sharpness * d_logits
        d_keys = unit_vectors_backward(unit_keys, key_norms, ops.einsum("bhm,bmc->bhc", d_similarity, unit_cells))
        d_memory = (ops.einsum("bhm,bhc->bmc", read_weights, d_read_value)
                    + unit_vectors_backward(unit_cells, cell_norms,
                                            ops.einsum("bhm,bhc->bmc", d_similarity, unit_keys))
                    # the write: cell i + 1 after the step was cell i before it
                    + ops.pad(d_after.memory_before[:, 1:], [[0, 0], [0, 1], [0, 0]]))
        d_keys = ops.reshape(d_keys, (batch_size, cell.read_heads * cell.cell_size))
        # The write value is cell 0 after the step.
        d_tanh = ops.concatenate([d_after.memory_before[:, 0], d_keys], axis=-1)
        d_interface = d_tanh * (1 - interface * interface)
        d_h = d_h + ops.matmul(d_interface, interface_kernel_turned)

        # The controller: c = f * c_before + i * g, h = o * tanh(c).
        input_gate, forget_gate, candidate, output_gate = ops.split(gates, 4, axis=-1)
        tanh_c = ops.tanh(step.c_after)
        d_c = d_after.c_before + d_h * output_gate * (1 - tanh_c * tanh_c)
        d_gates = ops.concatenate([d_c * candidate * input_gate * (1 - input_gate),
                                   d_c * step.c_before * forget_gate * (1 - forget_gate),
                                   d_c * input_gate * (1 - candidate * candidate),
                                   d_h * tanh_c * output_gate * (1 - output_gate)], axis=-1)
        return StepGradients(ops.matmul(d_gates, recurrent_kernel_turned), d_c * forget_gate, d_memory,
                             d_gates, d_interface)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupt)  # from here on an interruption is an exception
    signal.signal(signal.SIGTERM, interrupt)
    sys.excepthook = print_unless_interrupted
    try:
        main(parse_args())
        raise_swallowed_interruption()  # --evaluate's too
    except DataError as error:
        leave(2, f"error: {error}")
    except RunEnded as ended:
        leave(ended.status, ended)
    except BaseException as error:
        if (status := interruption_status(error)) is None:
            raise
        leave(status, "interrupted")
