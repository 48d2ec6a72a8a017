"""Files on a local disk or in Google Cloud Storage (gs://), through one small API.

A run's workdir, a records folder and a report root may each be a local path
or a URL such as gs://bucket/folder. A local path goes through os and open()
exactly as before; a URL goes through tf.io.gfile, TensorFlow's file system,
which is also what reads the TFRecords (tf.data), writes the TensorBoard
summaries (clu's metric writers) and, through etils.epath, Orbax's checkpoint
files: one client and one set of credentials for all of a run's files.
TensorFlow is imported only when a URL is used, so the report and the sweep
launcher read local folders without it.

Credentials are Google's usual ones (GOOGLE_APPLICATION_CREDENTIALS, `gcloud
auth application-default login`, or a GCE / Cloud TPU VM's service account);
a failure to reach the bucket is a `StorageError` naming the path and the fix.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
from collections.abc import Iterator
from typing import Any

CREDENTIALS_HINT = (
    "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file or run `gcloud auth "
    "application-default login` (a GCE or Cloud TPU VM uses its service account), and check "
    "the network and the bucket name"
)


class StorageError(OSError, ValueError):
    """Cloud storage could not be reached or refused access.

    An OSError, and a ValueError so that every command line reports it as it
    reports a bad argument: the message names the path and what to set.
    """


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://bucket/...) rather than a local path."""
    return "://" in os.fspath(path)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _explain(path: str, error: Exception) -> OSError:
    """The OSError to raise for a tf.errors.OpError about `path`."""
    import tensorflow as tf

    detail = (error.message if isinstance(error, tf.errors.OpError) else str(error)).strip()
    detail = detail.splitlines()[0] if detail else type(error).__name__
    if isinstance(error, tf.errors.NotFoundError):
        return FileNotFoundError(errno.ENOENT, f"{path} not found ({detail})", path)
    if isinstance(error, tf.errors.PermissionDeniedError | tf.errors.UnauthenticatedError):
        return StorageError(
            f"{path}: Google Cloud Storage refused access ({detail}); {CREDENTIALS_HINT}"
        )
    if "libcurl" in detail or "retry attempts" in detail or "authentication" in detail:
        return StorageError(
            f"{path}: cannot reach Google Cloud Storage ({detail}); {CREDENTIALS_HINT}"
        )
    return StorageError(f"{path}: {detail}")


@contextlib.contextmanager
def _remote(path: str) -> Iterator[None]:
    """Turns TensorFlow's file-system errors about `path` into `_explain`'s OSErrors."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as e:
        raise _explain(path, e) from e


def exists(path: str) -> bool:
    """os.path.exists for local paths and URLs."""
    if not is_url(path):
        return os.path.exists(path)
    with _remote(path):
        return _gfile().exists(path)


def isdir(path: str) -> bool:
    """os.path.isdir; for a URL, whether objects exist under `path`/ (or the bucket exists)."""
    if not is_url(path):
        return os.path.isdir(path)
    with _remote(path):
        gfile = _gfile()
        # gfile.isdir answers False to any error; gfile.exists raises all but "not found".
        return gfile.exists(path) and gfile.isdir(path)


def isfile(path: str) -> bool:
    """os.path.isfile; for a URL, whether `path` is an object."""
    if not is_url(path):
        return os.path.isfile(path)
    with _remote(path):
        gfile = _gfile()
        return gfile.exists(path) and not gfile.isdir(path)


def makedirs(path: str) -> None:
    """os.makedirs(path, exist_ok=True); a no-op in effect on object stores."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    with _remote(path):
        _gfile().makedirs(path)


def listdir(path: str) -> list[str]:
    """The names in a folder (a URL's sub-folders without their trailing '/')."""
    if not is_url(path):
        return os.listdir(path)
    with _remote(path):
        return [name.rstrip("/") for name in _gfile().listdir(path)]


def glob(pattern: str) -> list[str]:
    """Paths matching a glob pattern (glob.glob for local ones), unsorted."""
    if not is_url(pattern):
        import glob as glob_lib

        return glob_lib.glob(pattern)
    with _remote(pattern):
        return list(_gfile().glob(pattern))


def stat(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a file."""
    if not is_url(path):
        info = os.stat(path)
        return info.st_size, info.st_mtime_ns
    with _remote(path):
        info = _gfile().stat(path)
    return int(info.length), int(info.mtime_nsec)


def open(path: str, mode: str = "r", **kwargs) -> Any:  # fs.open, like os.open
    """builtins.open for a local path; tf.io.gfile.GFile for a URL.

    A URL opened for reading must exist (FileNotFoundError otherwise, a
    StorageError when the storage cannot be reached). GFile reads and writes
    UTF-8 text without newline translation, so `encoding` and `newline` are
    ignored for URLs. A GFile written to GCS uploads when it is closed, whole
    or not at all.
    """
    if not is_url(path):
        return builtins.open(path, mode, **kwargs)
    if "r" in mode:
        with _remote(path):
            if not _gfile().exists(path):
                raise FileNotFoundError(errno.ENOENT, f"{path} not found", path)
    return _gfile().GFile(path, mode)


def read_bytes(path: str) -> bytes:
    """A whole file's bytes."""
    with open(path, "rb") as f, _remote_if_url(path):
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` in one go (on GCS, one upload: the object appears whole)."""
    with _remote_if_url(path), open(path, "wb") as f:
        f.write(data)


def _remote_if_url(path: str):
    return _remote(path) if is_url(path) else contextlib.nullcontext()
