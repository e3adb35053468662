#!/usr/bin/env python3
"""The results table and chart: the last epoch of full training runs, beside published anchors.

    OMNIGLOT_DATA=../shared/omniglot/omniglot.npz python3 benchmarks/results.py --run logs/

trains every configuration of RUNS (20 epochs each; 6 to 13 minutes a run on
2 CPU cores), keeping each run's output in logs/NAME.log; without --run it
reads logs already there. It prints the Markdown table of each run's last
epoch (never the best one) and writes benchmarks/accuracy_by_occurrence.svg.
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
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#7f7f7f", "#e377c2", "#17becf"]
WIDTH, HEIGHT, LEFT, TOP, PLOT_WIDTH, PLOT_HEIGHT = 720, 360, 60, 20, 360, 300


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


def point(nth, accuracy):
    x = LEFT + (nth - 1) / (OCCURRENCES[-1] - 1) * PLOT_WIDTH
    return x, TOP + (1 - accuracy) * PLOT_HEIGHT


def svg(series):
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for tick in range(0, 11, 2):
        _, y = point(1, tick / 10)
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + PLOT_WIDTH}" y1="{y}" y2="{y}" stroke="#ddd"/>'
                     f'<text x="{LEFT - 8}" y="{y + 4}" text-anchor="end">{tick / 10:.1f}</text>')
    for nth in OCCURRENCES:
        x, _ = point(nth, 0)
        parts.append(f'<text x="{x}" y="{TOP + PLOT_HEIGHT + 16}" text-anchor="middle">{nth}</text>')
    parts.append(f'<text x="{LEFT + PLOT_WIDTH / 2}" y="{HEIGHT - 6}" text-anchor="middle">'
                 'occurrence of the class in the episode</text>'
                 f'<text x="14" y="{TOP + PLOT_HEIGHT / 2}" transform="rotate(-90 14 {TOP + PLOT_HEIGHT / 2})" '
                 'text-anchor="middle">validation accuracy (5-way)</text>')
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        dash = ' stroke-dasharray="5,4"' if name in PUBLISHED else ""  # published points dashed
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(point, OCCURRENCES, values))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>'
                  for x, y in map(point, OCCURRENCES, values)]
        legend_y = TOP + 10 + 18 * index
        parts.append(f'<line x1="{LEFT + PLOT_WIDTH + 20}" x2="{LEFT + PLOT_WIDTH + 44}" y1="{legend_y}" '
                     f'y2="{legend_y}" stroke="{colour}" stroke-width="2"{dash}/>'
                     f'<text x="{LEFT + PLOT_WIDTH + 50}" y="{legend_y + 4}">{name}</text>')
    return "\n".join(parts + ["</svg>"])


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
    drawn = {name: [results[name][f"acc{nth}"] for nth in OCCURRENCES] for name, (_, draw) in RUNS.items() if draw}
    with open(os.path.join(ROOT, "benchmarks", "accuracy_by_occurrence.svg"), "w") as chart:
        chart.write(svg({**drawn, **PUBLISHED}) + "\n")


if __name__ == "__main__":
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("logs", help="Folder of the runs' logs.")
    options.add_argument("--run", action="store_true", help="Train the runs first (else read their logs).")
    main(options.parse_args())
