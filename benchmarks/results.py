#!/usr/bin/env python3
"""The results tables and chart, written from the record of full training runs, `benchmarks/runs.csv`.

    python3 benchmarks/results.py write             # the tables in README.md and benchmarks/README.md, the chart
    python3 benchmarks/results.py check             # exit status 1 if a table differs from the record
    OMNIGLOT_DATA=../shared/omniglot/omniglot.npz python3 benchmarks/results.py run NAME [NAME ...]
    python3 benchmarks/results.py record NAME [NAME ...]

`run` trains the named runs of RUNS one after another (run it from a clone
of main, so that edits do not change a running program), keeps each output
in benchmarks/logs/NAME.log, records its last epoch (never the best one) in
runs.csv with where it ran (date, CPU, commit, wall time, peak memory, its
flags), and writes the tables. `record` does the same for runs made by hand:
the log of `/usr/bin/time -v python3 learning_to_learn.py FLAGS > benchmarks/logs/NAME.log 2>&1`,
its wall time and peak memory read from `time`'s report; `--commit` names
the commit its clone was at, `--note` what else ran on the machine. The chart needs matplotlib
(pip install -r benchmarks/requirements.txt).
"""
import argparse
import csv
import os
import platform
import re
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import cpu  # noqa: E402

from learning_to_learn import OCCURRENCES, metric_names  # noqa: E402

RECORD = os.path.join(ROOT, "benchmarks", "runs.csv")
FIELDS = ["name", "seed", "date", "machine", "cpu", "commit", "wall", "peak_gib", "epochs", "val_loss", "val_acc",
          "val_acc1", "val_acc2", "val_acc5", "val_acc10", "flags", "notes"]
CHART = os.path.join(ROOT, "benchmarks", "accuracy_by_occurrence.png")
LOGS = os.path.join(ROOT, "benchmarks", "logs")
METRICS = [f"val_{name}" for name in metric_names(OCCURRENCES[-1])]

# Every run: its flags, and why it is there. Without --seed a run has the default 42.
BEST = ["--classes=5", "--read_sharpness=5", "--rotations", "--read_heads=2", "--shift=2",
        "--learning_rate_decay=cosine", "--cell_size=80", "--epochs=60"]
