"""One writer per run directory: `with exclusive(out_dir): ...` holds a lock on the directory.

The run directory is named by the config, so the same command started twice (a sweep
relaunched while its first launch still runs, a SLURM requeue while the old task is alive,
two terminals) would write one record from two processes. A run therefore holds an
exclusive lock on `<out_dir>/.lock` for as long as it writes, and a second process for the
same directory stops at once with one line naming the holder (host, pid, since when).

The lock is a POSIX record lock (`fcntl.lockf`, i.e. F_SETLK), because
- the kernel owns it for the process and releases it when the process ends, however it
  ends (SIGKILL, the OOM killer, a pre-empted job): a killed run never leaves a stale lock
  that someone must find and delete, and nothing has to guess whether a holder is alive;
- record locks are what NFS (NLM for v3, built into v4) and Lustre (mounted with `flock`)
  carry between hosts, so two nodes of a cluster see each other's lock.
An O_EXCL lock file survives the process that made it (every killed run would leave one
behind, blocking its own resume), and a PID file means nothing on another host and names a
reused pid after a crash. The lock file is never deleted (deleting it would let two
processes lock two different files of the same name); it says who holds, or last held, it.

A POSIX lock belongs to the process, not the file descriptor: closing any descriptor of the
file releases it. So the file is opened once, read and written through that descriptor, and
a second `exclusive()` on a directory this process already holds is refused too.
"""

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from lottery.config import ConfigError

LOCK_NAME = ".lock"
_held: set[tuple[int, str]] = set()  # (pid, lock file) held by this process


@contextmanager
def exclusive(out_dir: Path, warn=print):
    """Hold `out_dir`'s lock for the block; `ConfigError` at once if another process holds
    it. Where the filesystem takes no locks at all, `warn` says so and the block runs
    unlocked (refusing every run there would be worse than the race it guards against)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = os.path.realpath(out_dir / LOCK_NAME)
    if (os.getpid(), path) in _held:
        raise ConfigError(f"{out_dir} is already in use by this process (pid {os.getpid()})")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):
                raise ConfigError(_refusal(out_dir, fd)) from None
            if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            warn(f"lottery: warning: cannot lock {path} ({error.strerror}): nothing stops a "
                 "second process from writing this run directory at the same time")
            yield
            return
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        _held.add((os.getpid(), path))
        try:
            yield
        finally:
            _held.discard((os.getpid(), path))
    finally:
        os.close(fd)  # releases the lock


def _refusal(out_dir: Path, fd: int) -> str:
    """The one line for a directory locked by another process: who holds it, what to do."""
    for _ in range(20):  # the holder writes its name just after locking: wait that moment
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
            who = f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
            break
        except (ValueError, TypeError, KeyError):
            time.sleep(0.05)
    else:
        who = f"unknown: {os.path.realpath(out_dir / LOCK_NAME)} does not say"
    return (f"{out_dir} is in use by another run ({who}): wait for it to finish, or stop "
            "that process; in a sweep, rerun later: finished runs are skipped")


def discard(out_dir: Path, made: tuple[str, ...]) -> bool:
    """Remove `out_dir` where it holds nothing but what starting a run put there: `made`
    (Hydra's `.hydra/` and job log) and a lock file no process holds; then its parents
    left empty, up to the working directory. A refused run (or `lottery check`) so leaves
    nothing behind, while a directory holding anything else (a run's record, a run that
    holds the lock, files of the user's) is left as it is. True where it was removed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or any(p.name not in {*made, LOCK_NAME} for p in out_dir.iterdir()):
        return False
    lock = out_dir / LOCK_NAME
    if (os.getpid(), os.path.realpath(lock)) in _held:
        return False  # this process's run (and closing a descriptor would unlock it)
    fd = os.open(lock, os.O_RDWR) if lock.exists() else None
    try:
        if fd is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EACCES, errno.EAGAIN):
                    return False  # another process's run is starting here
        for path in out_dir.iterdir():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    finally:
        if fd is not None:
            os.close(fd)
    cwd, parent = Path.cwd().resolve(), out_dir.resolve().parent
    try:
        if out_dir.resolve() != cwd:  # `hydra.run.dir=.`: the files go, the directory stays
            out_dir.rmdir()
        while cwd in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    except OSError:  # another run made something there meanwhile: it stays
        pass
    return True
