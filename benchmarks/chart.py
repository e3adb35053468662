#!/usr/bin/env python3
"""Draws validation accuracy by occurrence (1st, 2nd, 5th, 10th) as an SVG chart, beside published points.

    python3 benchmarks/chart.py "default, 20 epochs=run.log" ... > benchmarks/accuracy_by_occurrence.svg

Each `NAME=LOG` reads the last `val_acc1`, `val_acc2`, `val_acc5`, `val_acc10` that
the log of a run of learning_to_learn.py printed (graded lines or Keras progress bars).
"""
import re
import sys

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


def last_accuracies(log):
    text = open(log, errors="replace").read()
    values = []
    for nth in OCCURRENCES:
        found = re.findall(rf"val_acc{nth}: (\d\.\d+)", text)
        if not found:
            sys.exit(f"chart.py: error: {log} has no val_acc{nth}")
        values.append(float(found[-1]))
    return values


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


if __name__ == "__main__":
    runs = dict(argument.split("=", 1) for argument in sys.argv[1:])
    print(svg({**{name: last_accuracies(log) for name, log in runs.items()}, **PUBLISHED}))
