"""Atomic file writes: a reader sees the old file or the new one, never part of one.

The bytes go to a temporary file in the destination's folder (so the final rename stays
within one file system, where os.replace is atomic), are flushed and fsynced (else a power
cut can leave a complete-looking name over an empty file), and are renamed onto the
destination. The temporary file is created with mode 0666 reduced by the umask, as open()
would, not mkstemp's 0600, which would survive the rename and hide the file from others.
"""

import os
import uuid
from typing import Callable, Union

__all__ = ["write_atomically", "write_with"]


def write_with(path: Union[str, os.PathLike], write: Callable) -> None:
    """Create `path` atomically from `write(binary_file)`."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".tmp-{name}.{uuid.uuid4().hex[:12]}")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_atomically(path: Union[str, os.PathLike], payload: Union[bytes, str]) -> None:
    """Write `payload` (str: as UTF-8) to `path` atomically."""
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    write_with(path, lambda file: file.write(data))
