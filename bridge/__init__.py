"""The bridge: a thin Kafka consumer-group member that hands batches over to Celery."""
