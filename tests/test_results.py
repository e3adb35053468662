"""benchmarks/results.py: the tables of both READMEs are written from the record of runs, benchmarks/runs.csv."""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("results", os.path.join(ROOT, "benchmarks", "results.py"))
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)


def test_the_readmes_tables_agree_with_the_record():
    assert results.check() == [], "run python3 benchmarks/results.py write"


def test_a_changed_figure_in_the_record_changes_the_tables():
    record = results.read_record()
    record["default-5way"] = {**record["default-5way"], "val_acc2": "0.1234"}
    record[results.BEST_RUN] = {**record[results.BEST_RUN], "wall": "99:59"}
    readme = open(os.path.join(ROOT, "README.md")).read()
    changed = results.with_tables(readme, record)
    assert "0.1234" not in readme and changed.count("0.1234") == 2, "the headline and the results table"
    assert changed.count("99:59") == 2


def test_every_recorded_run_is_one_of_RUNS_with_every_metric():
    record = results.read_record()
    assert list(record) == [name for name in results.RUNS if name in record], "runs.csv keeps the order of RUNS"
    assert {group[0] for group in results.README_RECIPES} | set(results.CHART_RUNS) <= set(record)
    for run in record.values():
        assert all(0 <= float(run[name]) <= 1 for name in results.METRICS if name != "val_loss" and run[name]), run
        assert all(run[name] for name in results.METRICS if name not in ["val_acc5", "val_acc10"]), run


def test_the_last_epoch_of_a_log_is_read(tmp_path):
    names = results.METRICS
    log = tmp_path / "run.log"
    log.write_text("".join(f"Epoch {epoch}/2 " + " - ".join(f"{name}: 0.{epoch}{index:03d}" for index, name
                                                         in enumerate(names)) + "\n" for epoch in [1, 2]))
    metrics, epochs = results.last_epoch(log)
    assert epochs == 2 and metrics == {name: f"0.2{index:03d}" for index, name in enumerate(names)}


def test_a_log_of_usr_bin_time_is_recorded_with_its_wall_time(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "LOGS", str(tmp_path))
    monkeypatch.setattr(results, "RECORD", str(tmp_path / "runs.csv"))
    monkeypatch.setattr(results, "gpu", lambda: False)
    (tmp_path / "runs.csv").write_text(open(os.path.join(ROOT, "benchmarks", "runs.csv")).read())
    line = "Epoch 1/1 " + " - ".join(f"{name}: 0.5000" for name in results.METRICS)
    (tmp_path / "best-5way.log").write_text(f"{line}\n\tElapsed (wall clock) time (h:mm:ss or m:ss): 54:30.97\n")
    monkeypatch.setattr(results, "write", lambda: None)
    results.record_logs(["best-5way"])
    recorded = results.read_record()["best-5way"]
    assert (recorded["wall"], recorded["epochs"], recorded["val_acc2"]) == ("54:30", "1", "0.5000")


