"""Move sealed slot files to the object store: upload, verify, then delete the local copy.

Object names come from the slot file id recorded in Redis, so an upload repeated after a
crash overwrites the same object instead of adding a second copy.
"""

from __future__ import annotations

import logging

from sluice.slots import Slots
from sluice.store import Store, object_key

log = logging.getLogger(__name__)


def upload_sealed(slots: Slots, store: Store) -> int:
    """Upload every sealed file; returns how many were archived by this call."""
    archived = 0
    for sealed in slots.sealed_files():
        key = object_key(sealed.app, sealed.hour, sealed.fid)
        path = slots.spool.finish_seal(sealed)  # completes a seal interrupted before its rename
        if path.exists():
            if path.stat().st_size != sealed.size:
                log.error("%s has %d bytes, %d committed; left for an operator",
                          path, path.stat().st_size, sealed.size)
                continue
            store.put(path, key)
            path.unlink()
            _remove_empty_dirs(path)
            archived += 1
        elif store.size(key) != sealed.size:
            log.error("sealed file %s is neither in the spool nor in the store", key)
            continue
        slots.forget_sealed(sealed)  # last: until here a crash just repeats the upload
        log.info("archived %s (%d bytes)", key, sealed.size)
    return archived


def _remove_empty_dirs(path) -> None:
    for parent in (path.parent, path.parent.parent):
        try:
            parent.rmdir()
        except OSError:
            return
