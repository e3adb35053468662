"""Episodes hold the assignment's definition, checked on a hand-made data set whose images name themselves."""
import argparse

import numpy as np
import pytest

import backends
import learning_to_learn
from learning_to_learn import (
    EpisodeGenerator,
    previous_labels,
    shifted,
    training_batches,
    validation_batches,
    with_rotations,
)


def make_dataset(counts):
    """Character c has counts[c] drawings; every pixel of image i is i, so an image tells its index."""
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    shuffled = np.random.default_rng(1).permutation(len(labels))  # drawings need not be grouped
    labels = labels[shuffled]
    images = np.broadcast_to(np.arange(len(labels), dtype=np.float32)[:, None, None, None], [len(labels), 28, 28, 1])
    return argparse.Namespace(data={"images": images, "labels": labels}, size=len(labels))


def make_args(classes=3, images_per_class=4, batch_size=5, shift=0):
    return argparse.Namespace(classes=classes, images_per_class=images_per_class, batch_size=batch_size, shift=shift)


def generator(dataset, args, seed):
    return EpisodeGenerator(dataset, args.classes, args.images_per_class, seed)


def training(dataset, args, seed, episodes, epochs):
    return training_batches(dataset, args.classes, args.images_per_class, args.batch_size, episodes, seed, epochs,
                            shift=args.shift)


def validation(dataset, args, episodes):
    return validation_batches(dataset, args.classes, args.images_per_class, args.batch_size, episodes)


def check_episode(dataset, args, images, previous, labels):
    steps = args.classes * args.images_per_class
    assert images.shape == (steps, 28, 28, 1) and previous.shape == labels.shape == (steps,)
    assert previous[0] == -1
    np.testing.assert_array_equal(previous[1:], labels[:-1])
    np.testing.assert_array_equal(np.bincount(labels, minlength=args.classes), [args.images_per_class] * args.classes)

    indices = images[:, 0, 0, 0].astype(int)
    assert len(set(indices)) == steps, "a drawing repeats within an episode"
    characters = dataset.data["labels"][indices]
    character_of_label = {}
    for label, character in zip(labels, characters, strict=True):
        assert character_of_label.setdefault(label, character) == character, "a label names two characters"
    assert len(set(character_of_label.values())) == args.classes, "two labels name one character"
    return character_of_label


def test_generator_episodes_hold_the_definition():
    counts = [4, 6, 20, 5, 9, 4, 7]  # some characters have exactly images_per_class drawings
    dataset, args = make_dataset(counts), make_args()
    all_indices, all_labels = generator(dataset, args, seed=3).sample(300)
    characters_seen, labels_of_character = set(), {}
    for indices, labels in zip(all_indices, all_labels, strict=True):
        images, previous = dataset.data["images"][indices], previous_labels(labels)
        for label, character in check_episode(dataset, args, images, previous, labels).items():
            characters_seen.add(character)
            labels_of_character.setdefault(character, set()).add(label)
    assert characters_seen == set(range(len(counts)))
    assert all(labels == set(range(args.classes)) for labels in labels_of_character.values()), \
        "labels are not assigned at random"


def test_steps_are_shuffled_not_grouped_by_class():
    dataset, args = make_dataset([10] * 5), make_args(classes=5, images_per_class=10)
    (indices, labels) = generator(dataset, args, seed=0).sample(200)
    sorted_runs = np.mean([np.all(np.diff(episode) >= 0) for episode in labels])
    assert sorted_runs == 0
    # Every position holds every label about equally often: 200 episodes x 10 of 50 steps per label.
    position_counts = np.stack([np.bincount(column, minlength=5) for column in labels.T])
    assert position_counts.min() > 10 and position_counts.max() < 80


def test_same_seed_same_episodes_other_seed_others():
    dataset, args = make_dataset([20] * 10), make_args()
    first = generator(dataset, args, seed=5).sample(4)
    again = generator(dataset, args, seed=5).sample(4)
    other = generator(dataset, args, seed=6).sample(4)
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])


def test_previous_labels_shift_by_one_with_minus_one_first():
    np.testing.assert_array_equal(previous_labels(np.array([[2, 0, 1], [1, 1, 0]])), [[-1, 2, 0], [-1, 1, 1]])


def collect(batches):
    return list(batches)


