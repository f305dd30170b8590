"""The reference: the bare kafka-python consumer reading the whole topic, doing nothing else.

    python bench/bare_consumer.py BOOTSTRAP TOPIC RECORDS [GROUP]

Prints one JSON line: the wall-clock time (epoch seconds) at which the last record arrived, and
the CPU seconds this process used. With GROUP it joins that consumer group as the bridge does
(same session and heartbeat settings), so both pay the broker's join delay; without, it
assigns itself the partitions. Same fetch settings as the bridge's client: large polls, C crc32c.
"""

from __future__ import annotations

import json
import resource
import sys
import time

from kafka import KafkaConsumer, TopicPartition


def main() -> None:
    bootstrap, topic, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
    group = sys.argv[4] if len(sys.argv) > 4 else None
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=20_000,
                             session_timeout_ms=6000, heartbeat_interval_ms=500,
                             max_partition_fetch_bytes=16 * 1024 * 1024, client_id="bench-bare")
    if group:
        consumer.subscribe([topic])
    else:
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
    done = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    consumer.close()
    print(json.dumps({"done": done, "cpu": usage.ru_utime + usage.ru_stime, "records": seen, "bytes": nbytes}))


if __name__ == "__main__":
    main()
