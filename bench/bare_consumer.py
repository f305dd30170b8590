"""The reference: the bare kafka-python consumer reading the whole topic, doing nothing else.

    python bench/bare_consumer.py BOOTSTRAP TOPIC RECORDS

Prints one JSON line: wall seconds from start to the last record, and the CPU seconds this
process used. Same client settings as the bridge: large polls, C crc32c.
"""

from __future__ import annotations

import json
import resource
import sys
import time

from kafka import KafkaConsumer, TopicPartition


def main() -> None:
    bootstrap, topic, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
    start = time.perf_counter()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=20_000,
                             max_partition_fetch_bytes=4 * 1024 * 1024, client_id="bench-bare")
    partitions = consumer.partitions_for_topic(topic)
    while not partitions:
        time.sleep(0.05)
        partitions = consumer.partitions_for_topic(topic)
    consumer.assign([TopicPartition(topic, p) for p in partitions])
    seen = nbytes = 0
    while seen < expected:
        for messages in consumer.poll(timeout_ms=500, max_records=20_000).values():
            seen += len(messages)
            nbytes += sum(len(m.value) for m in messages)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    consumer.close()
    print(json.dumps({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "records": seen, "bytes": nbytes}))


if __name__ == "__main__":
    main()
