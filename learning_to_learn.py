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
import importlib.util
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up notices would bury the epoch lines

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from omniglot_dataset import DataError, Omniglot, write_atomically


def integer(minimum):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"invalid value {value}: must be at least {minimum}")
        return value
    return parse


def positive_number(text):
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"invalid value {text}: must be a finite number above 0")
    return value


def filter_counts(text):
    """An argparse type: three positive integers separated by commas, the filters of the CNN's convolutions."""
    counts = text.split(",")
    if len(counts) != 3 or not all(count.strip().isdigit() and int(count) > 0 for count in counts):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected three integers above 0, as in 8,16,32")
    return [int(count) for count in counts]


def model_file_to_write(text):
    """An argparse type: a path ending in .keras, in a folder that exists."""
    if not text.endswith(".keras"):
        raise argparse.ArgumentTypeError(f"invalid path {text!r}: expected a name ending in .keras")
    if not os.path.isdir(os.path.dirname(os.path.abspath(text))):
        raise argparse.ArgumentTypeError(f"invalid path {text!r}: its folder does not exist")
    return text


def existing_file(text):
    """An argparse type: a file that exists."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"invalid path {text!r}: no such file")
    return text


def folder(text):
    """An argparse type: a folder, which need not exist yet."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"invalid path {text!r}: it exists and is not a folder")
    return text


