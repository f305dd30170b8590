"""Sample mixed-app log lines, for the demo, the tests and the benchmarks.

Every line carries a unique `seq`, so a reader can check that each was archived exactly once.
"""

from __future__ import annotations

import random
from typing import Iterator

import orjson

LEVELS = ("DEBUG", "INFO", "INFO", "INFO", "WARN", "ERROR")
WORDS = ("request", "served", "user", "cache", "miss", "hit", "order", "payment", "retry",
         "timeout", "upstream", "latency", "db", "query", "session", "token", "refresh")


def app_names(count: int) -> list[str]:
    return [f"app-{i:03d}" for i in range(count)]


def zipf_weights(count: int, s: float = 1.1) -> list[float]:
    return [1.0 / (rank ** s) for rank in range(1, count + 1)]


def lines(count: int, apps: list[str], start_ts: float, span_seconds: float, seed: int = 7,
          weights: list[float] | None = None, min_len: int = 150, max_len: int = 400) -> Iterator[tuple[str, bytes]]:
    """(app, JSON line) pairs: apps drawn by `weights`, ts spread over the span, 150-400 bytes."""
    rng = random.Random(seed)
    chosen = rng.choices(apps, weights=weights, k=count)
    for seq, app in enumerate(chosen):
        ts = start_ts + span_seconds * seq / max(count, 1)
        target = rng.randint(min_len, max_len)
        doc = {"app": app, "ts": round(ts, 3), "seq": seq, "level": rng.choice(LEVELS), "msg": ""}
        base = len(orjson.dumps(doc))
        words: list[str] = []
        size = base
        while size < target:
            word = rng.choice(WORDS)
            words.append(word)
            size += len(word) + 1
        doc["msg"] = " ".join(words)[: max(target - base, 0)]
        yield app, orjson.dumps(doc)


def produce(bootstrap: str, topic: str, values: Iterator[bytes] | list[bytes], key: bytes | None = None,
            partition: int | None = None) -> int:
    """Send values to Kafka (to one partition, if given) and wait until every one is acknowledged."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=512 * 1024,
                             acks="all", max_request_size=16 * 1024 * 1024)
    sent = 0
    for value in values:
        producer.send(topic, value=value, key=key, partition=partition)
        sent += 1
    producer.flush()
    producer.close()
    return sent
