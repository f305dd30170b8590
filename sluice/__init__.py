"""sluice: split mixed application logs from Kafka by app, compress, archive to object storage."""