def tensorboard_folder(text):
    """An argparse type: a folder for TensorBoard logs, which need the tensorboard package."""
    if importlib.util.find_spec("tensorboard") is None:
        raise argparse.ArgumentTypeError("needs the tensorboard package: pip install tensorboard")
    return folder(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """One line a flag, with its default where it has one."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


parser = argparse.ArgumentParser(
    description="Meta-learns few-shot Omniglot classification with a memory-augmented LSTM.",
    formatter_class=HelpFormatter)
data = parser.add_argument_group("data (OMNIGLOT_DATA names a local npz file, else the Keras cache or a download)")
data.add_argument("--classes", default=5, type=integer(2), metavar="N", help="Classes (characters) per episode.")
data.add_argument("--images_per_class", default=10, type=integer(1), metavar="N",
                  help="Drawings of each class per episode.")
data.add_argument("--train_episodes", default=10000, type=integer(1), metavar="N",
                  help="Training episodes per epoch, fresh every epoch.")
data.add_argument("--rotations", default=False, action="store_true",
                  help="Train also on every character rotated by 90, 180 and 270 degrees, each a new character.")
data.add_argument("--shift", default=0, type=integer(0), metavar="N",
                  help="Move every training image by up to N pixels each way, at random.")
data.add_argument("--test_episodes", default=1000, type=integer(1), metavar="N",
                  help="Validation episodes, the same every epoch.")
model_flags = parser.add_argument_group("model")
model_flags.add_argument("--cnn_filters", default="8,16,32", type=filter_counts, metavar="A,B,C",
                         help="Filters of the CNN's three convolutions.")
model_flags.add_argument("--lstm_dim", default=256, type=integer(1), metavar="N", help="Units of the LSTM controller.")
model_flags.add_argument("--cell_size", default=40, type=integer(1), metavar="N", help="Units of one memory cell.")
model_flags.add_argument("--read_heads", default=1, type=integer(0), metavar="N", help="Memory reads per step.")
model_flags.add_argument("--read_sharpness", default=1.0, type=positive_number, metavar="X",
                         help="Multiplies the cosine similarities before the read's softmax (1: the assignment's).")
training = parser.add_argument_group("training")
training.add_argument("--batch_size", default=16, type=integer(1), metavar="N", help="Episodes per batch.")
training.add_argument("--learning_rate", default=0.001, type=positive_number, metavar="X",
                      help="Adam's learning rate.")
training.add_argument("--learning_rate_decay", default="none", choices=["none", "cosine"],
                      help="How the learning rate falls: not at all, or along a cosine to 0 at the last step.")
training.add_argument("--epochs", default=20, type=integer(1), metavar="N", help="Training epochs.")
training.add_argument("--seed", default=42, type=int, metavar="N",
                      help="Random seed of the weights and training episodes.")
training.add_argument("--threads", default=None, type=integer(0), metavar="N",
                      help="CPU threads, 0 for all cores (default: 0; 1 with --recodex).")
training.add_argument("--checkpoint_dir", default=None, type=folder, metavar="DIR",
                      help="Save after every epoch here; the same command run again resumes after the last epoch.")
output = parser.add_argument_group("output")
output.add_argument("--recodex", default=False, action="store_true",
                    help="Graded mode: deterministic, one line of metrics per epoch.")
output.add_argument("--logdir", default=None, type=tensorboard_folder, metavar="DIR",
                    help="Write TensorBoard logs here: every metric and pictures of validation episodes per epoch.")
output.add_argument("--save_model", default=None, type=model_file_to_write, metavar="PATH",
                    help="Write the trained model here.")
output.add_argument("--evaluate", default=None, type=existing_file, metavar="PATH",
                    help="Do not train: load this .keras model and print its metrics on --test_episodes episodes.")

# Validation episodes do not depend on --seed, so that runs with different seeds compare on the same episodes.
VALIDATION_SEED = 42
OCCURRENCES = [1, 2, 5, 10]  # the occurrences of a class whose accuracy is reported


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


def with_rotations(dataset):
    """`dataset` with every character also rotated by 90, 180 and 270 degrees, each rotation a new character.

    Santoro et al. do the same: four times the characters to learn from, at no cost in data.
    """
    images, labels = dataset.data["images"], dataset.data["labels"]
    characters = labels.max() + 1
    return argparse.Namespace(data={
        "images": np.concatenate([np.rot90(images, quarter, axes=(1, 2)) for quarter in range(4)]),
        "labels": np.concatenate([labels + quarter * characters for quarter in range(4)]),
    })


def shifted(images, offsets, shift):
    """`images` `[batch, steps, H, W, C]`, each moved `shift - offsets` pixels down and right (`offsets`
    `[batch, steps, 2]` in 0..2 * shift), blank paper coming in at the edges."""
    padded = tf.pad(images, [[0, 0], [0, 0], [shift, shift], [shift, shift], [0, 0]])
    rows = tf.gather(padded, offsets[..., :1] + tf.range(Omniglot.H, dtype=offsets.dtype), axis=2, batch_dims=2)
    return tf.gather(rows, offsets[..., 1:] + tf.range(Omniglot.W, dtype=offsets.dtype), axis=3, batch_dims=2)


def episode_batches(dataset, args, seed, episodes, epochs=None):
    """`episodes` episodes of `EpisodeGenerator` in batches of `args.batch_size`: a `tf.data.Dataset` for `model.fit`.

    Without `epochs`, one fixed set of episodes (validation). With `epochs`, a
    `range` of epoch numbers, every epoch draws fresh episodes, seeded by
    `(seed, epoch)` alone so that the episodes of an epoch do not depend on
    what came before; the epochs' batches follow one another, and `fit` needs
    `steps_per_epoch`. Training images are moved by up to `args.shift` pixels,
    each its own way. Images are gathered in the graph: no Python per batch.
    """
    images = tf.constant(dataset.data["images"])
    shift = args.shift if epochs is not None else 0
    steps = args.classes * args.images_per_class

    def sample(epoch):
        indices, labels = EpisodeGenerator(dataset, args, seed=[seed, epoch]).sample(episodes)
        offsets = np.random.default_rng([seed, epoch, 1]).integers(0, 2 * shift + 1, [episodes, steps, 2])
        return indices, previous_labels(labels), labels, offsets

    def epoch_batches(epoch):
        if epochs is None:
            arrays = sample(0)
        else:
            *arrays, offsets = tf.numpy_function(sample, [epoch], [tf.int64, tf.int32, tf.int32, tf.int64])
            # numpy_function forgets shapes; batching needs them back.
            arrays = [tf.ensure_shape(array, (episodes, steps)) for array in arrays]
            arrays.append(tf.ensure_shape(offsets, (episodes, steps, 2)))
        return tf.data.Dataset.from_tensor_slices(tuple(arrays)).batch(args.batch_size)

    def gather_images(indices, previous, labels, offsets):
        episode_images = tf.gather(images, indices)
        return ((shifted(episode_images, offsets, shift) if shift else episode_images, previous), labels)

    if epochs is None:
        batches = epoch_batches(0)
    else:
        batches = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch_batches)
    return batches.map(gather_images).prefetch(2)


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


EPSILON = keras.config.epsilon()  # the floor of ops.normalize on a norm


def unit_vectors(x):
    """`ops.normalize(x)` over the last axis, and the inverse norms it used (the backward pass needs them)."""
    inverse_norms = ops.minimum(ops.rsqrt(ops.sum(ops.square(x), axis=-1, keepdims=True)), 1 / EPSILON)
    return x * inverse_norms, inverse_norms


def unit_vectors_backward(units, inverse_norms, gradient):
    """The gradient with respect to x, given the `gradient` with respect to `unit_vectors(x)`."""
    # An empty cell's norm is floored: the cell was only scaled, with no projection to undo.
    floored = ops.cast(inverse_norms >= 1 / EPSILON, units.dtype)
    along = ops.sum(units * gradient, axis=-1, keepdims=True)
    return inverse_norms * (gradient - (1 - floored) * units * along)


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
        # Owns the controller's weights, with Keras's LSTM initializers; `step` spells out its equations.
        self.controller = keras.layers.LSTMCell(units)
        # The write value first, then the read keys.
        self.interface_layer = keras.layers.Dense((read_heads + 1) * cell_size, activation="tanh")
        self.output_layer = keras.layers.Dense(units, activation="tanh")
        # [h, c, read value, memory], the memory flat: Keras RNN states must be vectors.
        self.state_size = [units, units, read_heads * cell_size, memory_cells * cell_size]
        self.output_size = units

    def build(self, input_shape):
        self.input_size = input_shape[-1]
        read_size = self.read_heads * self.cell_size
        self.controller.build((None, self.input_size + read_size))
        self.interface_layer.build((None, self.units))
        self.output_layer.build((None, self.units + read_size))

    def project(self, inputs):
        """The part of the controller's gates that comes from the cell's input alone: it does not recur."""
        return ops.matmul(inputs, self.controller.kernel[:self.input_size]) + self.controller.bias

    def step_weights(self):
        """The weights `step` uses: [h, read value] -> gates, and the interface layer's kernel and bias."""
        recurrent = ops.concatenate([self.controller.recurrent_kernel, self.controller.kernel[self.input_size:]])
        return recurrent, self.interface_layer.kernel, self.interface_layer.bias

    def _read(self, memory, read_keys):
        """Returns the read value (batch, read_heads * cell_size) and the read weights (batch, read_heads, cells)."""
        # memory: (batch, memory_cells, cell_size), read_keys: (batch, read_heads, cell_size)
        similarity = ops.einsum("bhc,bmc->bhm", unit_vectors(read_keys)[0], unit_vectors(memory)[0])
        read_weights = ops.softmax(self.read_sharpness * similarity, axis=-1)
        read_value = ops.matmul(read_weights, memory)  # all heads in one product
        return ops.reshape(read_value, (ops.shape(memory)[0], self.read_heads * self.cell_size)), read_weights

    def _write(self, memory, write_value):
        # newest write first; the oldest cell drops
        return ops.concatenate([write_value[:, None], memory[:, :-1]], axis=1)

    def step(self, projected_input, h, c, read_value, memory, weights):
        """One step from `project(input)` and the state, with `step_weights()`.

        Returns the new state (h, c, read value, memory) and what the backward pass
        of `MemoryAugmentedRNN` keeps of the step: the activated gates, the interface, the read weights.
        """
        # h, c: (batch, units), read_value: (batch, read_heads * cell_size),
        # memory: (batch, memory_cells, cell_size), projected_input: (batch, 4 * units)
        recurrent_kernel, interface_kernel, interface_bias = weights
        gates = projected_input + ops.matmul(ops.concatenate([h, read_value], axis=-1), recurrent_kernel)
        input_gate, forget_gate, candidate, output_gate = ops.split(gates, 4, axis=-1)
        gates = [ops.sigmoid(input_gate), ops.sigmoid(forget_gate), ops.tanh(candidate), ops.sigmoid(output_gate)]
        c = gates[1] * c + gates[0] * gates[2]
        h = gates[3] * ops.tanh(c)

        interface = ops.tanh(ops.matmul(h, interface_kernel) + interface_bias)
        write_value = interface[:, :self.cell_size]
        # An explicit batch size: with --read_heads=0 the keys are empty and -1 could not be inferred.
        batch_size = ops.shape(h)[0]
        read_keys = ops.reshape(interface[:, self.cell_size:], (batch_size, self.read_heads, self.cell_size))
        read_value, read_weights = self._read(memory, read_keys)
        memory = self._write(memory, write_value)
        return (h, c, read_value, memory), (ops.concatenate(gates, axis=-1), interface, read_weights)

    def call(self, inputs, states, training=None):
        # states: [h (batch, units), c (batch, units), read_value (batch, read_heads * cell_size),
        #          memory (batch, memory_cells * cell_size)]
        h, c, read_value, memory = states
        memory = ops.reshape(memory, (-1, self.memory_cells, self.cell_size))
        (h, c, read_value, memory), _ = self.step(self.project(inputs), h, c, read_value, memory, self.step_weights())
        output = self.output_layer(ops.concatenate([h, read_value], axis=-1))
        return output, [h, c, read_value, ops.reshape(memory, (-1, self.memory_cells * self.cell_size))]

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, memory_cells=self.memory_cells, cell_size=self.cell_size,
                      read_heads=self.read_heads, read_sharpness=self.read_sharpness)
        return config


