"""The two-axis mesh (`lottery.mesh`): how `auto` lays out the devices, and that every layout
of 4 CPU devices (1 x 4 data-parallel, 2 x 2, 4 x 1) writes the record one device writes, to
float tolerance: members sharded on `stack`, each batch split on `data` with the gradients
and batch-norm statistics reduced by the compiler."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_same_records, records

from lottery.mesh import MeshError, MeshShape, mesh_shape

TESTS = Path(__file__).parent


@pytest.mark.parametrize("devices, members, batch, expected", [
    (8, 1, 1024, (1, 8)),   # the examples: one member data-parallel over 8
    (8, 16, 1024, (8, 1)),  # more members than devices: members only
    (8, 8, 1024, (8, 1)),
    (8, 2, 1024, (2, 4)),   # the members spread first, the rest splits batches
    (8, 3, 1024, (2, 4)),   # 4 x 2 would leave a stack device to padding alone: 2 x 4 pads 1
    (8, 1, 60, (2, 4)),     # 60 does not split over 8: the widest data split that does
    (2, 6, 20, (2, 1)),     # this machine's CPU run of TINY: as before the mesh had 2 axes
    (1, 6, 20, (1, 1)),
    (4, 1, 7, (4, 1)),      # a batch that splits over nothing: members spread, padded
])
def test_auto_spreads_members_first_then_splits_batches(devices, members, batch, expected):
    assert mesh_shape(devices, members, batch) == MeshShape(*expected)


def test_a_data_size_that_does_not_fit_is_refused_with_the_choices():
    with pytest.raises(MeshError, match=r"train.mesh.data=3 does not divide the 4 devices: "
                                        r"choose one of 1, 2, 4, or auto"):
        mesh_shape(4, 2, 20, 3)
    with pytest.raises(MeshError, match=r"train.batch_size=30 does not split over "
                                        r"train.mesh.data=4"):
        mesh_shape(4, 2, 30, 4)


def test_a_mesh_config_that_does_not_fit_is_a_config_error_before_training():
    from helpers import run_config

    from lottery.config import ConfigError
    from lottery.setup import build

    with pytest.raises(ConfigError, match="train.mesh.data=3 does not divide the 2 devices"):
        build(run_config("train.mesh.data=3"))
    with pytest.raises(ConfigError, match="train.mesh.data=0 must be at least 1"):
        run_config("train.mesh.data=0")


_LAYOUTS = """
import json, sys
from pathlib import Path
from lottery import platform
platform.configure()
import jax
sys.path.insert(0, sys.argv[1])
from helpers import run_config
from lottery import imp
from lottery.setup import build

out, overrides = Path(sys.argv[2]), json.loads(sys.argv[3])
devices = jax.devices()
shapes = {}
for name, used, data in json.loads(sys.argv[4]):
    cfg = run_config(*overrides, f"train.mesh.data={data}")
    setup = build(cfg, devices[:used])
    shapes[name] = [setup.trainer.shape.stack, setup.trainer.shape.data]
    imp.run(cfg, out / name, log=lambda line: None, setup=setup)
print(json.dumps(shapes))
"""

def _layouts(tmp_path: Path, overrides: list[str], layouts: list) -> dict:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4"}
    done = subprocess.run([sys.executable, "-c", _LAYOUTS, str(TESTS), str(tmp_path),
                           json.dumps(overrides), json.dumps(layouts)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_every_layout_of_four_devices_writes_the_one_device_record(tmp_path):
    """LeNet on 8x8 inputs, 2 branches x 2 replicates, a pruning level with rewinding."""
    overrides = ["dataset.shape=[8,8,1]", "branches=[ticket,random_prune]", "prune.levels=1",
                 "rewind.step=20"]
    shapes = _layouts(tmp_path, overrides, [["one", 1, "auto"], ["1x4", 4, 4],
                                            ["2x2", 4, 2], ["4x1", 4, 1]])
    assert shapes == {"one": [1, 1], "1x4": [1, 4], "2x2": [2, 2], "4x1": [4, 1]}
    reference = records(tmp_path, "one")
    assert reference[0]["mesh"] == {"stack": 1, "data": 1}
    for name in ("1x4", "2x2", "4x1"):
        other = records(tmp_path, name)
        assert other[0]["mesh"] == dict(zip(("stack", "data"), shapes[name]))
        assert_same_records(reference, other, name)


_TRAIN_CHUNK = """
import json, sys
from pathlib import Path
from lottery import platform
platform.configure()
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from helpers import run_config
from lottery.models import MODELS
from lottery.models.resnet import ResNet, _prunable
from lottery.pruning.masks import full_masks
from lottery.setup import build
from lottery.state import Network


class ResNet8(ResNet):  # ResNet-20's blocks, one per stage: batch norm, compiled quickly
    depth, prunable = 8, _prunable(8)


MODELS["resnet8"] = ResNet8
results, start = {}, None
for name, used in (("one", 1), ("1x4", 4)):
    setup = build(run_config(*json.loads(sys.argv[2])), jax.devices()[:used])
    trainer, model = setup.trainer, setup.model
    if start is None:  # one member's weights, masks and data key, on the host
        keys = jax.random.split(jax.random.key(0), 1)
        network = Network(*jax.jit(jax.vmap(model.init))(keys))
        start = jax.device_get((network, jax.vmap(full_masks)(network.params),
                                jax.random.key_data(keys)))
    network, masks, keys = jax.device_put(start, trainer.stacked)
    state, loss = trainer.train_chunk(trainer.start(network, masks), keys, 0)
    flat = jax.tree_util.tree_flatten_with_path((state.params, state.model_state))[0]
    results[name] = {"shape": [trainer.shape.stack, trainer.shape.data],
                     "loss": np.asarray(loss).tolist(),
                     "metrics": {k: v.tolist() for k, v in trainer.evaluate(state.network).items()},
                     "leaves": {jax.tree_util.keystr(path): np.asarray(leaf).ravel().tolist()
                                for path, leaf in flat}}
Path(sys.argv[3]).write_text(json.dumps(results))
"""


def test_batch_norm_statistics_split_over_data_devices_equal_one_devices(tmp_path):
    """A CIFAR ResNet of depth 8 (batch norm in every block) on 8x8 inputs, one member,
    trained 10 steps: data-parallel over 4 devices (1 x 4), its weights, batch-norm running
    statistics, loss and metrics are one device's to float tolerance: the batch statistics
    are the whole batch's, not each device's quarter's."""
    overrides = ["model=resnet20", "model.name=resnet8", "optimizer=sgd",
                 "dataset.shape=[8,8,3]", "branches=[ticket]", "replicates=1",
                 "prune.levels=1", "rewind.step=0", "train.steps=10", "train.eval_every=10",
                 "train.batch_size=8", "prune.layer_rates=null"]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4"}
    done = subprocess.run([sys.executable, "-c", _TRAIN_CHUNK, str(TESTS), json.dumps(overrides),
                           str(tmp_path / "results.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    one, split = results["one"], results["1x4"]
    assert (one["shape"], split["shape"]) == ([1, 1], [1, 4])
    assert one["leaves"].keys() == split["leaves"].keys()
    assert any("mean" in path for path in one["leaves"])  # batch norm's running statistics
    for path in one["leaves"]:
        np.testing.assert_allclose(split["leaves"][path], one["leaves"][path],
                                   rtol=1e-4, atol=1e-5, err_msg=path)
    np.testing.assert_allclose(split["loss"], one["loss"], rtol=1e-5)
    for key, value in one["metrics"].items():
        np.testing.assert_allclose(split["metrics"][key], value, rtol=1e-5, err_msg=key)
