"""Kafka to Redis and the spool: record batches handed over exactly once (marks, claim checks),
the batch state machine, and the split of a batch into app-hour pieces."""