# The few-shot CNN's blocks with 32 filters; BEST with the earlier labels' vote and that CNN, less its epochs.
FEW_SHOT_CNN = ["--cnn_pooling", "--cnn_filters=32,32,32,32"]
POOLED = BEST[:-1] + ["--feature_match", "--feature_labels"] + FEW_SHOT_CNN
POOLED_20WAY = ["--classes=20", "--images_per_class=6"] + POOLED[1:]  # ... in episodes of 20 classes x 6 drawings
RUNS = {
    # The assignment's model and training.
    "default-5way": ["--classes=5"],
    # The same command at a later commit, a faster day of the same machine: the default run's time now.
    "default-5way-again": ["--classes=5"],
    # The same command on an Intel Xeon with AVX-512: the default run's time on another CPU of that width.
    "default-5way-xeon": ["--classes=5"],
    "default-5way-seed1": ["--classes=5", "--seed=1"],
    "default-5way-seed2": ["--classes=5", "--seed=2"],
    # The default run with the assignment CNN's normalisation fused, as every run but a graded one has it.
    "default-5way-fused-normalisation": ["--classes=5"],
    # ... the next day, at the day's own speed on an EPYC of the same kind: the same bits, its time.
    "default-5way-fused-normalisation-again": ["--classes=5"],
    # ... with the recurrence's loops over each core's share of the episodes at once, and the backward's kernels
    # turned outside its loop: another path to other last bits.
    "default-5way-loops-per-core": ["--classes=5"],
    "default-5way-loops-per-core-again": ["--classes=5"],  # ... the same hour, the same machine
    "default-5way-loops-per-core-third": ["--classes=5"],  # ... a session later (4667cbc: the same step)
    "default-2way": ["--classes=2"],
    "lstm-only-5way": ["--classes=5", "--read_heads=0"],  # no memory reads: what the controller alone learns
    "rotations-2heads-5way": ["--classes=5", "--rotations", "--read_heads=2", "--epochs=36"],
    # Sharper reads on the default budget.
    "sharpness-5way": ["--classes=5", "--read_sharpness=5"],
    "sharpness-2way": ["--classes=2", "--read_sharpness=5"],
    # Training choices alone, on the default model and budget.
    "cosine-5way": ["--classes=5", "--learning_rate_decay=cosine"],
    "shift-5way": ["--classes=5", "--shift=2"],
    "shift-2way": ["--classes=2", "--shift=2"],
    "shift1-5way": ["--classes=5", "--shift=1"],
    "shift1-2way": ["--classes=2", "--shift=1"],
    # The recipes of 60 minutes on 2 CPU cores, each a step from the one before.
    "sharpness-rotations-2heads-5way": ["--classes=5", "--read_sharpness=5", "--rotations", "--read_heads=2",
                                        "--epochs=60"],
    "wide-5way": ["--classes=5", "--cnn_filters=16,32,64", "--learning_rate=0.0005", "--read_sharpness=5",
                  "--rotations", "--read_heads=2", "--epochs=36"],
    "sharpness10-rotations-2heads-5way": ["--classes=5", "--learning_rate=0.0005", "--read_sharpness=10",
                                          "--rotations", "--read_heads=2", "--epochs=60"],
    "shift-rotations-2heads-5way": ["--classes=5", "--read_sharpness=5", "--rotations", "--read_heads=2",
                                    "--shift=2", "--epochs=60"],
    "cosine-shift-rotations-2heads-5way": BEST[:5] + ["--learning_rate_decay=cosine", "--epochs=60"],
    "best-5way": BEST,
    "best-5way-seed1": BEST + ["--seed=1"],
    # Towards knowing when a character is new: each read with its best match. (Flags removed since; the last
    # commit that had them is d27f8af.)
    "match-best-5way": BEST + ["--read_match"],
    # A sharpness the controller sets itself, every step and head, on top of the recipe's.
    "strength-best-5way": BEST + ["--read_strength"],
    # The CNN's features as a novelty signal, first on the default budget against sharpness-5way.
    "feature-match-sharpness-5way": ["--classes=5", "--read_sharpness=5", "--feature_match"],
    "feature-match-sharpness-5way-seed1": ["--classes=5", "--read_sharpness=5", "--feature_match", "--seed=1"],
    # ... then on the best recipe.
    "feature-match-best-5way": BEST + ["--feature_match"],
    # With the earlier images' labels, voted by those cosines: one change from feature-match-sharpness-5way.
    "feature-labels-sharpness-5way": ["--classes=5", "--read_sharpness=5", "--feature_match", "--feature_labels"],
    "feature-labels-best-5way": BEST + ["--feature_match", "--feature_labels"],
    "feature-labels-best-5way-seed1": BEST + ["--feature_match", "--feature_labels", "--seed=1"],
    # The few-shot CNN's blocks (max-pooled, 32 filters: 4.5 times the recipe's time a step), as far as 3 epochs go.
    "pooled-cnn-labels-sharpness-5way": ["--classes=5", "--read_sharpness=5", "--feature_match", "--feature_labels"]
                                        + FEW_SHOT_CNN + ["--epochs=3"],
    # ... and on the best recipe with the vote: 11 epochs, then 12, as many as an hour holds.
    "pooled-cnn-best-5way": POOLED + ["--epochs=11"],
    "pooled-cnn-best-5way-12epochs": POOLED + ["--epochs=12"],
    "pooled-cnn-best-5way-seed1": POOLED + ["--epochs=11", "--seed=1"],
    # The CNN's convolutions outside XLA: 14 epochs in the hour.
    "pooled-cnn-best-5way-14epochs": POOLED + ["--epochs=14"],
    # Blocks of 48 filters (the CNN twice the time a batch): 9 epochs in the hour.
    "pooled-cnn48-best-5way": POOLED[:-1] + ["--cnn_filters=48,48,48,48", "--epochs=9"],
    # The 12 epochs with the loss weighed 1.75 times at a class's first drawing: readier to answer "new".
    "first-weight-best-5way": POOLED + ["--epochs=12", "--first_occurrence_weight=1.75"],
    "first-weight-best-5way-seed1": POOLED + ["--epochs=12", "--first_occurrence_weight=1.75", "--seed=1"],
    "first-weight-best-5way-seed2": POOLED + ["--epochs=12", "--first_occurrence_weight=1.75", "--seed=2"],
    # The same command as seed 2's, on another machine of the same name and vector width, its model saved for
    # the field's tasks: the kernels there add in another order.
    "first-weight-best-5way-seed2-again": POOLED + ["--epochs=12", "--first_occurrence_weight=1.75", "--seed=2"],
    "first-weight-best-5way-seed1-again": POOLED + ["--epochs=12", "--first_occurrence_weight=1.75", "--seed=1"],
    # ... weighed 1.5 times: 1.75 took 0.0122 off the 2nd for 0.0114 at the 1st, seed 42; between the two?
    "first-weight-1.5-best-5way": POOLED + ["--epochs=12", "--first_occurrence_weight=1.5"],
    "first-weight-1.5-best-5way-seed1": POOLED + ["--epochs=12", "--first_occurrence_weight=1.5", "--seed=1"],
    # ... with half the episodes within one alphabet: in 20-way episodes it moved the 2nd +0.0104, the 1st -0.0042.
    "within-alphabet-half-best-5way": POOLED + ["--epochs=12", "--first_occurrence_weight=1.75",
                                                "--within_alphabet=0.5"],
    # ... without the best match of the features: does the vote need it?
    "no-feature-match-best-5way": [flag for flag in POOLED if flag != "--feature_match"]
                                  + ["--epochs=12", "--first_occurrence_weight=1.75"],
    # Each training episode's characters of one alphabet, as in Lake's runs: the similar characters, on the default
    # budget.
    "within-alphabet-5way": ["--classes=5", "--within_alphabet"],
    # 20-way episodes of 6 drawings a class (120 steps: room for 20-way 5-shot tasks and Lake's runs), the 15-way
    # recipe, in an hour.
    "feature-labels-best-20way": ["--classes=20", "--images_per_class=6"] + BEST[1:-1]
                                 + ["--feature_match", "--feature_labels", "--epochs=32"],
    "feature-labels-best-20way-seed1": ["--classes=20", "--images_per_class=6"] + BEST[1:-1]
                                       + ["--feature_match", "--feature_labels", "--epochs=32", "--seed=1"],
    "feature-labels-best-20way-seed2": ["--classes=20", "--images_per_class=6"] + BEST[1:-1]
                                       + ["--feature_match", "--feature_labels", "--epochs=32", "--seed=2"],
    # ... with the few-shot CNN of the best 5-way recipe: 7 epochs, as many as an hour held on a slow day.
    "pooled-cnn-best-20way": POOLED_20WAY + ["--epochs=7"],
    "pooled-cnn-best-20way-seed1": POOLED_20WAY + ["--epochs=7", "--seed=1"],
    "pooled-cnn-best-20way-seed2": POOLED_20WAY + ["--epochs=7", "--seed=2"],
    # ... 10 epochs: the hour's worth once the few-shot CNN's batch normalisation runs fused.
    "pooled-cnn-best-20way-10epochs": POOLED_20WAY + ["--epochs=10"],
    "pooled-cnn-best-20way-10epochs-seed1": POOLED_20WAY + ["--epochs=10", "--seed=1"],
    "pooled-cnn-best-20way-10epochs-seed2": POOLED_20WAY + ["--epochs=10", "--seed=2"],
    "within-alphabet-half-pooled-cnn-best-20way": POOLED_20WAY + ["--epochs=10", "--within_alphabet=0.5"],
    # ... its CNN in bfloat16, faster with AMX or AVX512_BF16; with the leaner recurrence 11 epochs fit the hour there.
    "pooled-cnn-best-20way-bfloat16-seed2": POOLED_20WAY + ["--epochs=10", "--seed=2", "--cnn_bfloat16"],
    "pooled-cnn-best-20way-bfloat16-11epochs": POOLED_20WAY + ["--epochs=11", "--cnn_bfloat16"],
    "pooled-cnn-best-20way-bfloat16-11epochs-seed1": POOLED_20WAY + ["--epochs=11", "--cnn_bfloat16", "--seed=1"],
    # ... and 11 epochs in float32, which tells the 11th epoch's effect from bfloat16's.
    "pooled-cnn-best-20way-11epochs": POOLED_20WAY + ["--epochs=11"],
    # ... its episodes of one alphabet each, as Lake's runs are (26 of the 30 background alphabets have 20 characters).
    "within-alphabet-pooled-cnn-best-20way": POOLED_20WAY + ["--epochs=7", "--within_alphabet"],
    # 15-way episodes (150 steps, 150 cells) on the best recipe, as many epochs as an hour holds.
    "best-15way": ["--classes=15"] + BEST[1:-1] + ["--epochs=15"],
    "feature-labels-best-15way": ["--classes=15"] + BEST[1:-1] + ["--feature_match", "--feature_labels", "--epochs=15"],
    # ... with the first drawings weighed as in first-weight-best-5way.
    "first-weight-best-15way": ["--classes=15"] + BEST[1:-1] + ["--feature_match", "--feature_labels", "--epochs=15",
                                                                "--first_occurrence_weight=1.75"],
}
BEST_RUN = "first-weight-best-5way"  # the headline's best recipe
BEST_SEEDS = [BEST_RUN, f"{BEST_RUN}-seed1", f"{BEST_RUN}-seed2", f"{BEST_RUN}-seed2-again",
              f"{BEST_RUN}-seed1-again"]  # the headline's
