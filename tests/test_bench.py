"""The benchmark's pieces measure what they say (numbers are not asserted: speed is the
benchmark's business, not a test's)."""

from lottery import bench


def test_training_rate_counts_lenet_step_flops_and_reports_a_rate():
    rate, mflop = bench.training_rate(replicates=2, steps=20, repeats=1)
    # forward + weight gradients + activation gradients of LeNet-300-100 at batch 60
    assert mflop == 2 * 60 * (3 * (784 * 300 + 300 * 100 + 100 * 10) - 784 * 300) / 1e6
    assert mflop == 67.608
    assert rate > 0


def test_a_three_level_imp_run_compiles_train_and_evaluate_once():
    counts = bench.imp_compilations()
    assert counts["train"] == 1
    assert counts["evaluate"] == 1
    assert counts["total"] >= 2


def test_the_matmul_worker_prints_the_rate_as_json(capsys):
    import json

    bench.main(["--worker", "--matmul", "--repeats", "1"])
    assert json.loads(capsys.readouterr().out)["matmul_gflops"] > 0
