"""The program end to end: graded output, determinism, saving, and learning on the real data."""
import argparse
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import ROOT
from learning_to_learn import build_model, parser

NUMBER = r"\d+\.\d{4}"
NAMES = ["loss", "acc", "acc1", "acc2", "acc5", "acc10"]
GRADED_LINE = re.compile(
    r"Epoch (\d+)/(\d+) " + " - ".join(f"{name}: {NUMBER}" for name in NAMES + [f"val_{n}" for n in NAMES]))


def run_program(omniglot_npz, *flags):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "learning_to_learn.py"), *flags],
        env={**os.environ, "OMNIGLOT_DATA": omniglot_npz}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def metrics_of(line):
    return {name: float(value) for name, value in re.findall(r"(\w+): (\d+\.\d+)", line)}


@pytest.mark.parametrize("classes", [2, 5])
def test_recodex_prints_one_graded_line_per_epoch_identically_twice(omniglot_npz, classes):
    flags = ["--recodex", "--train_episodes=160", "--test_episodes=160", "--epochs=3", f"--classes={classes}"]
    first = run_program(omniglot_npz, *flags)
    lines = first.splitlines()
    assert len(lines) == 3, first
    for epoch, line in enumerate(lines, start=1):
        match = GRADED_LINE.fullmatch(line)
        assert match and match.groups() == (str(epoch), "3"), line
        # A few steps in, nothing is learned yet: the metrics stay near chance, as in the assignment.
        assert abs(metrics_of(line)["val_acc"] - 1 / classes) < 0.15, line
    assert run_program(omniglot_npz, *flags) == first


def test_learns_two_way_episodes_well_above_chance(omniglot_npz):
    lines = run_program(omniglot_npz, "--recodex", "--classes=2", "--threads=0",
                        "--train_episodes=2000", "--test_episodes=320", "--epochs=2").splitlines()
    last = metrics_of(lines[-1])
    # Chance is 0.5, and 320 episodes of 20 steps put its noise near 0.006: 0.56 is far above it.
    assert last["val_acc"] > 0.56 and last["val_acc2"] > 0.56, lines[-1]


def test_saved_model_loads_with_plain_keras_and_predicts_the_same(tmp_path):
    args = parser.parse_args(["--classes=3", "--images_per_class=2", "--lstm_dim=8", "--cell_size=4",
                              "--read_heads=2"])
    model = build_model(args)
    rng = np.random.default_rng(0)
    inputs = [rng.random([2, 6, 28, 28, 1], dtype=np.float32), np.array([[-1, 0, 1, 2, 0, 1]] * 2, np.int32)]
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(inputs, verbose=0), model.predict(inputs, verbose=0), atol=1e-6)
