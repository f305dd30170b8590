"""Archive every sealed file from one process, one app-hour (and tail hour) after the other.

The workers fan the same work out as one `upload_app_hour` task per app-hour and one
`archive_tail` task per hour of tail files (tasks.upload); this serial form is for tests and the
benchmark's reference.
"""

from __future__ import annotations

import logging
from typing import Callable

from sluice.archive.tail import TailArchiver
from sluice.archive.uploader import Uploader, by_app_hour
from sluice.core import schema
from sluice.core.errors import UploadFailed
from sluice.slots.sealed import SealedRegistry

log = logging.getLogger(__name__)


def upload_sealed(uploader: Uploader, on_progress: Callable[[], object] = lambda: None) -> int:
    """Archive every sealed file; returns how many this call uploaded. A failure (store down, a
    damaged file) is logged and the others go on; UploadFailed at the end makes it visible."""
    archived, failed = 0, 0
    tails = TailArchiver(uploader.r, uploader.settings, uploader.store)
    for (app, hour), files in by_app_hour(SealedRegistry(uploader.r).sealed_files()).items():
        try:
            if app == schema.TAIL_APP:
                archived += tails.archive_hour(hour, files)
            else:
                archived += uploader.archive_app_hour(files)
        except UploadFailed as exc:
            failed += 1
            log.error("%s", exc)
        on_progress()
    if failed:
        raise UploadFailed(f"{failed} app-hours not wholly archived yet")
    return archived
