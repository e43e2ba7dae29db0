"""The GPU check's cases are the issue's: ResNet-20 stacks of 1, 4 and 16 members on
CIFAR-shaped images, and ResNet-50 at 224 px as one member data-parallel over every device;
on a CPU the same cases, tiny. (`lottery-bench --section gpu` runs them; its numbers are
measured on a GPU, never in a test.)"""

from lottery.gpu_check import PEAKS, cases


def test_on_a_gpu_resnet20_stacks_and_a_data_parallel_resnet50_at_224():
    found = cases(devices=8, on_gpu=True)
    assert [(c.model, c.shape, c.members) for c in found] == [
        ("resnet20", (32, 32, 3), 1), ("resnet20", (32, 32, 3), 4),
        ("resnet20", (32, 32, 3), 16), ("resnet50", (224, 224, 3), 1)]
    assert found[-1].batch == 64 * 8  # 64 images per device, one member over all 8
    assert all(c.options == {} for c in found)  # full-size models


def test_on_a_cpu_the_cases_are_tiny_and_peaks_are_listed_per_precision():
    tiny = cases(devices=2, on_gpu=False)
    assert all(c.shape[0] <= 32 for c in tiny) and tiny[-1].options == {"width": 0.125}
    assert all(set(peaks) == {"fp32", "bf16"} and peaks["bf16"] > peaks["fp32"]
               for peaks in PEAKS.values())
