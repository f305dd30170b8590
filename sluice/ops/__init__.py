"""Operating the pipeline: health files, the Celery queues as kombu lays them out, the figures
from Redis and Kafka, `sluice status` and `sluice ledger`."""
