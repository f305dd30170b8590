"""`python -m bridge`: run one bridge until SIGTERM/SIGINT, then flush and commit."""

from __future__ import annotations

import gc
import logging
import signal
import threading

from bridge.consumer import Bridge
from sluice.settings import get_settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Everything imported so far lives as long as the process: out of the cyclic collector's
    # sight, its full collections no longer walk it.
    gc.freeze()
    Bridge(get_settings()).run(stop)


if __name__ == "__main__":
    main()
