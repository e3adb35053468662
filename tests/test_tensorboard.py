"""--logdir: TensorBoard event files with every metric and pictures of validation episodes."""
import glob
import os

import numpy as np
import tensorflow as tf

from conftest import run_program
from learning_to_learn import DIGITS, GREEN, RED, WHITE, episode_picture


def summaries(folder):
    """{tag: [(step, tensor)]} of every event file below `folder`."""
    found = {}
    for path in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, tf.make_ndarray(value.tensor)))
    return found


def test_logdir_holds_occurrence_accuracies_and_episode_pictures(omniglot_npz, tmp_path):
    result = run_program("--classes=3", "--train_episodes=96", "--test_episodes=32", "--epochs=2", "--logdir=logs",
                         data=omniglot_npz, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    for run in ["train", "validation"]:
        scalars = summaries(tmp_path / "logs" / run)
        for name in ["loss", "acc", "acc1", "acc2", "acc5", "acc10"]:
            assert [step for step, _ in scalars[f"epoch_{name}"]] == [0, 1], (run, name)
    pictures = summaries(tmp_path / "logs" / "episodes")["validation episodes"]
    assert [step for step, _ in pictures] == [0, 1]
    width, height, *encoded = pictures[0][1]
    image = tf.io.decode_png(encoded[0]).numpy()
    # 3 classes x 10 images per episode, one 30-pixel tile each; 3 episodes per picture.
    assert (int(width), int(height)) == (30 * 30, image.shape[0]) and len(encoded) == 3


def glyph(picture, top, left):
    """The 3x5 font pixels drawn at (top, left), read back at the font's 2x scale, as a DIGITS string."""
    return "".join("1" if picture[top + 2 * row, left + 2 * column].any() else "0"
                   for row in range(5) for column in range(3))


def test_picture_shows_occurrence_label_and_guess_under_each_image():
    images = np.zeros([3, 28, 28, 1], np.float32)
    images[1] = 1.0
    labels, guesses = np.array([1, 0, 1]), np.array([2, 0, 1])
    picture = episode_picture(images, labels, guesses)
    assert picture.shape == (1 + 28 + 3 * 12 + 2, 3 * 30, 3)
    assert np.all(picture[1:29, 31:59] == 1.0)  # the second image, white ink

    text_top = 28 + 4
    # Step 3: class 1 for the 2nd time, label 1, guessed 1 (green).
    assert glyph(picture, text_top, 61) == DIGITS[2]
    assert glyph(picture, text_top + 12, 61) == DIGITS[1]
    assert glyph(picture, text_top + 24, 61) == DIGITS[1]
    assert np.allclose(picture[text_top + 24, 61 + 2], GREEN)
    # Step 1: label 1 guessed 2: the guess is red, and the image is framed in red; step 2 is not.
    assert glyph(picture, text_top + 24, 1) == DIGITS[2]
    assert np.allclose(picture[text_top + 24, 1 + 2], RED)
    assert np.allclose(picture[0, 0], RED) and np.all(picture[0, 30] == 0)
    assert np.allclose(picture[text_top + 12, 1 + 2], WHITE)
