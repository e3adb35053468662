"""NthOccurrenceAccuracy against accuracies counted by hand."""
import numpy as np
import pytest
from keras import ops

from learning_to_learn import NthOccurrenceAccuracy, metric_names, occurrences


def predictions(guesses, classes=3):
    return np.eye(classes, dtype=np.float32)[guesses]


# Two episodes. Occurrence of each step's class:
#   episode 1: labels 0 1 0 0 1 2 -> 1st 1st 2nd 3rd 2nd 1st; guesses right at steps 0, 2, 4
#   episode 2: labels 2 2 1 2 0 1 -> 1st 2nd 1st 3rd 1st 2nd; guesses right at steps 1, 3, 4
# so that the 1st, 2nd and 3rd occurrence each have an accuracy of their own: 2/6, 3/4, 1/2.
LABELS = np.array([[0, 1, 0, 0, 1, 2], [2, 2, 1, 2, 0, 1]])
GUESSES = np.array([[0, 2, 0, 1, 1, 0], [0, 2, 0, 2, 0, 2]])


def test_occurrences_count_each_label_from_one():
    np.testing.assert_array_equal(ops.convert_to_numpy(occurrences(LABELS, 3)), [[1, 1, 2, 3, 2, 1],
                                                                                  [1, 2, 1, 3, 1, 2]])


@pytest.mark.parametrize("nth, right, seen", [
    (1, 1 + 1, 3 + 3),  # 1st: episode 1 steps 0, 1, 5 (0 right); episode 2 steps 0, 2, 4 (4 right)
    (2, 2 + 1, 2 + 2),  # 2nd: episode 1 steps 2, 4 (both right); episode 2 steps 1, 5 (1 right)
    (3, 0 + 1, 1 + 1),  # 3rd: episode 1 step 3 (wrong); episode 2 step 3 (right)
])
def test_accuracy_on_nth_occurrence_matches_hand_count(nth, right, seen):
    metric = NthOccurrenceAccuracy(nth)
    metric.update_state(LABELS, predictions(GUESSES))
    assert float(metric.result()) == pytest.approx(right / seen)


def test_accumulates_over_batches_by_count_not_by_batch_mean():
    metric = NthOccurrenceAccuracy(2)
    metric.update_state(LABELS[:1], predictions(GUESSES[:1]))  # 2 of 2
    metric.update_state(LABELS, predictions(GUESSES))  # 3 of 4
    assert float(metric.result()) == pytest.approx(5 / 6)  # a mean of the two batches' accuracies would be 0.875
    metric.reset_state()
    assert float(metric.result()) == 0


def test_name_and_config_round_trip():
    metric = NthOccurrenceAccuracy(5)
    assert metric.name == "acc5"
    clone = NthOccurrenceAccuracy.from_config(metric.get_config())
    assert clone.nth == 5 and clone.name == "acc5"


def test_reported_names_are_the_assignments_and_only_occurrences_an_episode_has():
    assert metric_names(10) == ["loss", "acc", "acc1", "acc2", "acc5", "acc10"]
    assert metric_names(3) == ["loss", "acc", "acc1", "acc2"]
    assert metric_names(1) == ["loss", "acc", "acc1"]
