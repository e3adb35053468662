#!/usr/bin/env python3
"""Where a trained model's answers go when a class shows up for the first time in an episode.

    OMNIGLOT_DATA=../shared/omniglot/omniglot.npz python3 benchmarks/first_occurrences.py MODEL.keras [FLAGS]

MODEL.keras is a model saved by `learning_to_learn.py --save_model`; FLAGS are
the program's (--classes, --images_per_class, --test_episodes) as it was
trained. On the validation episodes, the answer to a first occurrence is
either a label already seen in the episode (certainly wrong) or a new one
(right if it is the one the episode gave); the best a model can do is guess
among the new ones, which gives the limit printed last.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from learning_to_learn import load_trained_model, occurrences, parse_args, parser, validation_batches  # noqa: E402
from omniglot_dataset import DataError, Omniglot  # noqa: E402


def main(path, args):
    model = load_trained_model(path, args.classes, args.images_per_class)
    answered_seen, right, labels_seen = [], [], []  # at each first occurrence
    batches = validation_batches(Omniglot().test, args.classes, args.images_per_class, args.batch_size,
                                 args.test_episodes)
    for (images, previous), labels in batches:
        labels = labels.numpy()
        guesses = np.argmax(model.predict_on_batch((images, previous)), axis=-1)
        one_hot = np.eye(args.classes, dtype=bool)[labels]  # (episodes, steps, classes)
        seen_before = np.cumsum(one_hot, axis=1) - one_hot > 0  # labels given at earlier steps
        first = np.asarray(occurrences(labels, args.classes)) == 1
        answered_seen.append(np.take_along_axis(seen_before, guesses[..., None], axis=-1)[..., 0][first])
        right.append((guesses == labels)[first])
        labels_seen.append(seen_before.sum(axis=-1)[first])
    answered_seen, right, labels_seen = map(np.concatenate, [answered_seen, right, labels_seen])
    print(f"first occurrences: {len(right)}")
    print(f"accuracy (val_acc1): {right.mean():.4f}")
    print(f"answered with a label already seen: {answered_seen.mean():.4f}")
    print(f"accuracy of the answers with a new label: {right.sum() / np.sum(~answered_seen):.4f}")
    print(f"limit (a guess among the new labels): {np.mean(1 / (args.classes - labels_seen)):.4f}")
    for count in range(1, args.classes):
        share = answered_seen[labels_seen == count].mean()
        print(f"  after {count} of the {args.classes} labels: answered with one already seen {share:.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        parser.exit(2, "usage: python3 benchmarks/first_occurrences.py MODEL.keras [learning_to_learn.py flags]\n")
    try:
        main(sys.argv[1], parse_args(sys.argv[2:]))
    except DataError as error:
        parser.exit(2, f"first_occurrences.py: error: {error}\n")