@keras.saving.register_keras_serializable(package="learning_to_learn")
class MemoryAugmentedRNN(keras.layers.RNN):
    """`keras.layers.RNN` over a `MemoryAugmentedLSTM`, the same results in a fast loop with its own gradient.

    As `keras.layers.LSTM` hands its loop to cuDNN, this layer runs the cell's
    `step` in one scan, and backpropagates through time with a second scan
    written by hand: automatic differentiation of a loop adds up every
    weight's gradient step by step in small matrix products, while here the
    backward loop emits the gradients of each step's gates and interface, and
    each weight's gradient is then one large product over all steps. The
    input projection and the output layer do not recur: they run over all
    steps at once.
    """

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if mask is not None or self.go_backwards or self.unroll:
            return super().inner_loop(sequences, initial_state, mask, training=training)
        cell = self.cell
        h, c, read_value, memory = initial_state
        memory = ops.reshape(memory, (-1, cell.memory_cells, cell.cell_size))
        projected = ops.transpose(cell.project(sequences), [1, 0, 2])  # time first, as scans want
        # Tensors, not variables: tf.custom_gradient would want to differentiate variables itself.
        weights = [tf.identity(weight) for weight in cell.step_weights()]
        hs, read_values, c, memory = self._recurrence(projected, h, c, read_value, memory, *weights)
        outputs = cell.output_layer(ops.concatenate([hs, read_values], axis=-1))
        outputs = ops.transpose(outputs, [1, 0, 2])
        states = [hs[-1], c, read_values[-1], ops.reshape(memory, (-1, cell.memory_cells * cell.cell_size))]
        return outputs[:, -1], outputs, states

    def _recurrence(self, projected, h, c, read_value, memory, *weights):
        """The cell's steps over `projected` (steps, batch, 4 * units) from the state (h, c, read value, memory).

        Returns every step's h and read value, the last c and the last memory.
        """
        cell = self.cell

        @tf.custom_gradient
        def recurrence(projected, h, c, read_value, memory, *weights):
            def forward(carry, projected_input):
                state, kept = cell.step(projected_input, *carry[:4], weights)
                return (*state, *kept)

            # tf.scan stacks its whole carry: the state, then what the backward pass keeps of each step.
            batch_size = ops.shape(h)[0]
            nothing_kept = (ops.zeros_like(projected[0]),
                            ops.zeros((batch_size, (cell.read_heads + 1) * cell.cell_size)),
                            ops.zeros((batch_size, cell.read_heads, cell.memory_cells)))
            hs, cs, read_values, memories, *kept = tf.scan(
                forward, projected, initializer=(h, c, read_value, memory, *nothing_kept))
            c_before = ops.concatenate([c[None], cs[:-1]])  # each step's c and memory before the step
            memory_before = ops.concatenate([memory[None], memories[:-1]])

            def backward(d_hs, d_read_values, d_c_last, d_memory_last):
                recurrent_kernel, interface_kernel, _ = weights
                d_state = (ops.zeros_like(ops.concatenate([h, read_value], axis=-1)), d_c_last, d_memory_last,
                           *[ops.zeros_like(kept_value[0]) for kept_value in kept[:2]])
                d_h_reads, d_cs, d_memories, d_gates, d_interfaces = tf.scan(
                    lambda d_state, step: self._step_backward(d_state[:3], step, recurrent_kernel, interface_kernel),
                    (d_hs, d_read_values, c_before, cs, memory_before, *kept), initializer=d_state, reverse=True)

                # Each weight's gradient: one product over all steps and episodes.
                h_read_before = ops.concatenate([ops.concatenate([h[None], hs[:-1]]),
                                                 ops.concatenate([read_value[None], read_values[:-1]])], axis=-1)
                d_weights = [ops.tensordot(h_read_before, d_gates, [[0, 1], [0, 1]]),
                             ops.tensordot(hs, d_interfaces, [[0, 1], [0, 1]]), ops.sum(d_interfaces, axis=[0, 1])]
                d_h, d_read_value = d_h_reads[0, :, :cell.units], d_h_reads[0, :, cell.units:]
                return d_gates, d_h, d_cs[0], d_read_value, d_memories[0], *d_weights

            return (hs, read_values, cs[-1], memories[-1]), backward

        return recurrence(projected, h, c, read_value, memory, *weights)

    def _step_backward(self, d_state, step, recurrent_kernel, interface_kernel):
        """`MemoryAugmentedLSTM.step` differentiated by hand, from the gradient of its new state to the old one's.

        `d_state` holds the gradients that later steps send back: of [h, read value] (through
        the next gates), of c and of the memory after this step; `step` what the forward pass kept.
        Returns the gradients of the step's old state, then of its gates and interface before their activations.
        """
        cell = self.cell
        d_h_read, d_c, d_memory_after = d_state
        d_h, d_read_value, c_before, c, memory, gates, interface, read_weights = step
        batch_size = ops.shape(d_h)[0]
        d_h = d_h + d_h_read[:, :cell.units]
        heads_shape = (batch_size, cell.read_heads, cell.cell_size)
        d_read_value = ops.reshape(d_read_value + d_h_read[:, cell.units:], heads_shape)

        # The read: read_value = read_weights @ memory, read_weights = softmax(sharpness * unit keys @ unit cells).
        unit_keys, key_norms = unit_vectors(ops.reshape(interface[:, cell.cell_size:], heads_shape))
        unit_cells, cell_norms = unit_vectors(memory)
        d_read_weights = ops.einsum("bhc,bmc->bhm", d_read_value, memory)
        d_logits = read_weights * (d_read_weights - ops.sum(read_weights * d_read_weights, -1, keepdims=True))
        d_similarity = cell.read_sharpness * d_logits
        d_keys = unit_vectors_backward(unit_keys, key_norms, ops.einsum("bhm,bmc->bhc", d_similarity, unit_cells))
        d_memory = (ops.einsum("bhm,bhc->bmc", read_weights, d_read_value)
                    + unit_vectors_backward(unit_cells, cell_norms,
                                            ops.einsum("bhm,bhc->bmc", d_similarity, unit_keys))
                    # the write: cell i + 1 after the step was cell i before it
                    + ops.pad(d_memory_after[:, 1:], [[0, 0], [0, 1], [0, 0]]))
        d_keys = ops.reshape(d_keys, (batch_size, cell.read_heads * cell.cell_size))
        d_interface = ops.concatenate([d_memory_after[:, 0], d_keys], axis=-1)  # the write value is cell 0 after
        d_interface = d_interface * (1 - interface * interface)  # through the tanh
        d_h = d_h + ops.matmul(d_interface, ops.transpose(interface_kernel))

        # The controller: c = f * c_before + i * g, h = o * tanh(c).
        input_gate, forget_gate, candidate, output_gate = ops.split(gates, 4, axis=-1)
        tanh_c = ops.tanh(c)
        d_c = d_c + d_h * output_gate * (1 - tanh_c * tanh_c)
        d_gates = ops.concatenate([d_c * candidate * input_gate * (1 - input_gate),
                                   d_c * c_before * forget_gate * (1 - forget_gate),
                                   d_c * input_gate * (1 - candidate * candidate),
                                   d_h * tanh_c * output_gate * (1 - output_gate)], axis=-1)
        return ops.matmul(d_gates, ops.transpose(recurrent_kernel)), d_c * forget_gate, d_memory, d_gates, d_interface