def test_a_compacted_log_keeps_each_epochs_last_line(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("Epoch 1/2\n\x1b[1m  1/625\x1b[0m ━━ 9s/step - loss: 1.6\n\r\x1b[1m  2/625\x1b[0m ━━ - loss: 1.5\r"
                   "625/625 ━━ 57s 90ms/step - loss: 1.2 - val_acc: 0.3000\nEpoch 2/2\n")
    results.compact(log)
    assert log.read_text() == "Epoch 1/2\n625/625 ━━ 57s 90ms/step - loss: 1.2 - val_acc: 0.3000\nEpoch 2/2\n"


# The flags of the course's template: every other flag of --help is this program's, and its effect is measured.
TEMPLATE_FLAGS = {"batch_size", "cell_size", "classes", "epochs", "images_per_class", "lstm_dim", "recodex",
                  "read_heads", "seed", "test_episodes", "threads", "train_episodes"}


def test_the_first_table_of_the_findings_names_every_flag_not_the_templates():
    from long_runs import FLAGS

    findings = open(os.path.join(ROOT, "benchmarks", "README.md")).read()
    first_table = re.search(r"(^\|.*\n)+", findings, re.MULTILINE).group(0).rstrip("\n")
    assert first_table == results.tables(results.read_record())["effects"]
    named = set(re.findall(r"--(\w+)", first_table))
    assert set(FLAGS) - TEMPLATE_FLAGS <= named, set(FLAGS) - TEMPLATE_FLAGS - named


def test_the_headline_shows_the_mean_and_range_of_the_best_recipes_seeds():
    record = results.read_record()
    firsts = [float(record[name]["val_acc1"]) for name in results.BEST_SEEDS]
    assert len(firsts) >= 2
    expected = f"{sum(firsts) / len(firsts):.4f} ({min(firsts):.4f}-{max(firsts):.4f})"
    assert expected in results.tables(record)["headline"].splitlines()[3]


def test_a_log_of_fewer_than_10_drawings_a_class_leaves_the_10th_empty(tmp_path):
    names = [name for name in results.METRICS if name != "val_acc10"]
    log = tmp_path / "run.log"
    log.write_text("Epoch 1/1 " + " - ".join(f"{name}: 0.5000" for name in names) + "\n")
    metrics, _ = results.last_epoch(log)
    assert metrics["val_acc10"] == "" and metrics["val_acc2"] == "0.5000"
    log.write_text("Epoch 1/1 " + " - ".join(f"{name}: 0.5000" for name in names if name != "val_acc2") + "\n")
    with pytest.raises(SystemExit, match="shows no val_acc2"):
        results.last_epoch(log)


def test_a_cpu_is_named_with_its_widest_vector_instructions_and_bfloat16_units():
    avx2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert results.cpu(avx2) == "AMD EPYC 7B13, AVX2"
    assert results.cpu(avx2.replace("avx2", "avx2 avx512f avx512bw")) == "AMD EPYC 7B13, AVX-512"
    assert results.cpu(avx2.replace(" avx avx2 fma", "")) == "AMD EPYC 7B13, no AVX"
    avx512 = avx2.replace("avx2", "avx2 avx512f")
    assert results.cpu(avx512.replace("fma", "fma avx512_bf16")) == "AMD EPYC 7B13, AVX-512, AVX512_BF16"
    assert results.cpu(avx512.replace("fma", "fma avx512_bf16 amx_bf16 amx_tile")) == "AMD EPYC 7B13, AVX-512, AMX"


def test_the_fields_table_shows_each_recipes_mean_and_range_over_its_seeds_models(tmp_path, monkeypatch):
    # The logs as the scorers print them, with /usr/bin/time's report after.
    for name, one_shot, lake in [("a", "90.00", "10.00"), ("a-seed1", "91.50", "20.50"), ("a-seed2", "95.00", None)]:
        (tmp_path / f"few-shot-{name}-1shot.log").write_text(
            f"1000/1000 ━━ 42s\n20-way 1-shot: {one_shot}% +- 0.50% (95% confidence) over 1000 tasks\n"
            "\tExit status: 0\n")
        if lake:
            (tmp_path / f"lake-oneshot-{name}.log").write_text(
                f"run01: 0.0% error\nerror over the 400 test drawings of 20 runs: {lake}% (10 orders each)\n")
    monkeypatch.setattr(results, "LOGS", str(tmp_path))
    monkeypatch.setattr(results, "FIELD_RECIPES", [("recipe a", ["a", "a-seed1", "a-seed2"])])
    row = results.field_table().splitlines()[2]
    # The mean of 90, 91.5 and 95 is 92.17; Lake's runs were scored for two of the models.
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells == ["this program, recipe a (3 seeds)", "background alphabets x 4 rotations", "", "",
                     "92.17 (90.00-95.00)", "", "15.25 (10.00-20.50)"]


@pytest.mark.slow
def test_side_by_side_tells_a_slower_build_from_the_old_one(tmp_path):
    # The new build's recurrence also multiplies two 1000 x 1000 matrices of its inputs (constants would be folded
    # away): 2 GFLOP more a call, at least 2 ms.
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        shutil.copy(path, tmp_path)
    program = (tmp_path / "fused_recurrence.py").read_text()
    projection = "return ops.matmul(ops.transpose(sequences, [1, 0, 2]), kernel) + cell.controller.bias"
    assert projection in program
    square = "(ops.ones((1000, 1000)) + ops.mean(sequences))"
    slower = f"{projection} + 0 * ops.sum(ops.matmul({square}, {square}))"
    (tmp_path / "fused_recurrence.py").write_text(program.replace(projection, slower))
    script = os.path.join(ROOT, "benchmarks", "side_by_side.py")
    output = subprocess.run([sys.executable, script, ROOT, str(tmp_path), "--flags=--classes=2 --lstm_dim=8",
                             "--rounds=5"], capture_output=True, text=True, check=True).stdout
    rows = {row[0]: row[1:] for row in (line.strip("| ").split(" | ") for line in output.splitlines()[4:])}
    assert list(rows) == ["the recurrence, forward", "the recurrence, forward and backward", "the training step"]
    old, new = (float(rows["the recurrence, forward"][column].split()[0]) for column in [0, 1])
    assert new > old + 2 and all(float(ratio) > 1 for *_, ratio in rows.values())
