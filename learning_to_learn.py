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
data.add_argument("--test_episodes", default=1000, type=integer(1), metavar="N",
                  help="Validation episodes, the same every epoch.")
model_flags = parser.add_argument_group("model")
model_flags.add_argument("--lstm_dim", default=256, type=integer(1), metavar="N", help="Units of the LSTM controller.")
model_flags.add_argument("--cell_size", default=40, type=integer(1), metavar="N", help="Units of one memory cell.")
model_flags.add_argument("--read_heads", default=1, type=integer(0), metavar="N", help="Memory reads per step.")
training = parser.add_argument_group("training")
training.add_argument("--batch_size", default=16, type=integer(1), metavar="N", help="Episodes per batch.")
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


class EpisodeBatches(keras.utils.PyDataset):
    """`episodes` episodes of `EpisodeGenerator` in batches, for `model.fit`.

    Unless `fixed`, every epoch draws fresh episodes, seeded by `(seed, epoch)`
    alone, so that the episodes of an epoch do not depend on what came before.
    """

    def __init__(self, dataset, args, seed, episodes, fixed=False):
        super().__init__()
        self._dataset, self._args, self._seed = dataset, args, seed
        self._episodes, self._fixed = episodes, fixed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self._epoch = epoch
        generator = EpisodeGenerator(self._dataset, self._args, seed=[self._seed, epoch])
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
            self.set_epoch(self._epoch + 1)


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
        return ops.reshape(read_value, (ops.shape(memory)[0], self.read_heads * self.cell_size))

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
        # An explicit batch size: with --read_heads=0 the keys are empty and -1 could not be inferred.
        batch_size = ops.shape(inputs)[0]
        read_keys = ops.reshape(interface[:, self.cell_size:], (batch_size, self.read_heads, self.cell_size))
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


def reported_occurrences(args):
    """The occurrences in OCCURRENCES that an episode has: a class shows up `images_per_class` times."""
    return [nth for nth in OCCURRENCES if nth <= args.images_per_class]


def metric_names(args):
    return ["loss", "acc"] + [f"acc{nth}" for nth in reported_occurrences(args)]


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
        (images, previous), labels = batch
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
    dev = EpisodeBatches(omniglot.test, args, VALIDATION_SEED, args.test_episodes, fixed=True)

    if args.evaluate:
        model = load_trained_model(args.evaluate, args)
        logs = model.evaluate(dev, return_dict=True, verbose=0 if args.recodex else "auto")
        print(f"Test {metrics_line(logs, names)}", flush=True)
        return logs

    train = EpisodeBatches(omniglot.train, args, args.seed, args.train_episodes)
    model = build_model(args)
    callbacks, initial_epoch = list(callbacks), 0
    if args.checkpoint_dir:
        checkpoint = EpochCheckpoint(args.checkpoint_dir, steps_per_epoch=len(train))
        initial_epoch = checkpoint.restore(model)
        train.set_epoch(initial_epoch)
        callbacks.append(checkpoint)
        if initial_epoch >= args.epochs:
            print(f"All {args.epochs} epochs are done in {args.checkpoint_dir}.", file=sys.stderr)
    if args.logdir:
        callbacks += [keras.callbacks.TensorBoard(args.logdir), EpisodePictures(args.logdir, dev[0])]
    if args.recodex:
        callbacks.append(GradedEpochLine(args.epochs, names))

    # No shuffle: the episodes are random already, and Keras would shuffle batches with Python's global
    # random state, which a resumed run cannot restore.
    logs = model.fit(train, epochs=args.epochs, initial_epoch=initial_epoch, validation_data=dev, shuffle=False,
                     verbose=0 if args.recodex else "auto", callbacks=callbacks)
    if args.save_model:
        write_atomically(args.save_model, model.save, suffix=".keras")
    return logs.history


if __name__ == "__main__":
    args = parser.parse_args()
    try:
        main(args)
    except DataError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