def image_features(conv_filters):
    """The CNN applied to every image on its own: `[images, H, W, C]` -> `[images, features]`."""
    layers = [keras.Input([Omniglot.H, Omniglot.W, Omniglot.C])]
    for filters in conv_filters:
        layers += [
            keras.layers.Conv2D(filters, 3, strides=2, padding="valid", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    return keras.Sequential(layers + [keras.layers.Flatten()], name="image_features")


def reported_occurrences(args):
    """The occurrences in OCCURRENCES that an episode has: a class shows up `images_per_class` times."""
    return [nth for nth in OCCURRENCES if nth <= args.images_per_class]


def metric_names(args):
    return ["loss", "acc"] + [f"acc{nth}" for nth in reported_occurrences(args)]


def steps_per_epoch(args):
    """Training batches an epoch: the last one may hold fewer episodes."""
    return math.ceil(args.train_episodes / args.batch_size)


def build_model(args):
    steps = args.classes * args.images_per_class
    images = keras.Input([steps, Omniglot.H, Omniglot.W, Omniglot.C], name="images")
    labels = keras.Input([steps], dtype="int32", name="previous_labels")

    # One pass of the CNN over all images of the batch, then back to episodes.
    features = image_features(args.cnn_filters)(ops.reshape(images, (-1, Omniglot.H, Omniglot.W, Omniglot.C)))
    features = ops.reshape(features, (-1, steps, features.shape[-1]))
    inputs = ops.concatenate([features, ops.one_hot(labels, args.classes)], axis=-1)  # label -1: all zeros

    cell = MemoryAugmentedLSTM(args.lstm_dim, memory_cells=steps, cell_size=args.cell_size,
                               read_heads=args.read_heads, read_sharpness=args.read_sharpness)
    outputs = MemoryAugmentedRNN(cell, return_sequences=True)(inputs)
    predictions = keras.layers.Dense(args.classes, activation="softmax")(outputs)

    learning_rate = args.learning_rate
    if args.learning_rate_decay == "cosine":
        # A function of the optimizer's step count, which checkpoints keep: a resumed run goes on along the curve.
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=args.epochs * steps_per_epoch(args))

    model = keras.Model([images, labels], predictions)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc"),
                 *[NthOccurrenceAccuracy(nth) for nth in reported_occurrences(args)]],
        # XLA fuses the many small ops of each recurrent step: 1.5x faster training on CPU. Graded
        # runs do without it, since TF's op determinism does not cover XLA.
        jit_compile=not args.recodex,
    )
    return model


