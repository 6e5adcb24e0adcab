"""Making local writes durable: the one copy of fsync helpers.

Backups (`callbacks.py`) and SavedModel versions (`export.py`) are written
to a temporary name and renamed, so a killed process never leaves a partly
written file in place. A kill needs nothing more (the kernel keeps the
writes), but a power cut does: file systems may put the rename on disk
before the data, and the rename itself only once its directory is flushed.
Remote paths (`gs://`, `s3://`) are skipped: a closed object is durable.
"""

import os


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