TWENTY_WAY_SEEDS = ["pooled-cnn-best-20way-10epochs", "pooled-cnn-best-20way-10epochs-seed1",
                    "pooled-cnn-best-20way-10epochs-seed2"]
ASSIGNMENT_CNN_20WAY_SEEDS = ["feature-labels-best-20way", "feature-labels-best-20way-seed1",
                              "feature-labels-best-20way-seed2"]
# The recipes on the field's benchmarks: (what the table calls it, its runs, one a seed). The figures of a run's
# model are the logs of `few_shot.py` (few-shot-RUN-Kshot.log) and `lake_oneshot.py` (lake-oneshot-RUN.log).
FIELD_RECIPES = [("the best 5-way recipe", [BEST_RUN, f"{BEST_RUN}-seed2-again", f"{BEST_RUN}-seed1-again"]),
                 ("the 20-way recipe", TWENTY_WAY_SEEDS),
                 ("the 20-way recipe, the assignment's CNN", ASSIGNMENT_CNN_20WAY_SEEDS)]
# (system, training data, 5-way 1-shot, 5-shot, 20-way 1-shot, 5-shot, Lake's runs' error), as published.
FIELD_ANCHORS = [
    ("Kaiser et al. 2017, memory module", "the same", "98.4", "99.6", "95.0", "98.6", ""),
    ("Prototypical networks (Snell et al. 2017)", "Vinyals's split, 1,200 characters: easier", "98.8", "99.7",
     "96.0", "98.9", ""),
    ("MAML (Finn et al. 2017)", "Vinyals's split", "98.7", "99.9", "95.8", "98.9", ""),
    ("SNAIL (Mishra et al. 2018), a sequence model as this one", "Vinyals's split", "99.07", "99.78", "97.64",
     "99.36", ""),
    ("a 4-layer siamese net, tasks within an alphabet", "background alphabets", "90.5", "95.8", "75.8", "87.2", ""),
    ("Bayesian program learning (Lake et al. 2015)", "background alphabets, strokes", "", "", "", "", "3.3"),
    ("humans; modified Hausdorff distance", "", "", "", "", "", "4.5; 38.8"),
]
# The top-level README's runs, a row a recipe: the mean and range of those of its seeds that have run.
DEFAULT_RUNS = ["default-5way", "default-5way-again", "default-5way-seed1", "default-5way-seed2"]  # 42 twice
README_RECIPES = [DEFAULT_RUNS, ["default-2way"], BEST_SEEDS, ["feature-labels-best-15way"], TWENTY_WAY_SEEDS]
CHART_RUNS = ["default-5way", "lstm-only-5way", "sharpness-5way", "best-5way", "feature-labels-best-5way",
              "pooled-cnn-best-5way-12epochs", BEST_RUN]
