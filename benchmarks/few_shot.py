#!/usr/bin/env python3
"""A saved model on N-way K-shot tasks: the field's yardstick, next to the program's own online one.

    OMNIGLOT_DATA=../shared/omniglot/omniglot.npz python3 benchmarks/few_shot.py MODEL.keras --shots K

A task takes N characters of the 20 evaluation alphabets (N: the model's
classes), gives each a random label, and shows the model K drawings of each
(the support, shuffled, each label one step after its drawing, as training
shows them); then a query, another drawing of one of the N, whose answer is
the model's most probable label at the query's step. Each query is answered
from the state after the support alone, never after another query: the
support runs once a task, and each query is one step from the state it
leaves (any other causal model gets each query as an episode of its own,
padded with blank steps it cannot see). Tasks are drawn by `--seed`, the
same for every model;
accuracy is over all queries, its 95% confidence interval over tasks.
`--within_alphabet` takes each task's characters from one alphabet, as Lake's
runs do: the harder tasks of a 4-layer siamese net's 90.5% (5-way 1-shot).

`--prototypes` scores the model's CNN alone, without the memory or the
labels' steps: a query takes the label of the support class whose prototype,
the mean of its drawings' unit feature vectors, is nearest in cosine (as
prototypical networks do, by cosine). It tells what the features can tell
apart, at any number of `--ways`.
"""
import argparse
import functools
import os
import sys

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from learning_to_learn import EarlierLabelVote, EpisodeGenerator, MemoryAugmentedLSTM, cell_inputs, load_trained_model  # noqa: E402
from omniglot_dataset import DataError, Omniglot  # noqa: E402


def draw_tasks(dataset, ways, shots, queries, count, seed, within_alphabet=False):
    """`count` tasks of `dataset`: `(support, support_labels, query, query_labels)`, image indices and labels,
    `[count, ways * shots]` in the order shown and `[count, ways * queries]`.

    The program's own episodes of `shots + queries` drawings of each class, split: of each class, the drawings
    that come first in the shuffled episode are its support, the others its queries.
    """
    indices, labels = EpisodeGenerator(dataset, ways, shots + queries, seed, within_alphabet).sample(count)
    one_hot = labels[..., None] == np.arange(ways)
    rank = np.take_along_axis(np.cumsum(one_hot, axis=1), labels[..., None], axis=-1)[..., 0] - 1  # 0 first
    support, query = rank < shots, rank >= shots
    return (indices[support].reshape(count, -1), labels[support].reshape(count, -1),
            indices[query].reshape(count, -1), labels[query].reshape(count, -1))


def answer_queries(model, images, support, support_labels, query, batch_size=64, progress=None):
    """The model's probabilities of each label for each query `[tasks, queries, classes]`, from the state after the
    support alone.

    `images` `[N, H, W, C]`; `support`, `support_labels` `[tasks, shown]`, `query` `[tasks, queries]`: image
    indices and labels. Each query is answered as the last step of an episode of its own: the support, its
    labels one step later, then the query, which gets the last support label as every step gets the one
    before it. `batch_size` counts tasks; `progress` (a `keras.utils.Progbar`) counts the queries answered.
    """
    steps, shown = model.inputs[0].shape[1], support.shape[1]
    if shown + 1 > steps:
        raise DataError(f"a support of {shown} drawings and a query need {shown + 1} steps; the model's episodes "
                        f"have {steps}")
    tasks, queries = query.shape
    episodes, previous = query_episodes(support, support_labels, query)
    if memory_recurrence(model) is not None:
        features = model.get_layer("image_features").predict(images, batch_size=512, verbose=0)
        answer = functools.partial(answer_from_support_state, model, features, support_pass(model))
    else:
        answer = functools.partial(answer_last_steps, model, images)
    answers = []
    for start in range(0, tasks * queries, batch_size * queries):
        batch = slice(start, start + batch_size * queries)
        answers.append(answer(episodes[batch], previous[batch], queries))
        if progress:
            progress.add(len(answers[-1]))
    return np.concatenate(answers).reshape(tasks, queries, -1)


def query_episodes(support, support_labels, query):
    """Each query's episode `[tasks * queries, shown + 1]`, task-major: its task's support, then the query; and
    their previous labels, the support's one step later."""
    queries = query.shape[1]
    episodes = np.concatenate([np.repeat(support, queries, axis=0), query.reshape(-1, 1)], axis=1)
    previous = np.full(episodes.shape, -1, np.int32)
    previous[:, 1:] = np.repeat(support_labels, queries, axis=0)
    return episodes, previous


def memory_recurrence(model):
    """The RNN layer over this program's memory cell, if `model` is one of the program's; else None."""
    return next((layer for layer in model.layers if isinstance(getattr(layer, "cell", None), MemoryAugmentedLSTM)),
                None)


def answer_last_steps(model, images, episodes, previous, queries):
    """Any causal model, of `images` `[N, H, W, C]`: each episode padded with blank steps, with no label, to the
    model's length, then the model's answer at its last real step."""
    steps, shown = model.inputs[0].shape[1], episodes.shape[1] - 1
    blank = np.zeros((len(episodes), steps - shown - 1, *images.shape[1:]), images.dtype)
    padding = np.full((len(episodes), steps - shown - 1), -1, np.int32)
    return model.predict_on_batch((np.concatenate([images[episodes], blank], axis=1),
                                   np.concatenate([previous, padding], axis=1)))[:, shown]


