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
memory cell, the model, training, `main`. It runs on each of Keras's backends
(README.md). Beside it: `long_runs.py` (flag checks, checkpoints, signals, the
graded lines) and `backends.py` (what differs between backends, and the fast
paths they offer: the same cell, faster).
"""
import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C or SIGTERM while Keras's backend loads ends the program as later: in one line
    for number, status in [(signal.SIGINT, 130), (signal.SIGTERM, 143)]:
        signal.signal(number, lambda *_, status=status: (print(f"{os.path.basename(sys.argv[0])}: interrupted",
                                                               file=sys.stderr), os._exit(status)))

import argparse
import math

try:
    import backends  # isort: skip (first: it quiets the backend's start-up)
    import keras
    import numpy as np
    from keras import ops
except (ImportError, MemoryError) as error:  # not installed, or no room to load it (ulimit -v)
    if __name__ != "__main__":
        raise
    print(f"{os.path.basename(sys.argv[0])}: error: cannot load Keras and its backend ({error}): install them with "
          "pip install -r requirements.txt, in memory enough for them", file=sys.stderr, flush=True)
    os._exit(2)  # at once: a half-loaded backend can hang the interpreter's exit

import long_runs
from long_runs import EpochCheckpoint, GradedEpochLine, HelpFormatter, add_flag, filter_counts, metrics_line
from omniglot_dataset import DataError, Omniglot

# Flags

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
    padded = np.pad(images, [(0, 0), (0, 0), (shift, shift), (shift, shift), (0, 0)])
    episode, step = np.ogrid[:images.shape[0], :images.shape[1]]
    rows = offsets[..., 0, None] + np.arange(Omniglot.H)  # [batch, steps, H]
    columns = offsets[..., 1, None] + np.arange(Omniglot.W)
    return padded[episode[..., None, None], step[..., None, None], rows[..., :, None], columns[..., None, :]]


class EpisodeBatches(keras.utils.PyDataset):
    """Batches of episodes as the model takes them, `((images, previous labels), labels[, loss weights])`, numpy.

    `draw(epoch)` gives an epoch's episodes, `(image indices, labels, moves)`, each `[episodes, steps, ...]`
    (moves: None, or offsets for `shifted` by up to `shift` pixels); the batches of the epochs of the `range`
    `epochs` follow one another, each epoch drawn when its first batch is asked for. With a
    `first_occurrence_weight` other than 1, a batch also carries its steps' loss weights: that weight at a
    class's first drawing, 1 elsewhere.
    """

    def __init__(self, images, draw, episodes, batch_size, epochs=range(1), shift=0, first_occurrence_weight=1.0):
        super().__init__()
        self.images, self.draw, self.batch_size, self.epochs = images, draw, batch_size, epochs
        self.shift, self.first_occurrence_weight = shift, first_occurrence_weight
        self.batches_per_epoch = math.ceil(episodes / batch_size)
        self.drawn = None, None  # the epoch drawn last, and its episodes

    @property
    def num_batches(self):
        return len(self.epochs) * self.batches_per_epoch

    def __getitem__(self, index):
        epoch, batch = divmod(index, self.batches_per_epoch)
        if self.drawn[0] != self.epochs[epoch]:
            self.drawn = self.epochs[epoch], self.draw(self.epochs[epoch])
        in_batch = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        indices, labels, moves = (None if array is None else array[in_batch] for array in self.drawn[1])
        images = self.images[indices]
        inputs = shifted(images, moves, self.shift) if self.shift else images, previous_labels(labels)
        if self.first_occurrence_weight == 1:
            return inputs, labels
        # The weighed loss is least where each label not yet seen gets X times the probability the plain one gives
        # it: the model answers "new" with less certainty that nothing earlier matches. Only training is weighed
        # (its loss is the weighed mean); val_loss stays the plain cross-entropy, comparable across runs.
        first = ops.convert_to_numpy(occurrences(labels, int(labels.max()) + 1)) == 1
        return inputs, labels, np.where(first, self.first_occurrence_weight, 1.0).astype(np.float32)


def validation_batches(dataset, classes, images_per_class, batch_size, episodes):
    """`episodes` episodes of `dataset` in batches: the same ones in every epoch and every run."""
    indices, labels = EpisodeGenerator(dataset, classes, images_per_class, seed=[VALIDATION_SEED, 0]).sample(episodes)
    return EpisodeBatches(dataset.data["images"], lambda epoch: (indices, labels, None), episodes, batch_size)


def training_batches(dataset, classes, images_per_class, batch_size, episodes, seed, epochs, shift=0,
                     first_occurrence_weight=1.0, within_alphabet=0.0):
    """The batches of `episodes` fresh episodes an epoch, for each epoch of the `range` `epochs`, one after another.

    An epoch's episodes, and the moves of its images by up to `shift` pixels, are drawn with the seed
    `(seed, epoch)` alone: a resumed run sees the epochs it has left as an uninterrupted run does.
    `fit` needs `steps_per_epoch`. `first_occurrence_weight`: as `EpisodeBatches` has it.
    """
    steps = episode_length(classes, images_per_class)

    def draw(epoch):
        indices, labels = EpisodeGenerator(dataset, classes, images_per_class, [seed, epoch],
                                           within_alphabet).sample(episodes)
        moves = np.random.default_rng([seed, epoch, 1]).integers(0, 2 * shift + 1, [episodes, steps, 2])
        return indices, labels, moves

    return EpisodeBatches(dataset.data["images"], draw, episodes, batch_size, epochs, shift, first_occurrence_weight)


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


def metric_names(images_per_class):
    """The metrics that training reports, in the order of the graded lines (each also with `val_` before it)."""
    return ["loss", "acc"] + [f"acc{nth}" for nth in reported_occurrences(images_per_class)]


# The memory cell

def unit_vectors(x):
    """`ops.normalize(x)` over the last axis: x over its norm, floored at Keras's epsilon (an empty cell stays 0)."""
    inverse_norms = ops.minimum(ops.rsqrt(ops.sum(ops.square(x), axis=-1, keepdims=True)), 1 / keras.config.epsilon())
    return ops.multiply(x, inverse_norms)


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
        # Owns the controller's weights, with Keras's LSTM initializers; `call` spells out its equations.
        self.controller = keras.layers.LSTMCell(units)
        # The write value, then the read keys.
        self.interface_size = (read_heads + 1) * cell_size
        self.interface_layer = keras.layers.Dense(self.interface_size)
        self.output_layer = keras.layers.Dense(units, activation="tanh")
        # h, c, the read value and the memory, flat: Keras RNN states must be vectors.
        self.state_size = [units, units, self.read_size, memory_cells * cell_size]
        self.output_size = units

    def build(self, input_shape):
        self.input_size = input_shape[-1]
        self.controller.build((None, self.input_size + self.read_size))
        self.interface_layer.build((None, self.units))
        self.output_layer.build((None, self.units + self.read_size))

    def call(self, inputs, states, training=None):
        # states: [h (batch, units), c (batch, units), read_value (batch, read_heads * cell_size),
        #          memory (batch, memory_cells * cell_size)]
        h, c, read_value, memory = states
        memory = ops.reshape(memory, (-1, self.memory_cells, self.cell_size))  # the newest write first
        batch_size = ops.shape(h)[0]

        # The controller: an LSTM over the input and the last read value.
        kernel, recurrent_kernel = self.controller.kernel, self.controller.recurrent_kernel
        gates = (ops.matmul(inputs, kernel[:self.input_size]) + self.controller.bias
                 + ops.matmul(ops.concatenate([h, read_value], axis=-1),
                              ops.concatenate([recurrent_kernel, kernel[self.input_size:]])))
        input_gate, forget_gate, candidate, output_gate = ops.split(gates, 4, axis=-1)
        c = ops.sigmoid(forget_gate) * c + ops.sigmoid(input_gate) * ops.tanh(candidate)
        h = ops.sigmoid(output_gate) * ops.tanh(c)

        # The interface: one write value and a key for each read head.
        interface = self.interface_layer(h)
        write_value, read_keys = ops.tanh(interface[:, :self.cell_size]), ops.tanh(interface[:, self.cell_size:])
        # An explicit batch size: with --read_heads=0 the keys are empty and -1 could not be inferred.
        read_keys = ops.reshape(read_keys, (batch_size, self.read_heads, self.cell_size))

        # Read the memory as it was: each head a softmax over the cells of their cosines with its key.
        similarity = ops.einsum("bhc,bmc->bhm", unit_vectors(read_keys), unit_vectors(memory))
        read_weights = ops.softmax(self.read_sharpness * similarity, axis=-1)
        read_value = ops.reshape(ops.matmul(read_weights, memory), (batch_size, self.read_size))
        # Then write: the newest write first, the oldest cell drops.
        memory = ops.concatenate([write_value[:, None], memory[:, :-1]], axis=1)

        output = self.output_layer(ops.concatenate([h, read_value], axis=-1))
        return output, [h, c, read_value, ops.reshape(memory, (-1, self.memory_cells * self.cell_size))]

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, memory_cells=self.memory_cells, cell_size=self.cell_size,
                      read_heads=self.read_heads, read_sharpness=self.read_sharpness)
        return config


