"""The compiled training and evaluation programs for a stack of members.

A *member* is one (branch, replicate) network: params, masks and optimizer state. The stack
of all members is trained by one compiled program: the members of each device batched by
`vmap` or run one after another (`lottery.platform.member_mode`), `lax.scan` over the
steps of a chunk, data resident on the device and shuffled there, or streamed (a
`StreamedDataset`: uint8 batches decoded on the host in the same order, normalised on the
device, `stream_steps` steps per compiled call). The stack axis
is sharded over the `stack` axis of the run's mesh (padded to a multiple of its size), and
each member's batch over its `data` axis (`lottery.mesh`): the members of a device never
communicate; a batch split over `data` devices has its gradients reduced by the compiler.
Masks, rates and the start step are traced arguments, so a run compiles each program once.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lottery import platform
from lottery.distributed import to_devices, to_host
from lottery.data import Dataset, StreamedDataset
from lottery.data.order import batch_indices
from lottery.mesh import make_mesh, mesh_shape
from lottery.precision import to_precision
from lottery.models import ModelSpec
from lottery.optim import Optimizer
from lottery.pruning.step_hooks import StepHooks
from lottery.seeds import name_id
from lottery.state import MemberState, Network


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


STREAM_STEPS = 4  # most training steps per compiled call on a streamed dataset
SAMPLE_BATCHES = 10  # a streamed dataset's resident sample (`train_data`): this many batches


def batch_sums(logits, y, w):
    """The weighted sums of the loss and of the correct predictions of one batch. A target
    with a sequence axis (a language model's next bytes) counts each example as the mean
    over its tokens."""
    def per_example(values):
        return values.reshape(values.shape[0], -1).mean(axis=1)

    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return (jnp.sum(per_example(cross_entropy(logits, y)) * w),
            jnp.sum(per_example(correct) * w))


def batched_metrics(logits_of, split):
    """Mean loss and accuracy of `logits_of(x)` on a split of padded batches `(x, y, weight)`
    (`padded_batches`): batch by batch (`batch_sums`), the padding weighted 0."""
    def batch(args):
        x, y, w = args
        return batch_sums(logits_of(x), y, w)

    losses, corrects = jax.lax.map(batch, split)
    _, _, weights = split
    total = jnp.sum(weights)
    return jnp.sum(losses) / total, jnp.sum(corrects) / total


def split_metrics(model: ModelSpec, network: Network, split):
    """Mean loss and accuracy of `network` on a split of padded batches (`batched_metrics`)."""
    return batched_metrics(lambda x: model.logits(*network, x), split)


def padded_batches(x: np.ndarray, y: np.ndarray, batch: int, multiple: int = 1):
    """(x, y, weight) reshaped to (num_batches, batch, ...), padding the last batch with weight
    0; a batch of at most `batch` examples (fewer when the split is smaller), rounded up to a
    `multiple` (the devices a batch is split over)."""
    x, y = np.asarray(x), np.asarray(y)
    batch = -(-min(batch, len(x)) // multiple) * multiple
    pad = -len(x) % batch
    weight = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
    shape = (len(x) // batch, batch)
    return (x.reshape(*shape, *x.shape[1:]), y.reshape(*shape, *y.shape[1:]),
            weight.reshape(shape))


def over_members(fn, batched: tuple[bool, ...], mode: str):
    """`fn` applied to each member: over the leading axis of the arguments marked `batched`,
    the others shared; by `vmap` or sequentially (`lax.map`)."""
    if mode == "vmap":
        return jax.vmap(fn, in_axes=tuple(0 if b else None for b in batched))

    @functools.wraps(fn)  # the compiled program keeps the member function's name
    def mapped(*args):
        def one(members):
            members = iter(members)
            return fn(*(next(members) if b else arg for arg, b in zip(args, batched)))

        return jax.lax.map(one, tuple(arg for arg, b in zip(args, batched) if b))

    return mapped


class Trainer:
    """Compiled `train_chunk` and `evaluate` for a stack of `stack_size` members.

    A member's training state is a `MemberState` (`lottery.state`). `hooks` are the pruning
    schedule's per-step hooks (`lottery.pruning.step_hooks`; default: fixed masks);
    `controls` are the traced values shared by all members that `train_chunk` passes on
    (`lr`: a constant learning rate where positive, else the schedule's; a schedule's own,
    e.g. gradual pruning's `counts`).
    """

    def __init__(self, model: ModelSpec, optimizer: Optimizer, data: Dataset,
                 batch_size: int, chunk: int, stack_size: int, eval_batch_size: int = 1000,
                 members: str = "auto", hooks: StepHooks | None = None,
                 mesh_data: int | str = "auto",
                 precision: str = "fp32", devices=None):
        devices = jax.devices() if devices is None else devices
        self.hooks = hooks = StepHooks() if hooks is None else hooks
        self.shape = shape = mesh_shape(len(devices), stack_size, batch_size, mesh_data)
        self.mesh = make_mesh(shape, devices)
        self.stack_size = stack_size
        self.padded_size = math.ceil(stack_size / shape.stack) * shape.stack
        self.members = platform.member_mode(members, model.convolves,
                                            self.padded_size // shape.stack)
        self.stacked = NamedSharding(self.mesh, PartitionSpec("stack"))
        self.replicated = replicated = NamedSharding(self.mesh, PartitionSpec())
        self.optimizer = optimizer
        self.chunk = chunk
        self.streamed = streamed = isinstance(data, StreamedDataset)
        train_size = data.train_size if streamed else len(data.x_train)
        if train_size < batch_size:
            raise ValueError(f"batch_size={batch_size} exceeds the {train_size} "
                             "training examples")
        if streamed:  # batches come with each call; a fixed sample stays for the scores
            self.data, self.batch_size, self.eval_batch_size = data, batch_size, eval_batch_size
            self.stream_steps = math.gcd(chunk, STREAM_STEPS)
            self.share = batch_share(self.mesh)
            self.train_data = to_devices(data.sample(min(SAMPLE_BATCHES * batch_size,
                                                         train_size)), replicated)
            self.eval_data = None
            mean, std = np.asarray(data.mean, np.float32), np.asarray(data.std, np.float32)
        else:
            self.train_data = to_devices((data.x_train, data.y_train), replicated)
            self.eval_data = to_devices(
                tuple(padded_batches(x, y, eval_batch_size, shape.data)
                      for x, y in ((data.x_val, data.y_val), (data.x_test, data.y_test))),
                replicated)
        compute = to_precision(precision)

        def split_batch(x):
            """A batch's examples spread over the `data` devices (nothing to do on one)."""
            if shape.data == 1:
                return x
            return jax.lax.with_sharding_constraint(x, PartitionSpec("data"))

        def normalised(x):
            """A streamed uint8 batch as the resident path's float32 inputs."""
            return (x.astype(jnp.float32) - mean) / std

        def logits_of(params, model_state, x, train=False, key=None):
            logits, model_state = model.apply(compute(params), model_state,
                                              compute(split_batch(x)), train=train, key=key)
            return logits.astype(jnp.float32), model_state

        augment = None if streamed else data.augment  # a streamed dataset's: on the host

        def loss_fn(params, model_state, x, y, key):
            logits, model_state = logits_of(params, model_state, x, train=True, key=key)
            return cross_entropy(logits, y).mean(), model_state

        def train_steps(params, model_state, opt_state, masks, extra, key, steps, batches,
                        batch_of, controls):
            """`steps` (global step numbers) of training, step s on `batch_of(batches[s])`."""
            step_keys = jax.random.fold_in(key, name_id("step"))
            prune_keys = jax.random.fold_in(key, name_id("prune"))

            def step(carry, inputs):
                params, model_state, opt_state, masks, extra = carry
                at, batch = inputs
                params, masks, extra = hooks.before(params, masks, extra, at, controls,
                                                    prune_keys)
                augment_key, dropout_key = jax.random.split(jax.random.fold_in(step_keys, at))
                x, y = batch_of(batch)
                x = x if augment is None else augment(augment_key, x)
                (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                    params, model_state, x, y, dropout_key)

                def optimize(grads, opt_state, weights):
                    return optimizer.update(grads, opt_state, weights, at, controls["lr"])

                params, opt_state, masks, extra = hooks.update(
                    optimize, grads, params, opt_state, masks, extra, at, controls, prune_keys)
                return (params, model_state, opt_state, masks, extra), loss

            if hooks.fixed_masks:  # read at every step: as bools, 1/4 the bytes
                given, masks = masks, jax.tree.map(lambda m: m != 0, masks)
            (params, model_state, opt_state, masks, extra), losses = jax.lax.scan(
                step, (params, model_state, opt_state, masks, extra), (steps, batches))
            if hooks.fixed_masks:
                masks = given
            return params, model_state, opt_state, masks, extra, losses.mean()

        def member_chunk(params, model_state, opt_state, masks, extra, key_data, start_step,
                         train_data, controls):
            x_all, y_all = train_data
            key = jax.random.wrap_key_data(key_data)
            steps = start_step + jnp.arange(chunk)
            batches = batch_indices(key, steps, len(x_all), batch_size)
            return train_steps(params, model_state, opt_state, masks, extra, key, steps,
                               batches, lambda idx: (x_all[idx], y_all[idx]), controls)

        def member_stream(params, model_state, opt_state, masks, extra, key_data, start_step,
                          xs, ys, controls):
            """`stream_steps` steps on the member's streamed batches xs (steps, batch, ...)."""
            steps = start_step + jnp.arange(xs.shape[0])
            return train_steps(params, model_state, opt_state, masks, extra,
                               jax.random.wrap_key_data(key_data), steps, (xs, ys),
                               lambda batch: (normalised(batch[0]), batch[1]), controls)

        def member_eval(params, model_state, eval_data):
            (val_loss, val_acc), (test_loss, test_acc) = (
                batched_metrics(lambda x: logits_of(params, model_state, x)[0], split)
                for split in eval_data)
            return {"val_loss": val_loss, "val_accuracy": val_acc,
                    "test_loss": test_loss, "test_accuracy": test_acc}

        def member_eval_batch(params, model_state, x, y, w):
            """The member's weighted (loss, correct) sums on one streamed batch."""
            return batch_sums(logits_of(params, model_state, normalised(x))[0], y, w)

        def per_device(fn, batched):
            """`fn` over the members of each device's shard of the stack."""
            specs = tuple(PartitionSpec("stack") if b else PartitionSpec() for b in batched)
            # members never communicate; a batch split on `data` is left to the compiler
            manual = {"stack"} if shape.data > 1 else {"stack", "data"}
            return jax.shard_map(over_members(fn, batched, self.members), mesh=self.mesh,
                                 in_specs=specs, out_specs=PartitionSpec("stack"),
                                 axis_names=frozenset(manual), check_vma=False)

        if streamed:
            self._train = jax.jit(per_device(member_stream, (True,) * 6 + (False, True, True,
                                                                           False)),
                                  donate_argnums=(0, 1, 2, 4), out_shardings=self.stacked)
            self._eval = jax.jit(per_device(member_eval_batch, (True, True) + (False,) * 3))
            self._mean = jax.jit(lambda losses: sum(losses) / len(losses),
                                 out_shardings=self.stacked)
            # a batch's examples over `data` (members' batches also over `stack`)
            self.batches = NamedSharding(self.mesh, PartitionSpec("stack", None, "data"))
            self.eval_batches = NamedSharding(self.mesh, PartitionSpec("data"))
        else:
            self._train = jax.jit(per_device(member_chunk, (True,) * 6 + (False,) * 3),
                                  donate_argnums=(0, 1, 2, 4), out_shardings=self.stacked)
            self._eval = jax.jit(per_device(member_eval, (True, True, False)))
        self._opt_init = jax.jit(jax.vmap(optimizer.init), out_shardings=self.stacked)
        self._extra_init = jax.jit(jax.vmap(hooks.start), out_shardings=self.stacked)

    def pad(self, tree):
        """Pad the stack axis to a multiple of the device count by repeating the last member
        (traceable: call it inside a jit whose output sharding is `self.stacked`)."""
        extra = self.padded_size - self.stack_size
        if not extra:
            return tree
        return jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)]), tree)

    def start(self, network: Network, masks) -> MemberState:
        """The training state for a padded, placed stack of networks and masks: a fresh
        optimizer state, the schedule's `extra` (`StepHooks.start`)."""
        return MemberState(*network, self._opt_init(network.params), masks,
                           self._extra_init(network.params, masks))

    def train_chunk(self, state: MemberState, keys, start_step: int, controls=None):
        """Train every member `chunk` steps from global step `start_step`; returns the new
        state and each member's mean training loss. `keys` are raw key data
        (`jax.random.key_data`), one row per padded member; `controls` as in the class
        docstring (default: the schedule's learning rate). The input params, model state and
        optimizer state are donated."""
        controls = {"lr": np.float32(0.0)} if controls is None else controls
        if self.streamed:
            return self._train_streamed(state, keys, start_step, controls)
        *state, loss = self._train(*state, keys, np.int32(start_step), self.train_data, controls)
        return MemberState(*state), loss

    def _train_streamed(self, state: MemberState, keys, start_step: int, controls):
        """`train_chunk` on a streamed dataset: `chunk // stream_steps` compiled calls, the
        next call's batches decoded while the device trains the current one."""
        host_keys = np.asarray(to_host(keys))[: self.stack_size]
        size, losses = self.stream_steps, []
        batches = self._stream_batches(host_keys, start_step, size)
        for first in range(start_step, start_step + self.chunk, size):
            *state, loss = self._train(*state, keys, np.int32(first), *batches, controls)
            losses.append(loss)
            if first + size < start_step + self.chunk:  # dispatched: decode the next call's
                batches = self._stream_batches(host_keys, first + size, size)
        return MemberState(*state), losses[0] if len(losses) == 1 else self._mean(losses)

    def _stream_batches(self, host_keys, first: int, steps: int):
        """This process's share of steps [first, first + steps) of every member's batches,
        the member axis padded as `pad` does, placed with `self.batches`."""
        index, count = self.share
        x, y = self.data.train_batches(host_keys, int(first), steps, self.batch_size, index,
                                       count)
        extra = self.padded_size - self.stack_size
        if extra:
            x, y = (np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) for a in (x, y))
        return (place_share(x, self.batches, 2, index, count),
                place_share(y, self.batches, 2, index, count))

    def evaluate(self, network: Network) -> dict[str, np.ndarray]:
        """Validation and test loss and accuracy of every (unpadded) member."""
        if self.streamed:
            return self._evaluate_streamed(network)
        metrics = to_host(self._eval(*network, self.eval_data))
        return {name: value[: self.stack_size] for name, value in metrics.items()}

    def _evaluate_streamed(self, network: Network) -> dict[str, np.ndarray]:
        """`evaluate` on a streamed dataset: each split's batches through the compiled
        per-batch program, its (loss, correct) sums accumulated here, divided by the split's
        size (as `batched_metrics`: weighted means, the padding weighted 0). A batch is
        decoded while the device evaluates the one before."""
        index, count = self.share
        per_process = self.shape.data // count  # the `data` devices of this process
        local = max(min(self.eval_batch_size, -(-self.data.split_size(split) // count) * count)
                    // count for split in SPLITS)
        local = -(-local // per_process) * per_process  # one shape for every batch and split
        metrics = {}
        for split in SPLITS:
            totals, pending = np.zeros((2, self.padded_size)), None
            for batch in self.data.eval_batches(split, self.eval_batch_size, index, count):
                placed = (place_share(padded_to(a, local), self.eval_batches, 0, index, count)
                          for a in batch)
                sums = self._eval(*network, *placed)
                if pending is not None:
                    totals += np.asarray(to_host(pending), np.float64)
                pending = sums
            totals += np.asarray(to_host(pending), np.float64)
            loss, correct = (totals / self.data.split_size(split)).astype(np.float32)
            metrics[f"{split}_loss"] = loss[: self.stack_size]
            metrics[f"{split}_accuracy"] = correct[: self.stack_size]
        return metrics


SPLITS = ("val", "test")


def padded_to(a: np.ndarray, size: int) -> np.ndarray:
    """`a` padded with zeros (weight 0 for a weight vector) along its first axis to `size`."""
    return np.concatenate([a, np.zeros((size - len(a), *a.shape[1:]), a.dtype)])


def batch_share(mesh) -> tuple[int, int]:
    """(index, count): this process's devices hold part `index` of a batch split over the
    mesh's `data` axis in `count` equal, contiguous parts (one part: every process holds the
    whole batch, its devices spanning `data`). The mesh puts a process's devices side by
    side on `data` (`lottery.mesh.make_mesh`)."""
    me = jax.process_index()
    columns = sorted({column for (_, column), device in np.ndenumerate(mesh.devices)
                      if device.process_index == me})
    if columns != list(range(columns[0], columns[0] + len(columns))):
        raise ValueError(f"process {me}'s devices are not side by side on the mesh's data axis")
    return columns[0] // len(columns), mesh.devices.shape[1] // len(columns)


def place_share(local: np.ndarray, sharding, axis: int, index: int, count: int):
    """This process's part `index` of `count` along `axis` (`batch_share`) of a global array,
    placed with `sharding`: each process puts the shards of its own devices, which lie in
    its part."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    shape = list(local.shape)
    shape[axis] *= count
    low = index * local.shape[axis]

    def part(where):
        where = list(where)
        s = where[axis]
        where[axis] = slice((s.start or 0) - low,
                            (shape[axis] if s.stop is None else s.stop) - low)
        return local[tuple(where)]

    return jax.make_array_from_callback(tuple(shape), sharding, part)
