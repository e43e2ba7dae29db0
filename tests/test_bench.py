"""The benchmark's pieces measure what they say (the machine's speed is not asserted: that
is the benchmark's business, not a test's). Its clock is replaced by one that reads given
times, so the rates it computes from them are checked exactly."""

import argparse
import json
import re
from types import SimpleNamespace

import pytest

from lottery import bench


def fake_clock(monkeypatch, durations, module=bench):
    """`module`'s `time.perf_counter` reads start/end pairs `durations` seconds apart (and
    the test sees how many readings were taken)."""
    readings, now = [], 0.0
    for duration in durations:
        readings += [now, now + duration]
        now += duration + 100.0
    taken = []

    def perf_counter():
        taken.append(readings[len(taken)])
        return taken[-1]

    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=perf_counter))
    return taken


def test_training_rate_counts_lenet_step_flops_and_the_median_rate(monkeypatch):
    taken = fake_clock(monkeypatch, [0.5, 0.25, 2.0])  # three timed chunks: median 0.5 s
    rate, mflop = bench.training_rate(replicates=2, steps=20, repeats=3)
    assert len(taken) == 6  # each timed chunk read the clock twice, the warm-up chunk never
    assert rate == 2 * 20 / 0.5  # replica-steps per second of the median chunk
    # forward + weight gradients + activation gradients of LeNet-300-100 at batch 60
    assert mflop == 2 * 60 * (3 * (784 * 300 + 300 * 100 + 100 * 10) - 784 * 300) / 1e6
    assert mflop == 67.608


def test_the_training_section_prints_rates_flops_and_compilations(monkeypatch, capsys):
    """On a 2-core CPU: a worker per device setting (1 device: R 1 and 4; 2 devices: the
    stacks that fill both, R 2 and 4), the compilation count from the last; every printed
    GFLOP/s and fraction of matmul derived from the workers' rates."""
    calls = []
    matmul = {1: 50.0, 2: 80.0}
    rates = {1: {"1": 400.0, "4": 900.0}, 2: {"2": 1200.0, "4": 1500.0}}

    def worker(env, *options):
        devices = int(env["JAX_NUM_CPU_DEVICES"])
        calls.append((devices, options))
        if "--matmul" in options:
            return {"matmul_gflops": matmul[devices]}
        result = {"devices": devices, "platform": "cpu", "rates": rates[devices],
                  "step_mflop": 67.608}
        if "--compilations" in options:
            result["compilations"] = {"train": 1, "evaluate": 1, "total": 9}
        return result

    monkeypatch.setattr(bench, "_run_worker", worker)
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    args = argparse.Namespace(steps=100, repeats=3, replicates=[1, 4], members="auto")
    bench.training_section(args)
    out = capsys.readouterr().out
    trainings = [(devices, options) for devices, options in calls if "--matmul" not in options]
    assert [devices for devices, _ in trainings] == [1, 2]
    for devices, options in trainings:
        stacks = options[options.index("--replicates") + 1:]
        stacks = stacks[:stacks.index("--compilations")] if "--compilations" in stacks else stacks
        assert sorted(map(int, stacks)) == sorted(map(int, rates[devices]))
        assert ("--compilations" in options) == (devices == 2)
    assert "one step = 67.6 MFLOP" in out
    rows = re.findall(r"^\s*(\d+) cpu\s+([\d.]+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)%$", out,
                      re.MULTILINE)
    assert len(rows) == 4
    for devices, matmul_printed, replicates, rate, gflops, percent in rows:
        devices = int(devices)
        expected_rate = rates[devices][replicates]
        assert float(matmul_printed) == matmul[devices]
        assert float(rate) == expected_rate
        assert float(gflops) == pytest.approx(expected_rate * 67.608 / 1e3, abs=0.05)
        assert float(percent) == pytest.approx(
            100 * expected_rate * 67.608 / 1e3 / matmul[devices], abs=0.05)
    assert "train function 1, evaluation 1, all programs 9" in out


def test_a_three_level_imp_run_compiles_train_and_evaluate_once():
    counts = bench.imp_compilations()
    assert counts["train"] == 1
    assert counts["evaluate"] == 1
    assert counts["total"] >= 2


def test_the_matmul_worker_prints_the_best_rate_as_json(monkeypatch, capsys):
    taken = fake_clock(monkeypatch, [1.0, 0.5])  # two timed 2048^3 matmuls: best 0.5 s
    bench.main(["--worker", "--matmul", "--repeats", "2"])
    assert len(taken) == 4
    result = json.loads(capsys.readouterr().out)
    assert result == {"matmul_gflops": pytest.approx(2 * 2048**3 / 0.5 / 1e9, rel=1e-12)}


def test_the_input_section_times_a_running_stream_after_its_first_batch(monkeypatch, tmp_path):
    bench.make_image_folder(tmp_path, (10, 8), files=bench.INPUT_BATCH + 1)
    # the first batch 3 s, an untimed warm-up call, then three timed calls: median 0.5 s
    taken = fake_clock(monkeypatch, [3.0, 0.5, 0.25, 2.0])
    rate, first = bench._stream_rate(tmp_path, 8, workers=0, repeats=3)
    assert len(taken) == 8 and first == 3.0
    assert rate == bench.INPUT_STEPS * bench.INPUT_BATCH / 0.5


def test_the_input_table_names_each_path(capsys):
    rows = [{"resolution": 64, "source": (64, 64), "workers": None, "images_per_s": 250000.0,
             "first_s": None},
            {"resolution": 64, "source": (64, 64), "workers": 2, "images_per_s": 1234.4,
             "first_s": 4.25}]
    bench.print_input(rows, repeats=5)
    out = capsys.readouterr().out
    assert re.search(r"^\s+64\s+64x64\s+in-memory x\[batch_indices\]\s+250,000\s*$", out,
                     re.MULTILINE)
    assert re.search(r"^\s+64\s+64x64\s+stream, 2 workers\s+1,234\s+4.2$", out, re.MULTILINE)


def test_the_sparse_section_times_each_method_in_turns_against_dense(monkeypatch, capsys):
    """Each round times every method once, in order; the ratio is the median of the rounds'
    own ratios (here dense 1 s and RigL 2 s, then 3 s and 3 s: ratios 2 and 1, median 2 of
    the sorted [1, 2]), not the ratio of medians."""
    from lottery import sparse_bench

    taken = fake_clock(monkeypatch, [1.0, 2.0, 3.0, 3.0], sparse_bench)
    rows = sparse_bench.sparse_rates(steps=2, repeats=2, methods=("dense", "RigL"))
    assert len(taken) == 8
    assert [row["method"] for row in rows] == ["dense", "RigL"]
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] == 2.0
    assert rows[1]["ms_per_step"] == 1e3 * 3.0 / 2  # the upper median of 2 s and 3 s
    sparse_bench.print_sparse(rows, 2, 2)
    assert re.search(r"^RigL\s+1500\.00\s+2\.00$", capsys.readouterr().out, re.MULTILINE)
