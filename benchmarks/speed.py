#!/usr/bin/env python3
"""Measures training speed: steady-state episodes/s, time to the end of the first epoch, whole run, peak memory.

Each configuration runs in a fresh process (its own threads, its own peak memory):

    OMNIGLOT_DATA=../shared/omniglot/omniglot.npz python3 benchmarks/speed.py

prints a Markdown table for the README. Steady-state speed counts training alone
(validation excluded), median over the epochs after the first.
"""
import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

START = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

bench = argparse.ArgumentParser(description=__doc__.splitlines()[0])
bench.add_argument("--classes", default=[5, 2], type=int, nargs="+", help="Episode widths to measure.")
bench.add_argument("--train_episodes", default=3200, type=int, help="Training episodes per epoch.")
bench.add_argument("--test_episodes", default=320, type=int, help="Validation episodes.")
bench.add_argument("--epochs", default=3, type=int, help="Epochs; the first one includes tracing and compiling.")
bench.add_argument("--child", default=None, help=argparse.SUPPRESS)


def cpu(info=None):
    """The CPU's model name and its widest vector instructions, from `info` (default: /proc/cpuinfo, where there
    is one): a run's speed depends on both."""
    try:
        info = info or open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor()
    model = re.search(r"^model name\s*: (.*)$", info, re.MULTILINE)
    flags = set(re.search(r"^flags\s*: (.*)$", info, re.MULTILINE).group(1).split())
    widest = next((name for flag, name in [("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")]
                   if flag in flags), "no AVX")
    return f"{model.group(1) if model else platform.processor()}, {widest}"


def measure(flags):
    """Runs learning_to_learn.main in this process and returns its timings."""
    sys.path.insert(0, ROOT)
    import keras
    import tensorflow as tf

    import learning_to_learn

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch_ends, self.training_seconds = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.perf_counter()

        def on_test_begin(self, logs=None):  # validation follows the epoch's training
            self.training_seconds.append(time.perf_counter() - self.epoch_start)

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_ends.append(time.perf_counter() - START)

    args = learning_to_learn.parse_args(flags)
    clock = Clock()
    learning_to_learn.main(args, callbacks=[clock])
    steady = sorted(clock.training_seconds[1:])[len(clock.training_seconds[1:]) // 2]
    return {
        "episodes_per_second": args.train_episodes / steady,
        "first_epoch_end_s": clock.epoch_ends[0],
        "first_epoch_extra_s": clock.training_seconds[0] - steady,
        "whole_run_s": time.perf_counter() - START,
        "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
    }


def main(options):
    rows = []
    for classes in options.classes:
        flags = [f"--classes={classes}", f"--train_episodes={options.train_episodes}",
                 f"--test_episodes={options.test_episodes}", f"--epochs={options.epochs}"]
        child = subprocess.run([sys.executable, __file__, f"--child={json.dumps(flags)}"],
                               capture_output=True, text=True, check=True)
        result = json.loads(child.stdout.splitlines()[-1])
        rows.append(f"| {classes}-way | {result['device']} | {result['episodes_per_second']:.0f} "
                    f"| {result['first_epoch_end_s']:.1f} | {result['first_epoch_extra_s']:.1f} "
                    f"| {result['whole_run_s']:.1f} | {result['peak_memory_gb']:.2f} |")
    print(f"`{' '.join(sys.argv)}` ({options.epochs} epochs x {options.train_episodes} training + "
          f"{options.test_episodes} validation episodes; {os.cpu_count()} cores of {cpu()}, "
          f"{time.strftime('%Y-%m-%d')})\n")
    print("| episodes | device | steady episodes/s | first epoch ends (s) | first epoch's extra (s) "
          "| whole run (s) | peak memory (GB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    options = bench.parse_args()
    if options.child:
        result = measure(json.loads(options.child))
        print(json.dumps(result))
    else:
        main(options)
