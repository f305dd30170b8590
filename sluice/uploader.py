"""Move sealed slot files to the object store: upload, verify, then delete the local copy.

Object names come from the slot file id recorded in Redis, so an upload repeated after a
crash overwrites the same object instead of adding a second copy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from sluice.slots import SealedFile, Slots
from sluice.store import Store, object_key

log = logging.getLogger(__name__)


class UploadFailed(IOError):
    """Some sealed files could not be archived; they stay sealed for the next sweep."""


def upload_sealed(slots: Slots, store: Store, on_progress: Callable[[], object] = lambda: None) -> int:
    """Archive every sealed file; returns how many this call uploaded.

    A failure (store down, a damaged file) is logged and the sweep goes on with the other
    files; UploadFailed at the end makes the failure visible in Celery and Flower.
    """
    archived, failed = 0, []
    for sealed in slots.sealed_files():
        try:
            archived += _archive(slots, store, sealed)
        except Exception as exc:  # noqa: BLE001 - one failure must not hold back the rest
            log.error("archiving %s failed, will retry: %s", sealed.entry, exc)
            failed.append(sealed.entry)
        on_progress()
    if failed:
        raise UploadFailed(f"{len(failed)} sealed files not archived yet, e.g. {failed[0]}")
    return archived


def _archive(slots: Slots, store: Store, sealed: SealedFile) -> int:
    key = object_key(sealed.app, sealed.hour, sealed.fid)
    path = slots.spool.finish_seal(sealed)  # completes a seal interrupted before its rename
    uploaded = 0
    if path.exists():
        on_disk = path.stat().st_size
        if on_disk != sealed.size:
            raise IOError(f"{path} has {on_disk} bytes, {sealed.size} were committed")
        store.put(path, key)
        path.unlink()
        _remove_empty_dirs(path)
        uploaded = 1
    elif store.size(key) != sealed.size:
        raise IOError(f"{key} is neither in the spool nor complete in the store")
    slots.forget_sealed(sealed)  # last: until here a crash just repeats the upload
    log.info("archived %s (%d bytes)", key, sealed.size)
    return uploaded


def _remove_empty_dirs(path: Path) -> None:
    for parent in (path.parent, path.parent.parent):
        try:
            parent.rmdir()
        except OSError:
            return