def assert_same_batches(batches, expected):
    for ((images, previous), labels), ((images_expected, previous_expected), labels_expected) in zip(
            batches, expected, strict=True):
        np.testing.assert_array_equal(images, images_expected)
        np.testing.assert_array_equal(previous, previous_expected)
        np.testing.assert_array_equal(labels, labels_expected)


def test_training_batches_hold_the_definition_and_are_fresh_every_epoch():
    dataset, args = make_dataset([20] * 12), make_args(batch_size=5)
    batches = collect(training(dataset, args, seed=7, episodes=12, epochs=range(2)))
    assert [len(labels) for _, labels in batches] == [5, 5, 2] * 2, "an epoch is 12 episodes, its own batches"
    for (images, previous), labels in batches:
        for episode in range(len(labels)):
            check_episode(dataset, args, images[episode], previous[episode], labels[episode])

    # The batches are the generator's episodes, drawn for (seed, epoch).
    indices, labels = generator(dataset, args, seed=[7, 1]).sample(12)
    np.testing.assert_array_equal(batches[3][0][0][:, :, 0, 0, 0], indices[:5])
    np.testing.assert_array_equal(batches[3][1], labels[:5])
    assert not np.array_equal(batches[0][1], batches[3][1]), "training repeats its episodes"

    # The episodes of an epoch depend on the seed and the epoch alone: a resumed run draws the same.
    resumed = collect(training(dataset, args, seed=7, episodes=12, epochs=range(1, 2)))
    assert_same_batches(resumed, batches[3:])


def test_first_occurrence_weight_weighs_each_classs_first_drawing_alone():
    dataset, args = make_dataset([20] * 12), make_args(batch_size=5)
    plain = collect(training(dataset, args, seed=7, episodes=12, epochs=range(2)))
    weighted = list(training_batches(dataset, args.classes, args.images_per_class, args.batch_size, 12, 7, range(2),
                                     first_occurrence_weight=2.5))
    assert_same_batches([batch[:2] for batch in weighted], plain)  # the same episodes, weights beside them
    for _, labels, weights in weighted:
        assert weights.dtype == np.float32 and weights.shape == labels.shape
        for episode_labels, episode_weights in zip(labels, weights, strict=True):
            expected = [2.5 if label not in episode_labels[:step] else 1 for step, label in enumerate(episode_labels)]
            np.testing.assert_array_equal(episode_weights, expected)
            assert (episode_weights == 2.5).sum() == args.classes


def test_validation_batches_stay_fixed():
    dataset, args = make_dataset([20] * 12), make_args()
    batches = validation(dataset, args, episodes=10)
    first, again = collect(batches), collect(batches)
    assert [len(labels) for _, labels in first] == [5, 5]
    assert_same_batches(first, again)
    for (images, previous), labels in first:
        for episode in range(len(labels)):
            check_episode(dataset, args, images[episode], previous[episode], labels[episode])


def test_rotations_make_every_quarter_turn_a_new_character():
    labels = np.array([0, 1, 1], np.int32)
    images = np.zeros([3, 28, 28, 1], np.float32)
    images[:, 0, 0] = 1  # one lit pixel in the top left corner
    rotated = with_rotations(argparse.Namespace(data={"images": images, "labels": labels})).data
    np.testing.assert_array_equal(rotated["labels"], [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7])
    # A quarter turn counterclockwise takes the corner pixel to the bottom left, then bottom right, then top right.
    for quarter, (row, column) in enumerate([(0, 0), (27, 0), (27, 27), (0, 27)]):
        for image in rotated["images"][3 * quarter:3 * (quarter + 1)]:
            assert image[row, column, 0] == 1 and image.sum() == 1

    indices, _ = generator(argparse.Namespace(data=rotated), make_args(images_per_class=1), seed=0).sample(50)
    assert len(np.unique(rotated["labels"][indices])) == 8, "every rotation is drawn as a character of its own"


def test_rotations_never_collide_whatever_the_labels():
    labels = np.array([-5, 3, 3, 40], np.int64)  # three characters, labelled neither from 0 nor contiguously
    rotated = with_rotations(argparse.Namespace(data={"images": np.zeros([4, 28, 28, 1], np.float32),
                                                      "labels": labels})).data["labels"]
    np.testing.assert_array_equal(rotated, [0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 10, 11])