def support_pass(model):
    """The recurrence of `model` (one of the program's) returning its last state; on TensorFlow as one traced
    function: run eagerly, the fused recurrence would compile anew at every call."""
    recurrence = memory_recurrence(model)
    layer = type(recurrence)(recurrence.cell, return_state=True)
    if keras.backend.backend() != "tensorflow":
        return layer
    import tensorflow as tf

    return tf.function(layer, reduce_retracing=True)


def answer_from_support_state(model, features, support_state, episodes, previous, queries):
    """A model of learning_to_learn.py, of images of CNN `features` `[N, features]`: as `answer_last_steps`
    answers, but faster, for the support's steps, the same in every query's episode, run once a task (by
    `support_state`, a `support_pass`); each query is one step of the cell from the state after them."""
    vote = next((layer for layer in model.layers if isinstance(layer, EarlierLabelVote)), None)
    cell, classes, shown = memory_recurrence(model).cell, model.outputs[0].shape[-1], episodes.shape[1] - 1
    features = features[episodes]
    # The model keeps no flags: of the cell's input, what the features, the labels and the vote leave is the
    # best earlier match's one column.
    feature_match = cell.input_size > features.shape[-1] + classes * (2 if vote else 1)
    inputs = cell_inputs(features, previous, classes, feature_match, vote)
    _, *state = support_state(inputs[::queries, :shown])  # each task's first episode
    output, _ = cell(inputs[:, shown], [ops.repeat(part, queries, axis=0) for part in state])
    return ops.convert_to_numpy(model.layers[-1](output))


def prototype_similarities(features, support, support_labels, query, ways):
    """Each query's cosine with each class's prototype `[tasks, queries, ways]`: the mean of the unit vectors of
    its support's `features` `[N, features]` (rows of image indices; `support`, `support_labels`, `query` as in
    `answer_queries`)."""
    units = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    one_hot = (support_labels[..., None] == np.arange(ways)).astype(units.dtype)  # [tasks, shown, ways]
    prototypes = np.einsum("tsw,tsf->twf", one_hot, units[support])
    prototypes /= np.maximum(np.linalg.norm(prototypes, axis=-1, keepdims=True), 1e-12)
    return np.einsum("tqf,twf->tqw", units[query], prototypes)


def accuracy_and_interval(right):
    """The accuracy over all of `right` `[tasks, queries]` and the half-width of its 95% confidence interval over
    tasks (normal, as the few-shot literature reports it)."""
    per_task = right.mean(axis=1)
    return right.mean(), 1.96 * per_task.std(ddof=1) / np.sqrt(len(per_task)) if len(per_task) > 1 else np.nan


def main(options):
    import keras

    model = load_trained_model(options.model)
    ways = options.ways or model.outputs[0].shape[-1]
    dataset = Omniglot().test
    if options.within_alphabet and dataset.alphabets is None:
        raise DataError("--within_alphabet needs each character's alphabet, and the data set names none")
    if ways > (characters := len(np.unique(dataset.data["labels"]))):
        raise DataError(f"--ways: tasks of {ways} classes, and the evaluation alphabets have {characters} characters")
    try:
        support, support_labels, query, query_labels = draw_tasks(dataset, ways, options.shots, options.queries,
                                                                  options.tasks, options.seed, options.within_alphabet)
    except ValueError as error:  # no evaluation alphabet has as many characters as a task has classes
        raise DataError(f"--within_alphabet: {error}, a task has {ways}") from None
    images = dataset.data["images"]
    if options.prototypes:
        features = model.get_layer("image_features").predict(images, batch_size=512, verbose=0)
        answers = prototype_similarities(features, support, support_labels, query, ways)
    else:
        progress = keras.utils.Progbar(query.size, unit_name="query")
        answers = answer_queries(model, images, support, support_labels, query, progress=progress)
    accuracy, interval = accuracy_and_interval(np.argmax(answers, axis=-1) == query_labels)
    print(f"{ways}-way {options.shots}-shot: {100 * accuracy:.2f}% +- {100 * interval:.2f}% (95% confidence) over "
          f"{options.tasks} tasks of {query.shape[1]} queries, the evaluation alphabets"
          f"{', one a task' if options.within_alphabet else ''}, seed {options.seed}"
          + ("; the CNN's prototypes alone" if options.prototypes else ""))
    return accuracy, interval


if __name__ == "__main__":
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("model", metavar="MODEL.keras", help="A model saved by learning_to_learn.py --save_model.")
    options.add_argument("--shots", default=1, type=int, help="Labelled drawings of each class before a query.")
    options.add_argument("--queries", default=1, type=int, help="Queries of each class in a task.")
    options.add_argument("--tasks", default=1000, type=int, help="Tasks to draw.")
    options.add_argument("--seed", default=0, type=int, help="The seed of the tasks.")
    options.add_argument("--within_alphabet", action="store_true", help="Each task's characters of one alphabet.")
    options.add_argument("--prototypes", action="store_true", help="Answer by the CNN's features alone.")
    options.add_argument("--ways", default=None, type=int, help="With --prototypes: classes a task (default: "
                         "the model's).")
    arguments = options.parse_args()
    if arguments.ways is not None and not arguments.prototypes:
        options.error("argument --ways: only with --prototypes; the model answers with its own classes")
    for name, least in [("shots", 1), ("queries", 1), ("tasks", 2), ("ways", 2)]:
        if getattr(arguments, name) is not None and getattr(arguments, name) < least:
            options.error(f"argument --{name}: invalid value {getattr(arguments, name)}: must be at least {least}")
    if arguments.shots + arguments.queries > 20:
        options.error("arguments --shots, --queries: at most 20 in all, the drawings of a character")
    try:
        main(arguments)
    except DataError as error:
        options.exit(2, f"few_shot.py: error: {error}\n")
