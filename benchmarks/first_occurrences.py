#!/usr/bin/env python3
"""Where a trained model's answers go when a class shows up for the first time in an episode.

    OMNIGLOT_DATA=../shared/omniglot/omniglot.npz python3 benchmarks/first_occurrences.py MODEL.keras [FLAGS]

MODEL.keras is a model saved by `learning_to_learn.py --save_model`; FLAGS are
the program's (--classes, --images_per_class, --test_episodes) as it was
trained. On the validation episodes, the answer to a first occurrence is
either a label already seen in the episode (certainly wrong) or a new one
(right if it is the one the episode gave); the best a model can do is guess
among the new ones, which gives the limit printed after them.

Then how the read heads address the memory, from the reads recomputed in
numpy (checked against the model's): the weight a read gives the cells
written right after an image of the step's class (whose input held that
class's label) and the cells written at an image of its class, each against
an average written cell (1: no preference), at 2nd and later occurrences;
and the AUC of the best match (the largest cosine between the key and a
written cell): the chance that a 2nd occurrence matches better than a 1st
one (1: the match alone tells a seen character from a new one; .5: it tells
nothing). For the CNN's features, the same AUC and how often the nearest
earlier image is of the same class.

Last, the trade between the 1st occurrence and the 2nd: the accuracies if
the probabilities of the labels not yet seen were multiplied by a factor
before the answer is taken. A loss weighed that many times at first drawings
(--first_occurrence_weight) asks the model for the same answers.
"""
import os
import sys

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from learning_to_learn import (  # noqa: E402
    MemoryAugmentedLSTM,
    load_trained_model,
    occurrences,
    parse_args,
    parser,
    validation_batches,
)
from omniglot_dataset import DataError, Omniglot  # noqa: E402

NEW_LABEL_FACTORS = [1, 1.5, 1.75, 2, 3]  # the factors of the 1st-or-2nd trade's table


def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)


def inside_the_reads(model, images, previous):
    """The model's recurrence run again to see inside: the CNN's features `[episodes, steps, features]`, and
    each head's cosine similarities and read weights `[episodes, heads, steps t, steps u]` of the key at step t
    with the cell written at step u (at u >= t, an empty cell)."""
    rnn = next(layer for layer in model.layers if isinstance(getattr(layer, "cell", None), MemoryAugmentedLSTM))
    cell = rnn.cell
    inputs = keras.Model(model.inputs, rnn.input)((images, previous))  # the CNN's features first
    episodes, steps = inputs.shape[:2]
    if cell.memory_cells != steps:
        sys.exit("first_occurrences.py: error: the model's memory holds not one cell for each step")
    state, hs, read_values = [ops.zeros((episodes, size)) for size in cell.state_size], [], []
    for step in range(steps):  # the cell's own steps, whatever the backend
        _, state = cell(inputs[:, step], state)
        hs.append(state[0])
        read_values.append(state[2])
    hs, read_values = (np.stack([ops.convert_to_numpy(x) for x in steps_of], axis=1) for steps_of in (hs, read_values))
    interface = hs @ ops.convert_to_numpy(cell.interface_layer.kernel) + ops.convert_to_numpy(cell.interface_layer.bias)
    writes = np.tanh(interface[..., :cell.cell_size])
    keys = np.tanh(interface[..., cell.cell_size:]).reshape(episodes, steps, cell.read_heads, -1)
    written = np.tri(steps, k=-1, dtype=bool)  # [t, u]: u < t
    similarity = np.where(written, np.einsum("bthc,buc->bhtu", unit(keys), unit(writes)), 0)
    read_weights = np.exp(cell.read_sharpness * similarity)
    read_weights /= read_weights.sum(axis=-1, keepdims=True)
    reads = np.einsum("bhtu,buc->bthc", read_weights * written, writes).reshape(episodes, steps, -1)
    np.testing.assert_allclose(reads, read_values[..., :reads.shape[-1]], atol=1e-4)
    features = ops.convert_to_numpy(inputs)[..., :model.get_layer("image_features").output.shape[-1]]
    return features, similarity, read_weights


def auc(higher, lower):
    """The chance that a value of `higher` exceeds one of `lower`, ties counting half."""
    lower = np.sort(lower)
    below = np.searchsorted(lower, higher, side="left")
    equal = np.searchsorted(lower, higher, side="right") - below
    return (below + equal / 2).mean() / len(lower)


