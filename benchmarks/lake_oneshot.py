#!/usr/bin/env python3
"""A saved model on Lake et al.'s 20 one-shot classification runs (Science 2015).

    python3 benchmarks/lake_oneshot.py MODEL.keras [--orders N]

Each run holds 20 training drawings, one of each of 20 characters of one
evaluation alphabet, and 20 test drawings of the same characters by another
drawer; a test drawing is right when it is given the class of its training
drawing. The model sees the 20 training drawings as a support (shuffled,
with random labels, each label one step after its drawing) and answers each
test drawing from the state after them (`few_shot.answer_queries`); its
answer is averaged over `--orders` orders and labellings of the support. It
needs a model of at least 20 classes and 21 steps. Humans err on 4.5% of the
test drawings, Bayesian program learning on 3.3%. `--prototypes` scores the
model's CNN alone, of any model: each test drawing takes the class of the
training drawing nearest in the cosine of their features.

The runs come from `OMNIGLOT_RUNS` (a copy of all_runs.zip), else from the
Keras cache, where the first use downloads them from the data set's own
repository and checks their md5 sum. Drawings are converted as the data
set's are (`omniglot_dataset.to_28x28`).
"""
import argparse
import os
import sys
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from few_shot import answer_queries, prototype_similarities  # noqa: E402

from learning_to_learn import load_trained_model  # noqa: E402
from omniglot_dataset import RELEASE_URL, DataError, download, not_a_file, to_28x28  # noqa: E402

RUNS_FILE = ("all_runs.zip", "e8996daecdf12afeeb4a53a179f06b19")
RUNS_URL = RELEASE_URL + "one-shot-classification/"
WAYS = 20


def runs_zip():
    """The path of all_runs.zip: `OMNIGLOT_RUNS`, else the Keras cache, downloaded and checked when missing."""
    path = os.environ.get("OMNIGLOT_RUNS")
    if path and (not os.path.exists(path) or not_a_file(path)):
        raise DataError(f"OMNIGLOT_RUNS names {path}, which is no file: point it at a copy of all_runs.zip")
    return path or download(*RUNS_FILE, os.environ.get("OMNIGLOT_URL", RUNS_URL))


def read_runs(path):
    """`{run: (training, test, answers)}` of the runs in all_runs.zip: the 20 training and 20 test drawings as
    `[20, 28, 28, 1]` uint8 ink, and for each test drawing the index of its training drawing."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise DataError(f"cannot read {path} as all_runs.zip ({error})") from None
    names, answers = {}, {}  # of each run: its training then test drawings' files; its answers
    with archive:
        for labels in sorted(name for name in archive.namelist() if name.endswith("class_labels.txt")):
            run = labels.split("/")[0]
            pairs = [line.split() for line in archive.read(labels).decode().splitlines() if line.strip()]
            tests, trainings = [test for test, _ in pairs], sorted({training for _, training in pairs})
            if len(pairs) != WAYS or len(trainings) != WAYS:
                raise DataError(f"{path}: {labels} pairs {len(pairs)} test drawings with {len(trainings)} training "
                                f"drawings; expected {WAYS} and {WAYS}")
            names[run], answers[run] = trainings + tests, np.array([trainings.index(training) for _, training in pairs])
        if not names:
            raise DataError(f"{path} holds no run (no runNN/class_labels.txt)")
        images = to_28x28([archive.read(name) for run in names for name in names[run]]).reshape(len(names), 2, WAYS,
                                                                                               28, 28, 1)
    return {run: (training, test, answers[run]) for run, (training, test) in zip(names, images, strict=True)}


def errors_of_run(model, training, test, answers, orders, rng):
    """Whether each test drawing of a run is answered wrongly, the model's answer averaged over `orders` random
    orders and labellings of the training drawings."""
    images = np.concatenate([training, test]).astype(np.float32) / 255
    classes = model.outputs[0].shape[-1]
    # Each order's support of training drawings, and training drawing i's label in it.
    draws = [(rng.permutation(WAYS), rng.permutation(classes)[:WAYS]) for _ in range(orders)]
    order, labels = (np.stack(drawn) for drawn in zip(*draws, strict=True))
    probabilities = answer_queries(model, images, order, np.take_along_axis(labels, order, axis=1),
                                   np.tile(np.arange(WAYS, 2 * WAYS), (orders, 1)))
    # [test drawing, training drawing]: each label's probability, given to its training drawing, over the orders
    belief = np.take_along_axis(probabilities, labels[:, None, :], axis=2).sum(axis=0)
    return np.argmax(belief, axis=-1) != answers


def prototype_errors_of_run(image_features, training, test, answers):
    """Whether each test drawing of a run is answered wrongly by the training drawing whose `image_features` (the
    model's CNN) are nearest to its own in cosine."""
    features = image_features.predict(np.concatenate([training, test]).astype(np.float32) / 255, verbose=0)
    shown = np.arange(WAYS)[None]
    similarities = prototype_similarities(features, shown, shown, WAYS + shown, WAYS)[0]
    return np.argmax(similarities, axis=-1) != answers


def main(options):
    import keras

    model = load_trained_model(options.model)
    if options.prototypes:
        image_features = model.get_layer("image_features")
    elif model.outputs[0].shape[-1] < WAYS or model.inputs[0].shape[1] < WAYS + 1:
        raise DataError(f"{options.model} is a model of {model.outputs[0].shape[-1]} classes and "
                        f"{model.inputs[0].shape[1]} steps; Lake's runs need {WAYS} classes and {WAYS + 1} steps")
    runs = read_runs(runs_zip())
    rng = np.random.default_rng(options.seed)
    progress = keras.utils.Progbar(len(runs), unit_name="run")
    errors = {}
    for run, (training, test, answers) in runs.items():
        if options.prototypes:
            errors[run] = prototype_errors_of_run(image_features, training, test, answers)
        else:
            errors[run] = errors_of_run(model, training, test, answers, options.orders, rng)
        progress.add(1)
    for run, wrong in errors.items():
        print(f"{run}: {100 * wrong.mean():.1f}% error")
    wrong = np.concatenate(list(errors.values()))
    how = "the CNN's features alone" if options.prototypes else f"{options.orders} orders each"
    print(f"error over the {len(wrong)} test drawings of {len(errors)} runs: {100 * wrong.mean():.2f}% "
          f"({how}; humans 4.5%, BPL 3.3%)")
    return wrong.mean()


if __name__ == "__main__":
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("model", metavar="MODEL.keras", help="A model saved by learning_to_learn.py --save_model.")
    options.add_argument("--orders", default=10, type=int, help="Orders and labellings of each run's support.")
    options.add_argument("--seed", default=0, type=int, help="The seed of the orders.")
    options.add_argument("--prototypes", action="store_true", help="Answer by the CNN's features alone.")
    arguments = options.parse_args()
    if arguments.orders < 1:
        options.error(f"argument --orders: invalid value {arguments.orders}: must be at least 1")
    try:
        main(arguments)
    except DataError as error:
        options.exit(2, f"lake_oneshot.py: error: {error}\n")
