#!/usr/bin/env python3
"""The results table and chart: the last epoch of full training runs, beside published anchors.

    OMNIGLOT_DATA=../shared/omniglot/omniglot.npz python3 benchmarks/results.py --run logs/

trains every configuration of RUNS (20 epochs unless RUNS says more: 6 min
21 s to 15 min 6 s a 20-epoch run on 2 CPU cores), keeping each run's output in
logs/NAME.log; without --run it reads logs already there. It prints the
Markdown table of each run's last epoch (never the best one) and draws
benchmarks/accuracy_by_occurrence.png (matplotlib: pip install -r
benchmarks/requirements.txt).
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (flags, drawn in the chart); every run uses the default --seed=42.
RUNS = {
    "default-5way": (["--classes=5"], True),
    "default-2way": (["--classes=2"], False),
    "lstm-only-5way": (["--classes=5", "--read_heads=0"], True),
    # A first step towards a best recipe: 36 epochs, 37 min 52 s on 2 CPU cores.
    "rotations-2heads-5way": (["--classes=5", "--rotations", "--read_heads=2", "--epochs=36"], False),
    # Sharper reads alone, on the default budget.
    "sharpness-5way": (["--classes=5", "--read_sharpness=5"], False),
    "sharpness-2way": (["--classes=2", "--read_sharpness=5"], False),
    # Training choices alone, on the default model and budget: a decaying learning rate; images moved at random.
    "cosine-5way": (["--classes=5", "--learning_rate_decay=cosine"], False),
    "shift-5way": (["--classes=5", "--shift=2"], False),
    "shift-2way": (["--classes=2", "--shift=2"], False),
    "shift1-5way": (["--classes=5", "--shift=1"], False),
    "shift1-2way": (["--classes=2", "--shift=1"], False),
    # The first recipe of 60 epochs, under 60 minutes on 2 CPU cores.
    "sharpness-rotations-2heads-5way": (["--classes=5", "--read_sharpness=5", "--rotations", "--read_heads=2",
                                         "--epochs=60"], False),
    # That recipe with a CNN of twice the filters, which needs a smaller learning rate to start using memory.
    "wide-5way": (["--classes=5", "--cnn_filters=16,32,64", "--learning_rate=0.0005", "--read_sharpness=5",
                   "--rotations", "--read_heads=2", "--epochs=36"], False),
    # Sharper reads still, which need the smaller learning rate too; under 60 minutes.
    "sharpness10-rotations-2heads-5way": (["--classes=5", "--learning_rate=0.0005", "--read_sharpness=10",
                                           "--rotations", "--read_heads=2", "--epochs=60"], False),
    # The first recipe with training images moved at random; under 60 minutes.
    "shift-rotations-2heads-5way": (["--classes=5", "--read_sharpness=5", "--rotations", "--read_heads=2",
                                     "--shift=2", "--epochs=60"], False),
    # That one with the learning rate decaying to 0; under 60 minutes.
    "cosine-shift-rotations-2heads-5way": (["--classes=5", "--read_sharpness=5", "--rotations", "--read_heads=2",
                                            "--shift=2", "--learning_rate_decay=cosine", "--epochs=60"], False),
    # The best recipe: that one with memory cells of 80 units instead of 40; under 60 minutes.
    "best-5way": (["--classes=5", "--read_sharpness=5", "--rotations", "--read_heads=2", "--shift=2",
                   "--learning_rate_decay=cosine", "--cell_size=80", "--epochs=60"], True),
}
NAMES = ["loss", "acc", "acc1", "acc2", "acc5", "acc10"]
OCCURRENCES = [1, 2, 5, 10]
# 5-way, 10 images per class; the assignment's example log and Santoro et al. (ICML 2016), table 1.
PUBLISHED = {
    "assignment example, 20 epochs": [0.3202, 0.7908, 0.8802, 0.9178],
    "Santoro et al. MANN": [0.364, 0.828, 0.949, 0.981],
    "Santoro et al. human": [0.345, 0.573, 0.814, 0.924],
    "Santoro et al. LSTM": [0.244, 0.495, 0.636, 0.625],
}
CHART = os.path.join(ROOT, "benchmarks", "accuracy_by_occurrence.png")


def last_epoch(log):
    """The validation metrics of the last epoch that a run's output shows: {name: value}."""
    text = open(log, errors="replace").read()
    metrics = {}
    for name in NAMES:
        found = re.findall(rf"val_{name}: (\d+\.\d+)", text)
        if not found:
            sys.exit(f"results.py: error: {log} shows no val_{name}")
        metrics[name] = float(found[-1])
    metrics["epochs"] = len(re.findall(r"val_acc: ", text))
    return metrics


def draw(series, path):
    """Accuracy by occurrence, one line a series: runs solid, published points dashed."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("results.py: error: drawing the chart needs matplotlib: pip install -r benchmarks/requirements.txt")
    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(8, 4.5), dpi=100)
    for name, accuracies in series.items():
        axes.plot(OCCURRENCES, accuracies, marker="o", label=name, linestyle="--" if name in PUBLISHED else "-")
    axes.set(xlabel="occurrence of the class in the episode", ylabel="validation accuracy (5-way)",
             xticks=OCCURRENCES, ylim=(0, 1))
    axes.grid(alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    figure.savefig(path, bbox_inches="tight")


def main(options):
    os.makedirs(options.logs, exist_ok=True)
    results = {}
    for name, (flags, _) in RUNS.items():
        log = os.path.join(options.logs, f"{name}.log")
        if options.run:
            start = time.perf_counter()
            with open(log, "w") as output:
                subprocess.run([sys.executable, os.path.join(ROOT, "learning_to_learn.py"), *flags],
                               stdout=output, stderr=subprocess.STDOUT, check=True)
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        results[name] = last_epoch(log)

    print("| run | flags | epochs | " + " | ".join(f"val_{name}" for name in NAMES) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in NAMES) + " |")
    for name, metrics in results.items():
        print(f"| {name} | `{' '.join(RUNS[name][0])}` | {metrics['epochs']} | "
              + " | ".join(f"{metrics[metric]:.4f}" for metric in NAMES) + " |")
    drawn = {name: [results[name][f"acc{nth}"] for nth in OCCURRENCES] for name, (_, shown) in RUNS.items() if shown}
    draw({**drawn, **PUBLISHED}, CHART)


if __name__ == "__main__":
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("logs", help="Folder of the runs' logs.")
    options.add_argument("--run", action="store_true", help="Train the runs first (else read their logs).")
    main(options.parse_args())