def test_shifted_moves_each_image_its_own_way_with_blank_paper_behind():
    image = np.zeros([28, 28, 1], np.float32)
    image[10, 20] = 1
    moved = shifted(np.stack([[image, image]]), np.array([[[0, 4], [2, 2]]]), shift=2)
    assert moved[0, 0, 12, 18, 0] == 1 and moved[0, 0].sum() == 1, "offsets (0, 4): 2 pixels down, 2 left"
    np.testing.assert_array_equal(moved[0, 1], image)  # offsets (2, 2): in place

    rng = np.random.default_rng(0)
    images = rng.random([2, 3, 28, 28, 1]).astype(np.float32)
    offsets = rng.integers(0, 2 * 3 + 1, [2, 3, 2])
    moved = shifted(images, offsets, shift=3)
    for episode, step in np.ndindex(2, 3):
        down, right = 3 - offsets[episode, step]
        expected = np.zeros([28 + 6, 28 + 6, 1], np.float32)  # room to move 3 pixels each way
        expected[3 + down:3 + down + 28, 3 + right:3 + right + 28] = images[episode, step]
        np.testing.assert_array_equal(moved[episode, step], expected[3:-3, 3:-3])


def test_only_training_images_are_shifted():
    dataset, args = make_dataset([20] * 12), make_args(batch_size=12, shift=2)
    (images, previous), labels = collect(training(dataset, args, seed=7, episodes=12, epochs=range(1)))[0]
    indices = images[:, :, 14, 14, 0].astype(int)  # the middle pixel still names the image
    for episode in range(12):
        middles = np.broadcast_to(images[episode, :, 14:15, 14:15], images[episode].shape)
        check_episode(dataset, args, middles, previous[episode], labels[episode])

    moves = set()
    for image, index in zip(images.reshape(-1, 28, 28), indices.reshape(-1), strict=True):
        if index == 0:
            continue  # image 0 is blank paper: it does not show its move
        rows, columns = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
        down, right = rows[0] or rows[-1] - 27, columns[0] or columns[-1] - 27
        assert max(abs(down), abs(right)) <= 2
        expected = np.zeros([28, 28], np.float32)
        expected[max(down, 0):28 + min(down, 0), max(right, 0):28 + min(right, 0)] = index
        np.testing.assert_array_equal(image, expected)
        moves.add((down, right))
    assert len(moves) > 20, f"images must move each their own way, up to 2 pixels: {sorted(moves)}"

    # The moves of an epoch depend on the seed and the epoch alone, as its episodes do: a resumed run sees them again.
    assert_same_batches(collect(training(dataset, args, seed=7, episodes=12, epochs=range(1, 2))),
                        collect(training(dataset, args, seed=7, episodes=12, epochs=range(2)))[1:])

    (unshifted, _), _ = collect(validation(dataset, args, episodes=12))[0]
    np.testing.assert_array_equal(unshifted, unshifted[:, :, :1, :1] * np.ones([1, 1, 28, 28, 1]))


def test_within_alphabet_episodes_take_every_character_from_one_alphabet():
    # Alphabets A (5 characters), B (3) and C (2) over 10 characters with labels in scrambled order: a 3-way episode
    # can come from A or B, never C; the alphabet is drawn uniformly, not by its size.
    dataset = make_dataset([4] * 10)
    dataset.alphabets = np.array(list("AACBABACAB"))  # of labels 0..9
    indices, labels = EpisodeGenerator(dataset, 3, 2, seed=0, within_alphabet=True).sample(2000)
    characters = dataset.data["labels"][indices]
    alphabets = dataset.alphabets[characters]
    assert (alphabets == alphabets[:, :1]).all(), "an episode mixes alphabets"
    assert set(alphabets[:, 0]) == {"A", "B"}
    assert abs(np.mean(alphabets[:, 0] == "A") - 0.5) < 0.04  # 2000 draws: a standard deviation of 0.011
    # Within A, every 3 of its 5 characters come, each about as often.
    of_a = characters[alphabets[:, 0] == "A"]
    np.testing.assert_array_equal(np.unique(of_a), [0, 1, 4, 6, 8])
    assert np.bincount(of_a.ravel()).max() < 1.2 * np.bincount(of_a.ravel())[[0, 1, 4, 6, 8]].min()
    for episode in range(5):
        check_episode(dataset, make_args(classes=3, images_per_class=2), dataset.data["images"][indices[episode]],
                      previous_labels(labels[episode]), labels[episode])


