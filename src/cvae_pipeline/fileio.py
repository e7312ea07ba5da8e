"""Atomic file writes: a reader sees the old file or the new one, never half of one. A write that runs out of space
(a full disk, a quota, a file-size limit) stops the stage in one line naming the file, the previous one kept."""

import contextlib
import errno
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cvae_pipeline.errors import DiskFullError

# How the system says that a write found no room: no space on the device, a quota exceeded, a file-size limit.
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

# What reading a truncated or corrupt file (a zip archive, .npz or .keras, compressed or not) raises.
DAMAGED_FILE_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`, else delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name ends like the target's, for writers that check the suffix (Keras' `.keras`).
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary_path, 0o666 & ~umask)  # mkstemp's 0600 would leak into the final file
    try:
        yield temporary_path
        with open(temporary_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary_path, target)
    except Exception as error:
        no_room = _no_room(error)
        if no_room is None:
            raise
        kept = f"the previous {target.name} is kept as it was" if target.exists() else "nothing was written"
        raise DiskFullError(f"{target}: cannot be written ({os.strerror(no_room.errno)}); {kept}. Free some space "
                            "(or raise the limit) and run the stage again") from None
    finally:
        temporary_path.unlink(missing_ok=True)


def _no_room(error: BaseException | None) -> OSError | None:
    """The OSError saying there was no room, in `error` or what caused it (writers such as Keras wrap it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_ROOM:
            return error
        error = error.__cause__ or error.__context__
    return None


def remove_leftover_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files that writes of `path` left behind when their process was killed (kill -9)."""
    target = Path(path)
    leftovers = list(target.parent.glob(f".{target.name}.*.tmp{target.suffix}")) if target.parent.is_dir() else []
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return leftovers


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