def main(path, args):
    model = load_trained_model(path, args.classes, args.images_per_class)
    answered_seen, right, labels_seen = [], [], []  # at each first occurrence
    best_matches = {}  # name: best matches at first occurrences (but the first step), and at second ones
    preferences = {}  # head: read weight per labelled cell, and per same-class cell, against per written cell
    nearest_right = []  # whether the CNN's nearest earlier image at a second occurrence is of its class
    tilted_right = {factor: ([], [], []) for factor in NEW_LABEL_FACTORS}  # at 1st, 2nd, all occurrences
    batches = validation_batches(Omniglot().test, args.classes, args.images_per_class, args.batch_size,
                                 args.test_episodes)
    for (images, previous), labels in batches:
        labels = labels.numpy()
        probabilities = model.predict_on_batch((images, previous))
        guesses = np.argmax(probabilities, axis=-1)
        one_hot = np.eye(args.classes, dtype=bool)[labels]  # (episodes, steps, classes)
        seen_before = np.cumsum(one_hot, axis=1) - one_hot > 0  # labels given at earlier steps
        occurrence = np.asarray(occurrences(labels, args.classes))
        first, second, later = occurrence == 1, occurrence == 2, occurrence >= 2
        answered_seen.append(np.take_along_axis(seen_before, guesses[..., None], axis=-1)[..., 0][first])
        right.append((guesses == labels)[first])
        labels_seen.append(seen_before.sum(axis=-1)[first])
        for factor, kept in tilted_right.items():
            tilted = np.argmax(np.where(seen_before, probabilities, factor * probabilities), axis=-1) == labels
            for values, steps in zip(kept, [first, second, np.ones_like(first)], strict=True):
                values.append(tilted[steps])

        features, similarity, read_weights = inside_the_reads(model, images, previous)
        written = np.tri(labels.shape[1], k=-1, dtype=bool)  # [t, u]: u < t
        same_class = (labels[:, :, None] == labels[:, None, :]) & written  # [episode, t, u]
        labelled = np.pad(same_class[..., :-1], [[0, 0], [0, 0], [1, 0]]) & written  # step u - 1 of t's class
        first[:, 0] = False  # nothing to match yet
        feature_similarity = np.where(written, np.einsum("btf,buf->btu", unit(features), unit(features)), -2)
        nearest = np.argmax(feature_similarity, axis=-1)
        nearest_right.append(np.take_along_axis(labels, nearest, axis=1)[second] == labels[second])
        for name, best in [("CNN features", feature_similarity.max(-1)),
                           *[(f"read head {head + 1}", np.where(written, similarity[:, head], -2).max(-1))
                             for head in range(similarity.shape[1])]]:
            kept = best_matches.setdefault(name, ([], []))
            kept[0].append(best[first])
            kept[1].append(best[second])
        for head in range(similarity.shape[1]):
            weights = read_weights[:, head][later]  # [occurrence, u]
            per_written = (weights * written[np.nonzero(later)[1]]).sum(-1) / np.nonzero(later)[1]
            kept = preferences.setdefault(head, ([], []))
            for values, cells in zip(kept, [labelled[later], same_class[later]], strict=True):
                values.append((weights * cells).sum(-1) / np.maximum(cells.sum(-1), 1) / per_written)

    answered_seen, right, labels_seen = map(np.concatenate, [answered_seen, right, labels_seen])
    print(f"first occurrences: {len(right)}")
    print(f"accuracy (val_acc1): {right.mean():.4f}")
    print(f"answered with a label already seen: {answered_seen.mean():.4f}")
    print(f"accuracy of the answers with a new label: {right.sum() / np.sum(~answered_seen):.4f}")
    print(f"limit (a guess among the new labels): {np.mean(1 / (args.classes - labels_seen)):.4f}")
    for count in range(1, args.classes):
        share = answered_seen[labels_seen == count].mean()
        print(f"  after {count} of the {args.classes} labels: answered with one already seen {share:.4f}")
    print("how the reads weigh a cell at 2nd and later occurrences, against an average written cell:")
    for head, (by_label, by_image) in preferences.items():
        by_label, by_image = np.concatenate(by_label).mean(), np.concatenate(by_image).mean()
        print(f"  read head {head + 1}: written right after an image of the class {by_label:.4f}, "
              f"written at one {by_image:.4f}")
    print("best match, mean at 1st / 2nd occurrences, and its AUC (2nd above 1st):")
    for name, (at_first, at_second) in best_matches.items():
        at_first, at_second = np.concatenate(at_first), np.concatenate(at_second)
        print(f"  {name}: {at_first.mean():.4f} / {at_second.mean():.4f}, AUC {auc(at_second, at_first):.4f}")
    print("the CNN's nearest earlier image at 2nd occurrences of the same class: "
          f"{np.concatenate(nearest_right).mean():.4f}")
    print("the labels not yet seen made X times as probable: accuracy at 1st / 2nd occurrences / all steps:")
    for factor, kept in tilted_right.items():
        print(f"  X = {factor}: " + " / ".join(f"{np.concatenate(values).mean():.4f}" for values in kept))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        parser.exit(2, "usage: python3 benchmarks/first_occurrences.py MODEL.keras [learning_to_learn.py flags]\n")
    try:
        main(sys.argv[1], parse_args(sys.argv[2:]))
    except DataError as error:
        parser.exit(2, f"first_occurrences.py: error: {error}\n")