# What each flag or training choice did: (the change, the run without it, the run with it, what became of it).
EFFECTS = [
    ("`--read_heads=0`: no reads", "default-5way", "lstm-only-5way", "the memory's share"),
    ("`--read_sharpness=5`", "default-5way", "sharpness-5way", "in the recipe"),
    ("`--rotations --read_heads=2`, 36 epochs", "default-5way", "rotations-2heads-5way", "in the recipe"),
    ("`--shift=2`", "default-5way", "shift-5way", "in the recipe"),
    ("`--shift=2`, 2-way: never used its memory", "default-2way", "shift-2way", "not for 2-way"),
    ("`--shift=2` on the first recipe", "sharpness-rotations-2heads-5way", "shift-rotations-2heads-5way",
     "in the recipe"),
    ("`--learning_rate_decay=cosine`, 60 epochs", "shift-rotations-2heads-5way",
     "cosine-shift-rotations-2heads-5way", "in the recipe"),
    ("`--cnn_filters=16,32,64 --learning_rate=0.0005`, 36 epochs", "sharpness-rotations-2heads-5way", "wide-5way",
     "not taken"),
    ("`--cell_size=80`", "cosine-shift-rotations-2heads-5way", "best-5way", "in the recipe"),
    ("`--feature_match`, 20 epochs", "sharpness-5way", "feature-match-sharpness-5way", "in the recipe"),
    ("`--feature_match`", "best-5way", "feature-match-best-5way", "in the recipe"),
    ("`--feature_labels`, 20 epochs", "feature-match-sharpness-5way", "feature-labels-sharpness-5way",
     "in the recipe"),
    ("`--feature_labels`", "feature-match-best-5way", "feature-labels-best-5way", "in the recipe"),
    ("`--feature_match --feature_labels`, 15-way", "best-15way", "feature-labels-best-15way", "the 15-way recipe"),
    ("`--cnn_pooling --cnn_filters=32,32,32,32`, 11 epochs", "feature-labels-best-5way", "pooled-cnn-best-5way",
     "in the recipe"),
    ("12 epochs instead of 11", "pooled-cnn-best-5way", "pooled-cnn-best-5way-12epochs", "in the recipe"),
    ("`--first_occurrence_weight=1.75`", "pooled-cnn-best-5way-12epochs", "first-weight-best-5way",
     "in the recipe"),
    ("`--first_occurrence_weight=1.75`, 15-way", "feature-labels-best-15way", "first-weight-best-15way",
     "not for 15-way"),
    ("without `--feature_match`", "first-weight-best-5way", "no-feature-match-best-5way", "kept: the vote needs it"),
    ("`--within_alphabet`, 20 epochs: never used its memory", "default-5way", "within-alphabet-5way",
     "not yet on a recipe"),
    ("the assignment CNN's normalisation fused", "default-5way-again", "default-5way-fused-normalisation",
     "outside graded runs"),
    ("`--seed=1`", "first-weight-best-5way", "first-weight-best-5way-seed1", ""),
    ("`--seed=2`", "first-weight-best-5way", "first-weight-best-5way-seed2", ""),
    ("the same command on another machine", "first-weight-best-5way-seed2", "first-weight-best-5way-seed2-again",
     ""),
    ("the same command on another machine", "first-weight-best-5way-seed1", "first-weight-best-5way-seed1-again",
     ""),
    ("`--cnn_pooling --cnn_filters=32,32,32,32`, 20-way, 7 epochs", "feature-labels-best-20way",
     "pooled-cnn-best-20way", ""),
    ("10 epochs, normalisation fused", "pooled-cnn-best-20way", "pooled-cnn-best-20way-10epochs", "the 20-way recipe"),
    ("`--cnn_bfloat16`, 20-way, Xeon", "pooled-cnn-best-20way-10epochs-seed2", "pooled-cnn-best-20way-bfloat16-seed2",
     "61:33 to 50:33"),
    ("11 epochs", "pooled-cnn-best-20way-10epochs", "pooled-cnn-best-20way-11epochs", "no gain"),
    ("`--cnn_bfloat16`, 11 epochs", "pooled-cnn-best-20way-11epochs", "pooled-cnn-best-20way-bfloat16-11epochs",
     "39:33"),
    ("`--within_alphabet=0.5`, 20-way", "pooled-cnn-best-20way-10epochs", "within-alphabet-half-pooled-cnn-best-20way",
     "not taken: few-shot 92.98%, 98.27%, Lake 8.00%"),
    ("`--within_alphabet=0.5`", "first-weight-best-5way", "within-alphabet-half-best-5way",
     "not taken: few-shot 97.26%, 99.52%"),
]
# Flags that change no figure: what they do is tested, not measured.
TOOLS = ["--checkpoint_dir", "--save_model", "--logdir", "--evaluate", "--threads"]
# The best recipe, a step at a time: each run adds to the one before.
RECIPE_STEPS = ["default-5way", "sharpness-5way", "sharpness-rotations-2heads-5way", "shift-rotations-2heads-5way",
                "cosine-shift-rotations-2heads-5way", "best-5way", "feature-labels-best-5way",
                "pooled-cnn-best-5way-12epochs", "first-weight-best-5way"]
