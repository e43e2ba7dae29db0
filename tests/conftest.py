"""Test environment and the runs shared between test modules.

The environment is set before JAX, W&B or lottery are imported: W&B disabled and its
folders in a temporary directory, the data cache an empty temporary directory (so MNIST is
never fetched by accident), two CPU devices (so the member stack is really sharded), and a
persistent XLA compilation cache shared by every run of the session (the same small
programs are compiled once instead of once per run), and the platform tuning as `lottery`
applies it (`lottery.platform.configure`: XLA's CPU matmuls, the CPU path's kernels and
member mode), so that tests calling the engine directly train as the command does. Set
`$JAX_COMPILATION_CACHE_DIR` yourself to keep that cache between sessions.

The suite runs in two pytest-xdist worker processes (pyproject's addopts: `-n 2 --dist
loadfile`, each test file whole on one worker, so a module fixture is made once). Every
process imports this file: each worker has its own temporary folder, W&B folders and data
cache, while the compilation cache is the controlling process's (it imports this file before
it starts the workers, which inherit its environment), so the workers share their compiled
programs; it is removed when the controlling process ends. A session fixture (`main_run`) is
made once in each worker whose files use it. `pytest -n 0` runs everything in one process.
"""

import http.server
import os
import shutil
import socket
import tempfile
import threading
from functools import partial
from pathlib import Path
from types import SimpleNamespace

_TMP = Path(tempfile.mkdtemp(prefix="lottery-tests-"))
for _name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
    os.environ[_name] = str(_TMP / "wandb" / _name.lower())
    os.makedirs(os.environ[_name], exist_ok=True)
os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_SILENT"] = "true"
os.environ["LOTTERY_DATA"] = str(_TMP / "data")
os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_TMP / "jax-cache"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import pytest  # noqa: E402

from lottery import platform  # noqa: E402

platform.configure()  # XLA's CPU matmuls and the CPU kernels as `lottery` trains

import helpers  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _TMP


@pytest.fixture(scope="session")
def main_run(tmp_path_factory):
    """The reference run: TINY config (3 branches x 2 replicates, 2 levels, 40 steps,
    evaluations at 0, 20, 40), with its trainer and level programs kept for inspection."""
    return helpers.spied_run(helpers.run_config(), tmp_path_factory.mktemp("main") / "run")


@pytest.fixture(scope="session")
def main_run_repeat(tmp_path_factory):
    """The same config run again in the same process, for determinism."""
    return helpers.spied_run(helpers.run_config(), tmp_path_factory.mktemp("repeat") / "run")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network but 127.0.0.1: a web server (files under `root`; a missing one answers
    404), a port nothing listens on (connection refused), no npm on $PATH, no proxy."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=root))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = closed.getsockname()[1]  # free again once closed: nothing listens there
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1")
    yield SimpleNamespace(root=root, served=f"http://127.0.0.1:{server.server_address[1]}/",
                          refused=f"http://127.0.0.1:{refused}/")
    server.shutdown()
    server.server_close()


def pytest_configure(config):
    # flax.nnx warns that nnx.State will become a plain dict (lottery/models/__init__.py calls
    # `nnx.split(...)[1].to_pure_dict()`); harmless here, and noisy in every test.
    config.addinivalue_line(
        "filterwarnings", "ignore:`flax.nnx.State` will be deprecated:DeprecationWarning")
