"""Run Debian's kcat, the independent Kafka client, against the test broker.

Debian 12's kcat links librdkafka 2.0.2, which fails to parse the ApiVersions v3 reply of
Tansu ("Read underflow"); newer librdkafka reads it fine. So the same kcat binary is run with
the librdkafka that the confluent-kafka wheel bundles, found first on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import confluent_kafka


def kcat_env(workdir: Path) -> dict[str, str]:
    libs = Path(confluent_kafka.__file__).resolve().parent.parent / "confluent_kafka.libs"
    bundled = next(libs.glob("librdkafka-*.so.1"))
    libdir = workdir / "librdkafka"
    libdir.mkdir(parents=True, exist_ok=True)
    link = libdir / "librdkafka.so.1"
    if not link.exists():
        link.symlink_to(bundled)
    return {**os.environ, "LD_LIBRARY_PATH": str(libdir)}


def kcat(workdir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    binary = shutil.which("kcat")
    if binary is None:
        raise RuntimeError("kcat is not installed (Debian: apt-get install kcat)")
    return subprocess.run([binary, *args], env=kcat_env(workdir), check=True,
                          capture_output=True, timeout=timeout)