# 5-way, 10 drawings per class, at the 1st, 2nd, 5th and 10th occurrence: the assignment's example log
# (20 epochs) and Santoro et al., ICML 2016, table 1 (their split of Omniglot, 100,000 episodes).
ANCHORS = {
    "the assignment's example, 20 epochs": [0.3202, 0.7908, 0.8802, 0.9178],
    "Santoro et al. 2016, MANN": [0.364, 0.828, 0.949, 0.981],
    "Santoro et al. 2016, human": [0.345, 0.573, 0.814, 0.924],
    "Santoro et al. 2016, LSTM": [0.244, 0.495, 0.636, 0.625],
    "the limit (a new class takes a label not yet seen)": [0.457, 1, 1, 1],
}
# Beside the runs of the top-level README, less the headline's anchors; the 2-way example is the assignment's too.
README_ANCHORS = {"the assignment's example, 2-way": [0.6815, 0.9270, 0.9665, 0.9785],
                  # A. Nichol's sgdstore, "deep memory", on the evaluation alphabets as here; no 5th in its table.
                  "sgdstore, 15-way": [0.114, 0.817, "", 0.912]}


def read_text(path, newline=None):
    """The text of the file at `path`, closed at once; bytes that are no UTF-8 read as U+FFFD."""
    with open(path, errors="replace", newline=newline) as file:
        return file.read()


