"""Making local writes durable: the one copy of fsync helpers.

Backups (`callbacks.py`) and SavedModel versions (`export.py`) are written
to a temporary name and renamed, so a killed process never leaves a partly
written file in place. A kill needs nothing more (the kernel keeps the
writes), but a power cut does: file systems may put the rename on disk
before the data, and the rename itself only once its directory is flushed.
Remote paths (`gs://`, `s3://`) are skipped: a closed object is durable.
"""

import contextlib
import errno
import os
import tempfile


def is_local(path):
    return "://" not in str(path)


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path):
    """Makes a local directory's entries (e.g. a rename into it) durable."""
    if not is_local(path) or not hasattr(os, "O_DIRECTORY"):
        return  # Windows cannot open a directory; NTFS journals renames.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path):
    """Flushes every file and directory under a local `path`."""
    if not is_local(path):
        return
    for root, _, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


@contextlib.contextmanager
def atomic_write(path, tmp_path=None):
    """Yields a temporary path to write; moves it onto `path` once written.

    The file appears at `path` complete or not at all: the block writes the
    temporary file, which is then flushed to disk and renamed over `path`.
    If the block raises, the temporary file is removed and `path` is left as
    it was; a full disk is then reported as an `OSError` (`ENOSPC`) saying
    "no space left on <directory>", whatever words the writer used. The rename is made durable by `fsync_dir` on the directory, which
    is left to the caller (one flush can cover several files).

    Args:
        path: The local file to write.
        tmp_path: Where to write first, in the same directory. Defaults to a
            new unique name there (so that concurrent writers never share a
            temporary file), with `path`'s extension (for writers that
            append one otherwise, such as NumPy's).

    Yields:
        The path the block must write.
    """
    directory, name = os.path.split(path)
    if tmp_path is None:
        fd, tmp_path = tempfile.mkstemp(
            prefix=".tmp-", suffix=os.path.splitext(name)[1], dir=directory or "."
        )
        os.close(fd)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as error:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if is_no_space(error):
            raise no_space_error(path, directory or ".") from error
        raise


def is_no_space(error):
    """Whether `error` says the disk is full, in any of the words writers use.

    h5py, for one, reports a full disk as "Can't close file" with the errno
    in its message only.
    """
    if getattr(error, "errno", None) == errno.ENOSPC:
        return True
    text = str(error)
    return "No space left on device" in text or "errno = 28," in text


def no_space_error(path, directory):
    """The `OSError` for a write of `path` that found its disk full.

    The writer's own words are left to the chained exception: they may name
    the temporary file rather than `path`.
    """
    return OSError(
        errno.ENOSPC,
        f"Could not write {path}: no space left on {directory}. The file "
        "is as it was before the write (its temporary copy was removed); "
        "free some space and try again.",
    )