# Training

def metrics_line(logs, names):
    return " - ".join(f"{name}: {logs[name]:.4f}" for name in names)


class GradedEpochLine(keras.callbacks.Callback):
    """Prints `Epoch 1/3 loss: ... - val_acc10: ...`, the metrics in a fixed order (Keras sorts its own)."""

    def __init__(self, epochs, names):
        super().__init__()
        self.epochs, self.names = epochs, names + [f"val_{name}" for name in names]

    def on_epoch_end(self, epoch, logs=None):
        print(f"Epoch {epoch + 1}/{self.epochs} {metrics_line(logs, self.names)}", flush=True)


# Digits of a 3x5 pixel font, row by row, for the numbers under the images of an episode picture.
DIGITS = ["111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
          "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111"]
DIGIT_SCALE = 2  # font pixels per picture pixel side: a digit is 6x10 pixels


def stamp_number(picture, number, top, left, colour):
    """Draws `number` into the RGB `picture` with its top-left corner at (top, left)."""
    for position, digit in enumerate(str(number)):
        glyph = np.array([int(bit) for bit in DIGITS[int(digit)]], np.float32).reshape(5, 3)
        glyph = np.kron(glyph, np.ones([DIGIT_SCALE, DIGIT_SCALE], np.float32))
        x = left + position * 4 * DIGIT_SCALE
        region = picture[top:top + glyph.shape[0], x:x + glyph.shape[1]]
        region[glyph > 0] = colour


