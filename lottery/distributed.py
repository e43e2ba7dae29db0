"""A run of several processes (hosts, or one process per GPU) on JAX's own distributed
runtime: started the same way N times, it is one run with one record.

`initialize()` joins the processes into one JAX run before the backend starts, when the run
has several: under SLURM (a job step of several tasks: JAX's own cluster detection), or
where `$LOTTERY_COORDINATOR` (host:port of process 0), `$LOTTERY_NUM_PROCESSES` and
`$LOTTERY_PROCESS_ID` are set (a local test, or any launcher: the same command started N
times with those three set is one run). Every process then sees every device (`jax.devices`)
and runs the same programs; the mesh spans them all (`lottery.mesh`).

Every process computes; only process 0 (`writes()`) writes the run folder: the record,
level files, checkpoints, W&B and the terminal's lines. Arrays go to the host through
`to_host`, a collective every process calls; host arrays go to the devices through
`to_devices`, each process placing its own shards. A process that dies or fails ends the run: the
others stop within `HEARTBEAT` seconds (the coordinator's heartbeat; `stopping_together`),
and a rerun of the same command resumes from the last checkpoint, as a one-process run does.
"""

import os
import sys
import traceback
from contextlib import contextmanager, nullcontext, redirect_stdout

import jax
import numpy as np
from jax.experimental import multihost_utils

ENV = ("LOTTERY_COORDINATOR", "LOTTERY_NUM_PROCESSES", "LOTTERY_PROCESS_ID")
HEARTBEAT = 30  # seconds without a heartbeat before a process counts as dead
JOIN = 300  # seconds the processes wait for each other at the start


class DistributedError(RuntimeError):
    """A distributed run that cannot start or go on; the message says which process and why."""


def _from_environment() -> dict | None:
    """The coordinator, process count and id from `$LOTTERY_*`, or None where unset."""
    given = [name for name in ENV if os.environ.get(name)]
    if not given:
        return None
    if len(given) < len(ENV):
        missing = ", ".join(f"${name}" for name in ENV if name not in given)
        raise DistributedError(f"{', '.join('$' + n for n in given)} set but not {missing}: a "
                               "several-process run needs all three")
    try:
        count, index = int(os.environ[ENV[1]]), int(os.environ[ENV[2]])
    except ValueError:
        raise DistributedError(f"${ENV[1]} and ${ENV[2]} must be integers") from None
    if not 0 <= index < count:
        raise DistributedError(f"${ENV[2]}={index} must be in [0, {count})")
    return {"coordinator_address": os.environ[ENV[0]], "num_processes": count,
            "process_id": index}


def _under_slurm() -> bool:
    """A SLURM job step of several tasks (`srun`, as submitit starts a job's tasks), each
    task one process of the run; not a shell inside an allocation (`salloc`), which starts
    no step."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def initialize() -> bool:
    """Join the run's processes (see the module's docstring); must run before JAX's backend
    starts. Returns whether the run has several processes."""
    if jax.distributed.is_initialized():  # the entry point joined already (`lottery.cli`)
        return True
    explicit = _from_environment()
    if explicit is None and not _under_slurm():
        return False
    # CPU processes reduce across each other through gloo (the default has no such path)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**(explicit or {}), initialization_timeout=JOIN,
                                   heartbeat_timeout_seconds=HEARTBEAT,
                                   shutdown_timeout_seconds=HEARTBEAT)
    except Exception as error:  # noqa: BLE001  the runtime's errors have no common type
        where = explicit["coordinator_address"] if explicit else "SLURM's first node"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DistributedError(f"could not join the run's processes through the coordinator "
                               f"at {where} within {JOIN} s: {first}") from None
    return True


def writes() -> bool:
    """Whether this process writes the run folder (process 0 alone)."""
    return jax.process_index() == 0


def voiced():
    """A block whose standard output only process 0 shows (the data's, the run's lines);
    errors still go to every process's stderr."""
    return nullcontext() if writes() else redirect_stdout(open(os.devnull, "w"))


def to_host(tree):
    """`tree`'s arrays as numpy arrays of their global values, on every process (a
    collective where an array spans several processes: every process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def to_devices(tree, sharding):
    """`tree`'s host arrays (the same on every process) placed with `sharding`: each process
    puts the shards of its own devices."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(value):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree)


def barrier(name: str) -> None:
    """Wait here until every process reaches the same `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _gone() -> list[int]:
    """The processes the coordinator no longer hears from (it waits up to `HEARTBEAT` s to
    tell); every other one where the coordinator itself (process 0) is gone."""
    from jax._src import distributed as runtime  # the client has no public handle

    everyone = list(range(jax.process_count()))
    try:
        live = runtime.global_state.client.get_live_nodes(everyone)
    except Exception:  # noqa: BLE001  the coordinator's process is gone
        return [0]
    return [index for index in everyone if index not in live]


@contextmanager
def stopping_together(program: str):
    """In a run of several processes, an error ends every process promptly, each with one
    line on stderr: an error of this process's own (its traceback first) says that this
    process failed; a runtime error (a peer that died mid-collective) names the processes
    that stopped. Either way this process exits at once with status 1, rather than waiting
    at the runtime's shutdown for peers that will never come, or keeping its peers waiting
    in a collective while it shuts down. A one-process run's errors pass through."""
    try:
        yield
    except Exception as error:
        if jax.process_count() == 1:
            raise
        if not isinstance(error, jax.errors.JaxRuntimeError):
            traceback.print_exc()
            print(f"{program}: error: process {jax.process_index()} of the run's "
                  f"{jax.process_count()} failed ({type(error).__name__}: "
                  f"{(str(error).strip().splitlines() or [''])[0][:200]}); the others stop "
                  f"within {HEARTBEAT} s", file=sys.stderr, flush=True)
            os._exit(1)
        gone = [index for index in _gone() if index != jax.process_index()]
        who = (f"process{'es' if len(gone) > 1 else ''} {', '.join(map(str, gone))}"
               if gone else "another process")
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"{program}: error: {who} of the run's {jax.process_count()} stopped, so "
              f"process {jax.process_index()} stops too ({first[:200]}); run the same command "
              "on every process again to resume from the last checkpoint", file=sys.stderr,
              flush=True)
        os._exit(1)