def read_record():
    with open(RECORD, newline="") as file:
        return {row["name"]: row for row in csv.DictReader(file)}


def occurrence_cells(values):
    return " | ".join(f"{value:.4g}" if isinstance(value, float) else str(value) for value in values)


def flags_cell(name, bases):
    """The flags of a run, or what it adds to the flags of one of `bases`."""
    base = max((base for base in bases if RUNS[name][:len(RUNS[base])] == RUNS[base]),
               key=lambda base: len(RUNS[base]), default=None)
    if base:
        return f"{base}'s and `{' '.join(RUNS[name][len(RUNS[base]):])}`"
    return f"`{' '.join(RUNS[name])}`"


def mean_and_range(values):
    """`0.4253 (0.4208-0.4298)`: the mean of a figure over seeds, and its least and largest value."""
    values = [float(value) for value in values]
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{sum(values) / len(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def scored(name):
    """{setting: percentage} of the scorers' logs of run `name`'s model: "5-way 1-shot", ..., "Lake"."""
    figures = {}
    # Exactly this run's: the logs of its seeds' runs begin with its name too.
    pattern = rf"few-shot-{re.escape(name)}-\d+shot\.log"
    for log in sorted(file for file in os.listdir(LOGS) if re.fullmatch(pattern, file)):
        text = read_text(os.path.join(LOGS, log))
        found = re.search(r"^(\d+-way \d+-shot): (\d+\.\d+)%", text, re.MULTILINE)
        figures[found.group(1)] = float(found.group(2))
    lake = os.path.join(LOGS, f"lake-oneshot-{name}.log")
    if os.path.exists(lake):
        figures["Lake"] = float(re.search(r"400 test drawings of 20 runs: (\d+\.\d+)%", read_text(lake)).group(1))
    return figures


def field_table():
    """This program's recipes on the field's benchmarks (the mean and range over seeds), beside the anchors."""
    settings = ["5-way 1-shot", "5-way 5-shot", "20-way 1-shot", "20-way 5-shot", "Lake"]
    lines = ["| system | training data | " + " | ".join(settings[:-1]) + " | Lake's 20 runs, error |",
             "| --- " * (2 + len(settings)) + "|"]
    for title, names in FIELD_RECIPES:
        figures = [scored(name) for name in names]
        cells = []
        for setting in settings:
            values = [figure[setting] for figure in figures if setting in figure]
            mean = f"{sum(values) / len(values):.2f}" if values else ""
            cells.append(f"{mean} ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else mean)
        seeds = max(sum(setting in figure for figure in figures) for setting in settings)
        lines.append(f"| this program, {title} ({seeds} seed{'s' if seeds > 1 else ''}) | background alphabets "
                     f"x 4 rotations | " + " | ".join(cells) + " |")
    lines += ["| " + " | ".join(anchor) + " |" for anchor in FIELD_ANCHORS]
    return "\n".join(lines)


def difference(before, after):
    return f"{float(after) - float(before):+.4f}" if before and after else ""  # no 10th in 20-way x 6


def tables(record):
    """{marker: Markdown table} of what README.md and benchmarks/README.md show."""
    occurrence_columns = [f"val_acc{nth}" for nth in OCCURRENCES]
    headline = ["| | val_acc | 1st | 2nd | 5th | 10th | training |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for title, names in [("default flags", DEFAULT_RUNS), ("the best recipe", BEST_SEEDS)]:
        runs = [record[name] for name in names if name in record]  # those that have run
        seeds = len({run["seed"] for run in runs})
        seeds = f", mean of {len(runs)} {'runs, ' + str(seeds) + ' ' if seeds < len(runs) else ''}seeds (range)"
        walls = ", ".join(run["wall"] for run in runs)
        headline.append(f"| {title} (5-way, {runs[0]['epochs']} epochs{seeds}) | "
                        + " | ".join(mean_and_range([run[column] for run in runs])
                                     for column in ["val_acc", *occurrence_columns])
                        + f" | {walls} on {runs[0]['machine']} |")
    for title in list(ANCHORS)[:2] + list(ANCHORS)[-1:]:
        headline.append(f"| {title} | | {occurrence_cells(ANCHORS[title])} | |")

    effects = ["| change | run without | run with | 1st | 2nd | 5th | 10th | became |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for change, before, after, verdict in EFFECTS:
        if after not in record:  # still to run
            continue
        effects.append(f"| {change} | {before} | {after} | "
                       + " | ".join(difference(record[before][column], record[after][column])
                                    for column in occurrence_columns) + f" | {verdict} |")
    effects.append(f"| {', '.join(f'`{flag}`' for flag in TOOLS)} | | | | | | | change no figure (tested) |")
    steps = ["| step | adds | epochs | wall | 1st | 2nd | 5th | 10th |", "| --- " * 8 + "|"]
    for before, name in zip([None, *RECIPE_STEPS[:-1]], RECIPE_STEPS, strict=True):
        run = record[name]
        added = [flag for flag in RUNS[name] if flag not in RUNS.get(before, []) and not flag.startswith("--epochs")]
        steps.append(f"| {name} | {' '.join(f'`{flag}`' for flag in added)} | {run['epochs']} | {run['wall']} | "
                     + " | ".join(run[column] for column in occurrence_columns) + " |")
    anchors = ["| anchor (5-way) | 1st | 2nd | 5th | 10th |", "| --- | --- | --- | --- | --- |"]
    anchors += [f"| {title} | {occurrence_cells(values)} |" for title, values in ANCHORS.items()]
    readme = ["| run | flags | seeds | epochs | wall | machine | 1st | 2nd | 5th | 10th |", "| --- " * 10 + "|"]
    for index, names in enumerate(README_RECIPES):
        runs = [record[name] for name in names if name in record]
        figures = [mean_and_range([run[column] for run in runs]) if runs[0][column] else ""
                   for column in occurrence_columns]
        flags = flags_cell(names[0], [group[0] for group in README_RECIPES[:index]])
        seeds, walls = ", ".join(run["seed"] for run in runs), ", ".join(run["wall"] for run in runs)
        readme.append(f"| {names[0]} | {flags} | {seeds} | {runs[0]['epochs']} | {walls} | {runs[0]['machine']} | "
                      + " | ".join(figures) + " |")
    readme += [f"| {title} | | | | | | {occurrence_cells(values)} |" for title, values in README_ANCHORS.items()]
    return {"headline": "\n".join(headline), "readme-runs": "\n".join(readme), "effects": "\n".join(effects),
            "recipe": "\n".join(steps), "anchors": "\n".join(anchors), "field": field_table()}


def marked(name):
    return re.compile(rf"(<!-- results\.py: {name} -->\n).*?(<!-- end -->)", re.DOTALL)


def documents():
    return [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "benchmarks", "README.md")]


def with_tables(text, record):
    for name, table in tables(record).items():
        text = marked(name).sub(lambda match, table=table: match.group(1) + table + "\n" + match.group(2), text)
    return text


def check():
    """The documents whose tables differ from the record (an empty list when all agree)."""
    record = read_record()
    return [path for path in documents() if with_tables(text := read_text(path), record) != text]


def write():
    record = read_record()
    for path in documents():
        text = read_text(path)
        if with_tables(text, record) != text:
            with open(path, "w") as file:
                file.write(with_tables(text, record))
    draw({**{name: [float(record[name][f"val_acc{nth}"]) for nth in OCCURRENCES] for name in CHART_RUNS},
          **ANCHORS}, CHART)


def draw(series, path):
    """Accuracy by occurrence, one line a series: runs solid, anchors dashed."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("results.py: error: drawing the chart needs matplotlib: pip install -r benchmarks/requirements.txt")
    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 4.5), dpi=100)
    for name, accuracies in series.items():
        axes.plot(OCCURRENCES, accuracies, marker="o", label=name, linestyle="--" if name in ANCHORS else "-")
    axes.set(xlabel="occurrence of the class in the episode", ylabel="validation accuracy (5-way)",
             xticks=OCCURRENCES, ylim=(0, 1))
    axes.grid(alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    figure.savefig(path, bbox_inches="tight")


def last_epoch(log):
    """The validation metrics of the last epoch that a run's output shows, and the number of epochs. An episode of
    fewer than 10 drawings of a class has no 10th occurrence (nor a 5th below 5): those figures stay empty."""
    text = read_text(log)
    metrics = {}
    for name in METRICS:
        found = re.findall(rf"{name}: (\d+\.\d+)", text)
        if not found and not re.fullmatch(r"val_acc(5|10)", name):
            sys.exit(f"results.py: error: {log} shows no {name}")
        metrics[name] = found[-1] if found else ""
    return metrics, len(re.findall(r"val_acc: ", text))


def run(names):
    os.makedirs(LOGS, exist_ok=True)
    for name in names:
        start = time.monotonic()
        with open(os.path.join(LOGS, f"{name}.log"), "w") as output:
            subprocess.run([sys.executable, os.path.join(ROOT, "learning_to_learn.py"), *RUNS[name]],
                           stdout=output, stderr=subprocess.STDOUT, check=True)
        minutes, seconds = divmod(int(time.monotonic() - start), 60)
        # The largest child so far: the runs come one after another, so a smaller one shows no figure of its own.
        add_to_record(name, f"{minutes}:{seconds:02d}", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    write()


def record_logs(names, note="", commit=None):
    for name in names:
        text = read_text(os.path.join(LOGS, f"{name}.log"))
        wall = re.findall(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
        if not wall:
            sys.exit(f"results.py: error: {LOGS}/{name}.log holds no wall time of /usr/bin/time -v")
        peak = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", text)
        add_to_record(name, wall[-1].split(".")[0], int(peak[-1]) * 1024 if peak else None, note, commit)
    write()


def compact(log):
    """Rewrites a log without the progress bar's steps and colours: of each epoch, its last line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", read_text(log, newline=""))  # "\r" kept
    lines = [line.split("\r")[-1] for line in text.split("\n")]
    with open(log, "w") as file:
        file.write("\n".join(line for line in lines if "val_" in line or not re.match(r"\s*\d+/\d+ ", line)))


def add_to_record(name, wall, peak_bytes=None, note="", commit=None):
    """Records the run `name` from its log, with its wall time and peak memory, on this machine, today."""
    record = read_record()
    compact(os.path.join(LOGS, f"{name}.log"))
    metrics, epochs = last_epoch(os.path.join(LOGS, f"{name}.log"))
    seed = next((flag.split("=")[1] for flag in RUNS[name] if flag.startswith("--seed=")), "42")
    record[name] = {"name": name, "seed": seed, "date": time.strftime("%Y-%m-%d"),
                    "machine": f"{'GPU' if gpu() else 'CPU'}, {os.cpu_count()} cores", "cpu": cpu(),
                    "commit": commit or head(), "wall": wall, "epochs": epochs, "flags": " ".join(RUNS[name]),
                    "notes": note,
                    # truncated, never rounded up
                    "peak_gib": f"{int(peak_bytes / 2**30 * 100) / 100:.2f}" if peak_bytes else "", **metrics}
    with open(RECORD, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(record[known] for known in RUNS if known in record)
    print(f"{name}: {wall} on {platform.node()}", file=sys.stderr)


def head():
    """The commit checked out here: `run` starts the program from this clone."""
    found = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip()


def gpu():
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


if __name__ == "__main__":
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("command", choices=["write", "check", "run", "record"])
    options.add_argument("names", nargs="*", metavar="NAME", help="Runs of RUNS, for run and record.")
    options.add_argument("--note", default="", help="For record: what else ran on the machine.")
    options.add_argument("--commit", default=None, help="For record: the commit of the run's clone (default: HEAD).")
    arguments = options.parse_args()
    if unknown := [name for name in arguments.names if name not in RUNS]:
        options.error(f"no such run: {', '.join(unknown)}; RUNS has {', '.join(RUNS)}")
    if arguments.command == "run":
        run(arguments.names)
    elif arguments.command == "record":
        record_logs(arguments.names, arguments.note, arguments.commit)
    elif arguments.command == "write":
        write()
    elif stale := check():
        sys.exit(f"results.py: the tables of {', '.join(stale)} differ from {RECORD}: run results.py write")
