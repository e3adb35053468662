"""benchmarks/few_shot.py: the tasks hold their definition, and the scorer gives the answers hand-made models must."""
import argparse
import importlib.util
import os

import keras
import numpy as np
import pytest
from keras import ops

from conftest import ROOT
from learning_to_learn import model_for_training, parse_args

spec = importlib.util.spec_from_file_location("few_shot", os.path.join(ROOT, "benchmarks", "few_shot.py"))
few_shot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(few_shot)


def noise_dataset(characters=30, drawings=20, seed=0):
    """Characters of random images; `labels[i]` is image i's character."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(characters), drawings).astype(np.int32)
    return argparse.Namespace(data={"images": rng.random([len(labels), 28, 28, 1], dtype=np.float32),
                                    "labels": labels})


def test_a_task_shows_k_drawings_of_each_of_n_characters_then_other_drawings_of_them():
    dataset = noise_dataset()
    support, support_labels, query, query_labels = few_shot.draw_tasks(dataset, ways=5, shots=3, queries=2,
                                                                      count=50, seed=1)
    assert support.shape == support_labels.shape == (50, 15) and query.shape == query_labels.shape == (50, 10)
    characters = dataset.data["labels"]
    for task in range(50):
        assert sorted(np.bincount(support_labels[task], minlength=5)) == [3] * 5
        assert sorted(np.bincount(query_labels[task], minlength=5)) == [2] * 5
        assert len(set(support[task]) | set(query[task])) == 25, "every drawing once"
        for label in range(5):  # one character a label, in support and queries alike
            assert len(set(characters[support[task][support_labels[task] == label]])
                       | set(characters[query[task][query_labels[task] == label]])) == 1
    assert len({tuple(characters[support[task]]) for task in range(50)}) == 50, "other characters every task"
    assert not all((support_labels[task] == np.sort(support_labels[task])).all() for task in range(50)), "shuffled"
    again = few_shot.draw_tasks(dataset, ways=5, shots=3, queries=2, count=50, seed=1)
    assert all((a == b).all() for a, b in zip(again, (support, support_labels, query, query_labels), strict=True))


def test_within_alphabet_tasks_take_their_characters_from_one_alphabet():
    dataset = noise_dataset()
    dataset.alphabets = np.array([f"alphabet {character // 10}" for character in range(30)])
    support, _, query, _ = few_shot.draw_tasks(dataset, ways=5, shots=1, queries=1, count=100, seed=1,
                                               within_alphabet=True)
    alphabets = dataset.data["labels"][np.concatenate([support, query], axis=1)] // 10
    assert (alphabets == alphabets[:, :1]).all() and len(np.unique(alphabets)) == 3


def nearest_neighbour_model(steps, classes):
    """A model that answers each step with the label of the earlier image nearest to its own, in pixels."""
    images = keras.Input([steps, 28, 28, 1])
    previous = keras.Input([steps], dtype="int32")
    flat = ops.reshape(images, (-1, steps, 28 * 28))
    distance = ops.sum(ops.square(flat[:, :, None] - flat[:, None]), axis=-1)  # [episodes, t, u]
    nearest = ops.argmax(ops.where(np.tri(steps, k=-1, dtype=bool), -distance, -1e9), axis=-1)
    label_of_image = ops.pad(previous[:, 1:], [[0, 0], [0, 1]], constant_values=-1)  # image u's label comes at u + 1
    return keras.Model([images, previous], ops.one_hot(ops.take_along_axis(label_of_image, nearest, axis=1), classes))


def test_a_query_that_repeats_a_support_drawing_is_answered_with_its_label():
    dataset = noise_dataset()
    support, support_labels, _, _ = few_shot.draw_tasks(dataset, ways=5, shots=2, queries=1, count=20, seed=2)
    # Each query repeats one of the support's drawings, of each label in turn.
    query = np.stack([[task[labels == label][0] for label in range(5)] for task, labels in zip(support, support_labels,
                                                                                               strict=True)])
    model = nearest_neighbour_model(steps=12, classes=5)
    probabilities = few_shot.answer_queries(model, dataset.data["images"], support, support_labels, query)
    assert probabilities.shape == (20, 5, 5)
    assert few_shot.accuracy_and_interval(np.argmax(probabilities, axis=-1) == np.arange(5)) == (1.0, 0.0)
    # The last drawing's label comes with the query, as a step gets the label of the one before it.
    last = few_shot.answer_queries(model, dataset.data["images"], support, support_labels, support[:, -1:])
    assert (np.argmax(last, axis=-1)[:, 0] == support_labels[:, -1]).all()


def test_a_model_that_cannot_see_the_labels_scores_chance():
    dataset = noise_dataset()
    support, support_labels, query, query_labels = few_shot.draw_tasks(dataset, ways=5, shots=1, queries=2,
                                                                      count=1000, seed=3)
    images = keras.Input([6, 28, 28, 1])
    keras.utils.set_random_seed(0)
    # Centred noise: each image's guess its own, not the one the weights' sums favour (on every backend's weights).
    guesses = keras.layers.Dense(5, activation="softmax")(ops.reshape(images - 0.5, (-1, 6, 28 * 28)))
    model = keras.Model([images, keras.Input([6], dtype="int32")], guesses)  # the labels go nowhere
    probabilities = few_shot.answer_queries(model, dataset.data["images"], support, support_labels, query,
                                            batch_size=1000)
    accuracy, interval = few_shot.accuracy_and_interval(np.argmax(probabilities, axis=-1) == query_labels)
    # 10,000 answers right 1 time in 5: a standard deviation of 0.004.
    assert abs(accuracy - 0.2) < 0.02 and 0.005 < interval < 0.05


def test_the_confidence_interval_is_over_tasks():
    accuracy, interval = few_shot.accuracy_and_interval(np.array([[1, 0], [1, 1], [0, 0]], bool))
    assert accuracy == 0.5 and interval == pytest.approx(1.96 * 0.5 / np.sqrt(3))


def test_the_programs_model_is_causal_so_a_query_sees_only_the_support():
    model = model_for_training(parse_args(["--classes=3", "--images_per_class=2", "--lstm_dim=8", "--cell_size=4",
                                 "--read_heads=2", "--feature_match", "--feature_labels"]), fused=False)
    rng = np.random.default_rng(4)
    images, previous = rng.random([2, 6, 28, 28, 1], dtype=np.float32), np.array([[-1, 0, 1, 2, 0, 1]] * 2, np.int32)
    later = images.copy(), previous.copy()
    later[0][:, 3:], later[1][:, 4:] = rng.random([2, 3, 28, 28, 1], dtype=np.float32), 2  # steps after the 3rd
    before, after = model.predict_on_batch((images, previous)), model.predict_on_batch(later)
    np.testing.assert_allclose(after[:, :3], before[:, :3], atol=1e-6)
    assert not np.allclose(after[:, 3:], before[:, 3:], atol=1e-3)


# The scorer reads from the cell's input size which of the inputs the model has: each set of them. The plain
# recurrence, the fused one's function (test_model.py) compiled in less time: the shipped models, fused, are
# scored in test_program.py.
@pytest.mark.parametrize("flags", [[], ["--feature_labels"], ["--feature_match"],
                                   ["--read_heads=2", "--feature_match", "--feature_labels"]])
def test_the_programs_model_answers_from_its_support_state_as_from_a_whole_episode(flags):
    model = model_for_training(parse_args(["--classes=3", "--images_per_class=4", "--lstm_dim=8", "--cell_size=4",
                                           *flags]), fused=False)
    assert few_shot.memory_recurrence(model) is not None
    dataset = noise_dataset()
    support, support_labels, query, _ = few_shot.draw_tasks(dataset, ways=3, shots=2, queries=1, count=5, seed=6)
    queries = query.shape[1]
    episodes, previous = few_shot.query_episodes(support, support_labels, query)
    images = dataset.data["images"]
    whole = few_shot.answer_last_steps(model, images, episodes, previous, queries)
    features = model.get_layer("image_features").predict(images, verbose=0)
    from_state = few_shot.answer_from_support_state(model, features, few_shot.support_pass(model), episodes,
                                                  previous, queries)
    np.testing.assert_allclose(from_state, whole, atol=1e-5)
    assert not np.allclose(whole[0], whole[1], atol=1e-3)  # the queries' answers differ: each its own


def test_prototypes_answer_with_the_class_whose_drawings_point_the_same_way():
    # Features of four images: two of class 0 along x and y, of lengths 3 and 1 (their plain mean would point
    # along (3, 1, 0)), one of class 1 along z; hand-computed cosines.
    features = np.array([[3, 0, 0], [0, 1, 0], [0, 0, 2], [1, 1, 0.5]], np.float32)
    support, support_labels = np.array([[0, 1, 2]]), np.array([[0, 0, 1]])
    similarities = few_shot.prototype_similarities(features, support, support_labels, np.array([[3, 2]]), ways=2)
    # Prototype 0: (x + y) / sqrt(2); prototype 1: z. Query 3, (1, 1, 0.5) / 1.5: cosines 2 / (1.5 sqrt(2)), 1 / 3.
    np.testing.assert_allclose(similarities, [[[2 / (1.5 * np.sqrt(2)), 1 / 3], [0, 1]]], rtol=1e-6)


def test_prototypes_of_features_that_name_the_character_score_every_query_and_blind_ones_chance():
    dataset = noise_dataset()
    support, support_labels, query, query_labels = few_shot.draw_tasks(dataset, ways=5, shots=2, queries=2,
                                                                      count=200, seed=5)
    characters = dataset.data["labels"]
    named = np.eye(30, dtype=np.float32)[characters]  # a feature a character
    right = np.argmax(few_shot.prototype_similarities(named, support, support_labels, query, 5), -1) == query_labels
    assert right.all()
    blind = np.ones([len(characters), 4], np.float32)  # every image alike: every prototype equally near
    guesses = np.argmax(few_shot.prototype_similarities(blind, support, support_labels, query, 5), -1)
    assert few_shot.accuracy_and_interval(guesses == query_labels)[0] == pytest.approx(np.mean(query_labels == 0))