def test_a_share_of_within_alphabet_episodes_takes_one_alphabet_the_rest_any():
    # 20 alphabets of 5 characters: a 3-way episode drawn from all of them falls within one alphabet with
    # probability 4/99 * 3/98 = 0.0012, so nearly every one-alphabet episode is one the share chose.
    dataset = make_dataset([2] * 100)
    dataset.alphabets = np.repeat(np.arange(20), 5)
    for share, episodes in [(0.0, 3000), (0.3, 3000), (1.0, 500)]:
        indices, _ = EpisodeGenerator(dataset, 3, 1, seed=1, within_alphabet=share).sample(episodes)
        alphabets = dataset.alphabets[dataset.data["labels"][indices]]
        one_alphabet = np.mean((alphabets == alphabets[:, :1]).all(axis=1))
        # 3000 draws at 0.3: a standard deviation of 0.0084
        assert abs(one_alphabet - (share + (1 - share) * 4 / 99 * 3 / 98)) < 0.03, (share, one_alphabet)


def test_within_alphabet_needs_an_alphabet_large_enough():
    dataset = make_dataset([2] * 4)
    dataset.alphabets = np.array(list("AABB"))
    try:
        EpisodeGenerator(dataset, 3, 1, seed=0, within_alphabet=True)
    except ValueError as error:
        assert "no alphabet has 3 characters: the largest has 2" in str(error)
    else:
        raise AssertionError("a 3-way episode was drawn from alphabets of 2")


def test_rotations_make_each_turn_of_an_alphabet_an_alphabet():
    dataset = make_dataset([1, 1, 1])
    dataset.alphabets = np.array(["A", "B", "A"])
    rotated = with_rotations(dataset)
    characters = rotated.data["labels"]
    # Characters 0 and 2 stay together in each turn, never with another turn's.
    names = rotated.alphabets[characters]
    assert len(set(names)) == 8 and names[0] == names[2] != names[3] == names[5]
    indices, _ = EpisodeGenerator(rotated, 2, 1, seed=0, within_alphabet=True).sample(200)
    assert (np.sort(characters[indices] % 3, axis=1) == [0, 2]).all()


def test_within_alphabet_reaches_the_training_episodes_and_at_share_1_draws_those_of_the_switch_it_was():
    # The episodes that --within_alphabet drew as a switch, before it took a share: EpisodeGenerator of
    # learning_to_learn.py at 4388f31^, seed (7, 1), of this data set. A share of 1 draws no more at random.
    dataset = make_dataset([4] * 10)
    dataset.alphabets = np.array(list("AACBABACAB"))
    switch_indices = [[15, 7, 32, 38, 12, 39], [28, 7, 27, 26, 38, 18], [24, 37, 2, 20, 19, 21],
                      [12, 7, 15, 28, 26, 8]]
    switch_labels = [[2, 1, 0, 0, 1, 2], [1, 0, 0, 2, 2, 1], [1, 0, 0, 2, 2, 1], [0, 0, 2, 2, 1, 1]]
    (images, previous), labels = collect(training_batches(dataset, 3, 2, batch_size=4, episodes=4, seed=7,
                                                          epochs=range(1, 2), within_alphabet=1.0))[0]
    np.testing.assert_array_equal(images[..., 0, 0, 0], switch_indices)  # an image's pixels are its index
    np.testing.assert_array_equal(labels, switch_labels)


def test_main_trains_on_the_episodes_its_flags_ask_for(omniglot_npz, monkeypatch):
    # main sets the backend's threads, which a process sets once, before its first op: here they are set.
    monkeypatch.setattr(backends, "configure", lambda threads, deterministic: None)
    handed = []

    class Handed(Exception):
        pass

    def spy(*arguments, **keywords):
        handed.append((arguments, keywords))
        raise Handed

    monkeypatch.setattr(learning_to_learn, "training_batches", spy)
    flags = ["--classes=3", "--images_per_class=2", "--lstm_dim=4", "--cell_size=2", "--test_episodes=4",
             "--rotations", "--within_alphabet=0.5", "--shift=2", "--first_occurrence_weight=2", "--seed=9"]
    with pytest.raises(Handed):
        learning_to_learn.main(learning_to_learn.parse_args(flags))
    [((dataset, classes, images_per_class, batch_size, episodes, seed), keywords)] = handed
    assert (classes, images_per_class, batch_size, episodes, seed) == (3, 2, 16, 10000, 9)
    assert len(np.unique(dataset.data["labels"])) == 4 * 964  # the background characters, each turned 4 ways
    assert keywords == {"epochs": range(0, 20), "shift": 2, "first_occurrence_weight": 2.0, "within_alphabet": 0.5}
