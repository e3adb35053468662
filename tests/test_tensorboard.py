"""--logdir: TensorBoard event files with every metric and pictures of validation episodes."""
import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from matplotlib.colors import to_hex

from conftest import run_program
from long_runs import episode_figure, figure_pixels


def summaries(folder):
    """{tag: [(step, tensor)]} of every event file below `folder`."""
    found = {}
    for path in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, tf.make_ndarray(value.tensor)))
    return found


@pytest.mark.slow
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
    # 3 episodes a picture, each of 3 classes x 10 images: 0.4 inches at 100 dots an inch an image.
    assert (int(width), int(height)) == (image.shape[1], image.shape[0]) == (30 * 40, 120) and len(encoded) == 3


def test_picture_shows_occurrence_label_and_guess_under_each_image():
    images = np.zeros([3, 28, 28, 1], np.float32)
    images[1] = 1.0
    labels, guesses = np.array([1, 0, 1]), np.array([2, 0, 1])
    figure = episode_figure(images, labels, guesses)

    shown = [[(text.get_text(), to_hex(text.get_color())) for text in axes.texts] for axes in figure.axes]
    grey, black, green, red = to_hex("grey"), to_hex("black"), to_hex("green"), to_hex("red")
    assert shown == [[("1", grey), ("1", black), ("2", red)],  # class 1 for the 1st time, guessed 2
                     [("1", grey), ("0", black), ("0", green)],
                     [("2", grey), ("1", black), ("1", green)]]  # class 1 for the 2nd time, guessed right
    framed = [{to_hex(spine.get_edgecolor()) for spine in axes.spines.values()} for axes in figure.axes]
    assert framed[0] == {red} and red not in framed[1] | framed[2], "only the wrong guess is framed in red"
    np.testing.assert_array_equal(figure.axes[1].images[0].get_array(), images[1, ..., 0])

    pixels = figure_pixels(figure)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