# The model

@keras.saving.register_keras_serializable(package="learning_to_learn")
class MemoryAugmentedRNN(keras.layers.RNN):
    """`keras.layers.RNN` over a `MemoryAugmentedLSTM`, through the backend's fused recurrence where it has one.

    As `keras.layers.LSTM` hands its loop to cuDNN where it can, this layer hands its loop to
    `backends.fused_kernels()`: the same function, faster (`deterministic`: as graded runs
    need it). Where the backend has none, the cell runs as `keras.layers.RNN` runs it.
    """

    def __init__(self, cell, deterministic=False, **kwargs):
        super().__init__(cell, **kwargs)
        self.deterministic = deterministic  # how it runs, not what: saved models leave it out

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if (fused := backends.fused_kernels()) is None or mask is not None or self.go_backwards or self.unroll:
            return super().inner_loop(sequences, initial_state, mask, training=training)
        return fused.recurrence(self.cell, sequences, initial_state, self.deterministic)


@keras.saving.register_keras_serializable(package="learning_to_learn")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras's batch normalisation, of images in training through the backend's fused kernel where it has one."""

    def call(self, inputs, training=None, mask=None):
        fused = getattr(backends.fused_kernels(), "batch_normalization", None)
        if fused is None or not (training and self.trainable) or mask is not None or len(inputs.shape) != 4:
            return super().call(inputs, training=training, mask=mask)
        return fused(self, inputs)


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
        # A fused kernel saves a third of the assignment CNN's time, half of the few-shot CNN's (measured on CPUs).
        normalization = (FusedBatchNormalization if fused or pooling else keras.layers.BatchNormalization)(dtype=dtype)
        layers += [convolution, normalization, keras.layers.ReLU(dtype=dtype)]
        if pooling:
            layers.append(keras.layers.MaxPooling2D(2, dtype=dtype))
    to_float32 = [keras.layers.Activation("linear", dtype="float32")] if bfloat16 else []  # the features
    return keras.Sequential(layers + [keras.layers.Flatten(dtype=dtype)] + to_float32, name="image_features")


def earlier_cosines(features):
    """The cosine of each step's image features `[episodes, steps, features]` with every step's,
    `[episodes, steps, steps]`, and which of them came earlier in the episode, `[steps, steps]`."""
    units = unit_vectors(features)
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
                feature_labels=False, fused=True, deterministic=False):
    """The model of episodes of `classes` x `images_per_class` steps, not compiled: CNN, memory cell, softmax at
    every step. The defaults are the assignment's; each argument is the flag of its name. `fused` runs the cell
    and the CNN's normalisation through the backend's fused kernels where it has them; `fused=False` runs them as
    Keras does, step by step with automatic gradients: the same function, slower. `deterministic`: as graded
    runs need, the fused recurrence in one uncompiled loop and the assignment's CNN normalising in Keras's layers,
    whose last bits the graded lines hold."""
    steps = episode_length(classes, images_per_class)
    images = keras.Input([steps, Omniglot.H, Omniglot.W, Omniglot.C], name="images")
    labels = keras.Input([steps], dtype="int32", name="previous_labels")

    # One pass of the CNN over all images of the batch, then back to episodes.
    cnn = image_features(cnn_filters, cnn_pooling, cnn_bfloat16, fused and not deterministic)
    features = cnn(ops.reshape(images, (-1, Omniglot.H, Omniglot.W, Omniglot.C)))
    features = ops.reshape(features, (-1, steps, features.shape[-1]))
    vote = EarlierLabelVote(classes, name="earlier_label_vote") if feature_labels else None
    inputs = cell_inputs(features, labels, classes, feature_match, vote)

    cell = MemoryAugmentedLSTM(lstm_dim, memory_cells=steps, cell_size=cell_size, read_heads=read_heads,
                               read_sharpness=read_sharpness)
    recurrence = MemoryAugmentedRNN(cell, deterministic, return_sequences=True) if fused else \
        keras.layers.RNN(cell, return_sequences=True)
    outputs = recurrence(inputs)
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
                        feature_match=args.feature_match, feature_labels=args.feature_labels, fused=fused,
                        deterministic=args.recodex)
    learning_rate = args.learning_rate
    if args.learning_rate_decay == "cosine":
        # A function of the optimizer's step count, which checkpoints keep: a resumed run goes on along the curve.
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=args.epochs * steps_per_epoch(args.train_episodes, args.batch_size))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), **loss_and_metrics(args.images_per_class))
    return model


def loss_and_metrics(images_per_class):
    """What `compile` needs besides the optimizer, for episodes of `images_per_class` drawings of each class."""
    nth_occurrences = [NthOccurrenceAccuracy(nth) for nth in reported_occurrences(images_per_class)]
    return dict(loss=keras.losses.SparseCategoricalCrossentropy(), jit_compile=backends.whole_step_compiled(),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc"), *nth_occurrences])


def load_trained_model(path, classes=None, images_per_class=None, deterministic=False):
    """Loads a model saved by --save_model on any backend, compiled for evaluation, refusing other files and,
    where given, models of other episodes. `deterministic`: as `build_model` has it."""
    try:
        model = keras.models.load_model(path, compile=False)  # an optimizer it was saved with is of no use here
    except Exception as error:
        raise DataError(f"{path} is not a model saved by this program ({error})") from None
    recurrences = [layer for layer in model.layers if isinstance(getattr(layer, "cell", None), MemoryAugmentedLSTM)]
    if not recurrences:
        raise DataError(f"{path} is a Keras model but not one of this program: it has no MemoryAugmentedLSTM")
    for recurrence in recurrences:
        recurrence.deterministic = deterministic
    steps, model_classes = model.inputs[0].shape[1], model.outputs[0].shape[-1]
    if classes and (steps, model_classes) != (episode_length(classes, images_per_class), classes):
        raise DataError(f"{path} was trained on episodes of --classes={model_classes} "
                        f"--images_per_class={steps // model_classes}: evaluate it with those flags")
    model.compile(**loss_and_metrics(steps // model_classes))
    return model


def main(args, callbacks=()):
    """Trains as `args` say, or evaluates; returns the last epoch's metrics by name. `callbacks` join fit's."""
    threads = int(args.recodex) if args.threads is None else args.threads
    backends.configure(min(threads, backends.usable_cores()), deterministic=args.recodex)  # more wait their turn
    keras.utils.set_random_seed(args.seed)  # seeds the weight initializers too
    backends.distribute_over_devices()  # each batch split across them, where the backend sees several
    if not args.recodex:
        print(f"{parser.prog}: {'evaluating' if args.evaluate else 'training'} on {backends.device()}",
              file=sys.stderr, flush=True)

    omniglot = Omniglot()
    long_runs.check_episodes_fit(parser, args, omniglot)
    checkpoint = EpochCheckpoint(args.checkpoint_dir, long_runs.run_flags(args), long_runs.defaults(parser)).claim() \
        if args.checkpoint_dir else None
    names = metric_names(args.images_per_class)
    validation = validation_batches(omniglot.test, args.classes, args.images_per_class, args.batch_size,
                                    args.test_episodes)
    verbose = 0 if args.recodex else "auto"

    if args.evaluate:
        model = load_trained_model(args.evaluate, args.classes, args.images_per_class, deterministic=args.recodex)
        logs = model.evaluate(validation, return_dict=True, verbose=verbose)
        print(f"Test {metrics_line(logs, names)}", flush=True)
        return {name: float(value) for name, value in logs.items()}

    model = model_for_training(args)
    initial_epoch = checkpoint.restore(model) if checkpoint else 0
    callbacks = [long_runs.StopOnDivergence(), *callbacks] + ([checkpoint] if checkpoint else [])
    if args.logdir:
        callbacks += [keras.callbacks.TensorBoard(args.logdir), long_runs.EpisodePictures(args.logdir, validation[0])]
    if args.recodex:
        callbacks.append(GradedEpochLine(args.epochs, names))

    train = training_batches(with_rotations(omniglot.train) if args.rotations else omniglot.train,
                             args.classes, args.images_per_class, args.batch_size, args.train_episodes,
                             args.seed, epochs=range(initial_epoch, args.epochs), shift=args.shift,
                             first_occurrence_weight=args.first_occurrence_weight, within_alphabet=args.within_alphabet)
    with long_runs.told_what_is_kept(checkpoint, args.save_model):
        # shuffle=False: the episodes are drawn at random already, and one epoch's batches follow another's.
        history = model.fit(train, epochs=args.epochs, initial_epoch=initial_epoch,
                            steps_per_epoch=steps_per_epoch(args.train_episodes, args.batch_size),
                            shuffle=False, validation_data=validation, verbose=verbose, callbacks=callbacks)
        if args.save_model:
            long_runs.save_uncompiled(model, args.save_model)
    return {name: float(values[-1]) for name, values in history.history.items()}


def parse_args(argv=None):
    """The flags of `argv` (default: the command line), checked (`long_runs.checked_flags`): a bad one ends the
    program as argparse does."""
    args = long_runs.checked_flags(parser, argv)
    if reported_occurrences(args.images_per_class) != OCCURRENCES:
        print(f"Note: with --images_per_class={args.images_per_class} no class appears {OCCURRENCES[-1]} times "
              f"in an episode: only {', '.join(metric_names(args.images_per_class))} are reported.", file=sys.stderr)
    return args


if __name__ == "__main__":
    long_runs.ending_in_one_line(lambda: main(parse_args()))
