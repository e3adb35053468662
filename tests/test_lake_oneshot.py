"""benchmarks/lake_oneshot.py: Lake's runs read, converted and scored, on runs made by hand."""
import hashlib
import importlib.util
import os
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from test_few_shot import nearest_neighbour_model

from conftest import ROOT, SHARED_OMNIGLOT
from learning_to_learn import model_for_training, parse_args
from omniglot_dataset import DataError, to_28x28

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
spec = importlib.util.spec_from_file_location("lake_oneshot", os.path.join(ROOT, "benchmarks", "lake_oneshot.py"))
lake = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lake)


def png(paper):
    return tf.io.encode_png(paper).numpy()


def hand_made_runs(path, runs=2, seed=0, wrong=False):
    """An all_runs.zip of `runs` runs: 20 characters of random strokes, each test drawing the very drawing of its
    class's training one (`wrong`: the answers in class_labels.txt shifted by one class)."""
    rng = np.random.default_rng(seed)
    answers = {}
    with zipfile.ZipFile(path, "w") as archive:
        for run in range(1, runs + 1):
            drawings = np.where(rng.random([20, 105, 105, 1]) < 0.9, 255, 0).astype(np.uint8)  # white paper
            classes = rng.permutation(20)  # test item i shows the character of training class classes[i]
            lines = []
            for index in range(20):
                archive.writestr(f"run{run:02d}/training/class{index + 1:02d}.png", png(drawings[index]))
                archive.writestr(f"run{run:02d}/test/item{index + 1:02d}.png", png(drawings[classes[index]]))
                named = (classes[index] + wrong) % 20
                lines.append(f"run{run:02d}/test/item{index + 1:02d}.png "
                             f"run{run:02d}/training/class{named + 1:02d}.png")
            archive.writestr(f"run{run:02d}/class_labels.txt", "\n".join(lines) + "\n")
            answers[f"run{run:02d}"] = (classes + wrong) % 20
    return answers


def test_a_run_is_read_as_its_drawings_converted_and_its_answers(tmp_path):
    answers = hand_made_runs(tmp_path / "all_runs.zip")
    runs = lake.read_runs(tmp_path / "all_runs.zip")
    assert list(runs) == ["run01", "run02"]
    archive = zipfile.ZipFile(tmp_path / "all_runs.zip")
    for run, (training, test, answer) in runs.items():
        np.testing.assert_array_equal(answer, answers[run])
        np.testing.assert_array_equal(training, to_28x28([archive.read(f"{run}/training/class{index:02d}.png")
                                                          for index in range(1, 21)]))
        np.testing.assert_array_equal(test, training[answer])  # each test drawing is its class's training one
        assert training.dtype == np.uint8 and training.shape == (20, 28, 28, 1) and training.max() > 0


@pytest.mark.parametrize("wrong, error", [(False, 0.0), (True, 1.0)])
def test_a_model_that_matches_each_drawing_scores_by_the_runs_answers(wrong, error, tmp_path):
    hand_made_runs(tmp_path / "all_runs.zip", wrong=wrong)
    model = nearest_neighbour_model(steps=21, classes=25)  # more labels than classes: 20 of them at random
    for training, test, answers in lake.read_runs(tmp_path / "all_runs.zip").values():
        wrongs = lake.errors_of_run(model, training, test, answers, orders=3, rng=np.random.default_rng(0))
        assert wrongs.shape == (20,) and wrongs.mean() == error


@pytest.mark.parametrize("wrong, error", [(False, 0.0), (True, 1.0)])
def test_the_cnn_alone_matches_each_test_drawing_to_its_very_training_drawing(wrong, error, tmp_path):
    hand_made_runs(tmp_path / "all_runs.zip", wrong=wrong)
    model = model_for_training(parse_args(["--classes=2", "--images_per_class=2", "--cnn_pooling",
                                           "--cnn_filters=8,8,8,8"]))  # untrained: its features differ by drawing
    for training, test, answers in lake.read_runs(tmp_path / "all_runs.zip").values():
        wrongs = lake.prototype_errors_of_run(model.get_layer("image_features"), training, test, answers)
        assert wrongs.shape == (20,) and wrongs.mean() == error


def test_each_order_labels_the_training_drawings_anew_and_every_drawing_comes_as_training_images_come(
        tmp_path, monkeypatch):
    # Training's images are ink from 0 to 1 (Omniglot), Lake's drawings ink from 0 to 255 (read_runs).
    hand_made_runs(tmp_path / "all_runs.zip", runs=1)
    [(training, test, answers)] = lake.read_runs(tmp_path / "all_runs.zip").values()
    as_training = np.concatenate([training, test]).astype(np.float32) / 255
    asked = []

    def answer_queries(model, images, support, support_labels, query):
        asked.append((images, support, support_labels, query))
        return np.full([*query.shape, 25], 1 / 25)

    monkeypatch.setattr(lake, "answer_queries", answer_queries)
    lake.errors_of_run(nearest_neighbour_model(steps=21, classes=25), training, test, answers, orders=4,
                       rng=np.random.default_rng(0))
    [(images, support, support_labels, query)] = asked
    np.testing.assert_array_equal(images, as_training)
    np.testing.assert_array_equal(query, np.tile(np.arange(20, 40), (4, 1)))  # the test drawings, after the 20
    label_of_drawing = np.zeros([4, 20], int)
    np.put_along_axis(label_of_drawing, support, support_labels, axis=1)
    for order in range(4):
        assert sorted(support[order]) == list(range(20)), "each training drawing once"
        assert len(set(label_of_drawing[order])) == 20 and label_of_drawing[order].max() < 25
    assert len({tuple(labels) for labels in label_of_drawing}) == 4, "each order a labelling of its own"
    assert len({tuple(order) for order in support}) == 4, "each order an order of its own"

    class ImageFeatures:
        def predict(self, images, verbose=0):
            np.testing.assert_array_equal(images, as_training)
            return images.reshape(len(images), -1)

    assert lake.prototype_errors_of_run(ImageFeatures(), training, test, answers).mean() == 0


def test_the_runs_come_from_omniglot_runs_else_the_cache_checked_by_their_md5(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIGLOT_RUNS", str(tmp_path / "none.zip"))
    with pytest.raises(DataError, match="OMNIGLOT_RUNS names .*none.zip, which is no file"):
        lake.runs_zip()
    folder, url = serve
    hand_made_runs(folder / "all_runs.zip")
    monkeypatch.delenv("OMNIGLOT_RUNS")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("OMNIGLOT_URL", url)
    with pytest.raises(DataError, match="cannot download .*all_runs.zip"):  # its md5 is not the release's
        lake.runs_zip()
    assert not os.path.exists(tmp_path / "keras" / "datasets" / "all_runs.zip")
    monkeypatch.setattr(lake, "RUNS_FILE", ("all_runs.zip", hashlib.md5((folder / "all_runs.zip").read_bytes())
                                            .hexdigest()))
    assert lake.runs_zip() == str(tmp_path / "keras" / "datasets" / "all_runs.zip")
    assert len(lake.read_runs(lake.runs_zip())) == 2


def test_the_shared_copy_is_the_release_and_holds_20_runs_of_20():
    path = os.path.join(SHARED_OMNIGLOT, "all_runs.zip")
    if not os.path.exists(path):
        pytest.skip(f"needs the release's all_runs.zip in {SHARED_OMNIGLOT}")
    assert hashlib.md5(open(path, "rb").read()).hexdigest() == lake.RUNS_FILE[1]
    runs = lake.read_runs(path)
    assert len(runs) == 20 and all(sorted(answers) == list(range(20)) for _, _, answers in runs.values())
