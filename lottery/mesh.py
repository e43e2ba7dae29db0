"""How a run's devices are laid out: a two-axis mesh `("stack", "data")`.

Members (branch x replicate networks) are sharded on `stack`: each device of a `stack` row
trains its share of the members, which never communicate. Each member's batch is sharded on
`data`: the devices of a `data` column hold the same members and split their batches, and
the compiler reduces the gradients (and batch-norm's batch statistics) through the
sharding, with no hand-written all-reduce. One device is 1 x 1; a CPU run of several
members is D x 1; one member on 8 GPUs is 1 x 8.

`train.mesh.data` picks the `data` size: `auto` puts devices on `stack` while there are
members to spread and the rest on `data` (8 devices, 1 member: 1 x 8; 8 devices, 16
members: 8 x 1; 8 devices, 2 members: 2 x 4), a number sets it. Either way the `data` size
must divide the batch, so that every device gets the same number of examples.
"""

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh


class MeshError(ValueError):
    """A mesh the devices, members or batch size don't allow; the message says what would."""


@dataclass(frozen=True)
class MeshShape:
    stack: int  # devices the members are spread over
    data: int  # devices each member's batch is split over

    def __str__(self) -> str:
        return f"{self.stack} x {self.data} (stack x data)"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def mesh_shape(devices: int, members: int, batch_size: int, data: int | str = "auto") -> MeshShape:
    """The (stack, data) split of `devices` for `members` networks trained on batches of
    `batch_size` (`data`: `auto` or the `data` size)."""
    if data == "auto":
        fits = [d for d in _divisors(devices) if batch_size % d == 0]  # data sizes possible
        # the fewest data devices that leave no stack device without a member of its own
        spread = [d for d in fits if devices // d <= members]
        data = min(spread) if spread else max(fits)
    if devices % data:
        raise MeshError(f"train.mesh.data={data} does not divide the {devices} devices: "
                        f"choose one of {', '.join(map(str, _divisors(devices)))}, or auto")
    if batch_size % data:
        raise MeshError(f"train.batch_size={batch_size} does not split over train.mesh.data="
                        f"{data} devices: choose a batch size divisible by {data}, or "
                        "another train.mesh.data")
    return MeshShape(devices // data, data)


def make_mesh(shape: MeshShape, devices=None) -> Mesh:
    """The mesh of `shape` over `devices` (default: every device of the run, all processes).
    Devices of one process sit next to each other on `data`, so that a member's batch is
    split within a host before across hosts."""
    devices = jax.devices() if devices is None else devices
    if len(devices) != shape.stack * shape.data:
        raise MeshError(f"a {shape} mesh needs {shape.stack * shape.data} devices, not "
                        f"{len(devices)}")
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(ordered).reshape(shape.stack, shape.data), ("stack", "data"))
