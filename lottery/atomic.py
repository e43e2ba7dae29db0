"""Files that are whole or absent, and their checksums.

`write_atomically` writes into `<name>.tmp`, flushes it to disk and renames it into place,
so a process killed mid-write leaves the old file (or none), never a part of the new one; a
write that raises leaves no temporary file behind. `sha256` proves a file whole when it is
read back. The run folder (`lottery.record`), the checkpoints (`lottery.checkpoint`) and the
data cache (`lottery.data`) all write through here.
"""

import hashlib
import os
from pathlib import Path


def write_atomically(path, write) -> None:
    """`write(file)` (a binary file object) into `path.tmp`, flushed to disk, then renamed to
    `path`. If `write` raises, `path` is untouched and the temporary file removed."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def sha256(path) -> str:
    """The hex sha256 of the file at `path`, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