GREY, WHITE, GREEN, RED = [0.5, 0.5, 0.5], [1.0, 1.0, 1.0], [0.2, 0.9, 0.2], [1.0, 0.15, 0.15]
TILE_WIDTH, TEXT_ROW = 30, 12  # an image with a 1-pixel margin each side; a row of digits with its gap


def episode_picture(images, labels, guesses):
    """An RGB picture of one episode: every image in order, under it three numbers: the how-many-th
    occurrence of its class (grey), its label (white) and the model's guess (green; red and framed if wrong)."""
    height = 1 + Omniglot.H + 3 * TEXT_ROW + 2
    picture = np.zeros([height, len(labels) * TILE_WIDTH, 3], np.float32)
    for step, (image, label, guess) in enumerate(zip(images, labels, guesses, strict=True)):
        left = step * TILE_WIDTH + 1
        occurrence = np.sum(labels[:step + 1] == label)
        if guess != label:
            picture[0:Omniglot.H + 2, left - 1:left + Omniglot.W + 1] = RED
        picture[1:1 + Omniglot.H, left:left + Omniglot.W] = image  # grey ink, broadcast over RGB
        for row, (number, colour) in enumerate([(occurrence, GREY), (label, WHITE),
                                                (guess, GREEN if guess == label else RED)]):
            stamp_number(picture, number, top=Omniglot.H + 4 + row * TEXT_ROW, left=left, colour=colour)
    return picture


class EpisodePictures(keras.callbacks.Callback):
    """After every epoch, writes pictures of the first `count` episodes of a validation batch to TensorBoard."""

    def __init__(self, logdir, batch, count=3):
        super().__init__()
        (images, previous), labels = keras.tree.map_structure(np.asarray, batch)
        self.inputs, self.labels = (images[:count], previous[:count]), labels[:count]
        self.writer = tf.summary.create_file_writer(os.path.join(logdir, "episodes"))

    def on_epoch_end(self, epoch, logs=None):
        guesses = np.argmax(self.model.predict(self.inputs, verbose=0), axis=-1)
        episodes = zip(self.inputs[0], self.labels, guesses, strict=True)
        pictures = np.stack([episode_picture(*episode) for episode in episodes])
        with self.writer.as_default():
            tf.summary.image("validation episodes", pictures, step=epoch, max_outputs=len(pictures))
        self.writer.flush()


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the weights and the optimizer state after every epoch into one file, atomically.

    `keras.callbacks.BackupAndRestore` writes the weights in place and the epoch
    into a second file, so a kill during a save can leave them torn. Here the
    epoch is derived from the file itself: the optimizer's step count over the
    steps of an epoch.
    """

    def __init__(self, directory, steps_per_epoch):
        super().__init__()
        self.path = os.path.join(directory, "checkpoint.weights.h5")
        self.steps_per_epoch = steps_per_epoch

    def restore(self, model):
        """Loads the last checkpoint into `model`; returns the number of epochs it finished."""
        if not os.path.exists(self.path):
            return 0
        model.optimizer.build(model.trainable_variables)
        try:
            model.load_weights(self.path)
        except Exception as error:
            raise DataError(f"cannot resume from {self.path} ({error}); remove it to train from the start") from None
        return int(model.optimizer.iterations.numpy()) // self.steps_per_epoch

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        write_atomically(self.path, self.model.save_weights, suffix=".weights.h5")


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


def load_trained_model(path, args):
    """Loads a model saved by --save_model, refusing other files and other episode shapes."""
    try:
        model = keras.models.load_model(path)
    except Exception as error:
        raise DataError(f"{path} is not a model saved by this program ({error})") from None
    if not any(isinstance(getattr(layer, "cell", None), MemoryAugmentedLSTM) for layer in model.layers):
        raise DataError(f"{path} is a Keras model but not one of this program: it has no MemoryAugmentedLSTM")
    steps, classes = model.inputs[0].shape[1], model.outputs[0].shape[-1]
    if (steps, classes) != (args.classes * args.images_per_class, args.classes):
        raise DataError(f"{path} was trained on episodes of --classes={classes} "
                        f"--images_per_class={steps // classes}: evaluate it with those flags")
    return model


def main(args, callbacks=()):
    """Trains (or with --evaluate, evaluates) as `args` say; `callbacks` are extra Keras callbacks for `fit`."""
    threads = args.threads if args.threads is not None else int(args.recodex)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    keras.utils.set_random_seed(args.seed)  # seeds the weight initializers too
    if args.recodex:
        tf.config.experimental.enable_op_determinism()

    omniglot = Omniglot()
    check_episodes_fit(args, omniglot)
    names = metric_names(args)
    if reported_occurrences(args) != OCCURRENCES:
        print(f"Note: with --images_per_class={args.images_per_class} no class appears "
              f"{OCCURRENCES[-1]} times in an episode: only {', '.join(names)} are reported.", file=sys.stderr)
    dev = episode_batches(omniglot.test, args, VALIDATION_SEED, args.test_episodes)

    if args.evaluate:
        model = load_trained_model(args.evaluate, args)
        logs = model.evaluate(dev, return_dict=True, verbose=0 if args.recodex else "auto")
        print(f"Test {metrics_line(logs, names)}", flush=True)
        return logs

    model = build_model(args)
    callbacks, initial_epoch = list(callbacks), 0
    if args.checkpoint_dir:
        checkpoint = EpochCheckpoint(args.checkpoint_dir, steps_per_epoch(args))
        initial_epoch = checkpoint.restore(model)
        callbacks.append(checkpoint)
        if initial_epoch >= args.epochs:
            print(f"All {args.epochs} epochs are done in {args.checkpoint_dir}.", file=sys.stderr)
    if args.logdir:
        callbacks += [keras.callbacks.TensorBoard(args.logdir), EpisodePictures(args.logdir, next(iter(dev)))]
    if args.recodex:
        callbacks.append(GradedEpochLine(args.epochs, names))

    train_split = with_rotations(omniglot.train) if args.rotations else omniglot.train
    train = episode_batches(train_split, args, args.seed, args.train_episodes, epochs=range(initial_epoch, args.epochs))
    logs = model.fit(train, epochs=args.epochs, steps_per_epoch=steps_per_epoch(args), initial_epoch=initial_epoch,
                     validation_data=dev, verbose=0 if args.recodex else "auto", callbacks=callbacks)
    if args.save_model:
        write_atomically(args.save_model, model.save, suffix=".keras")
    return logs.history


if __name__ == "__main__":
    args = parser.parse_args()
    try:
        main(args)
    except DataError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
