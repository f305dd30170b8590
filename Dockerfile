# One image for every sluice role; docker-compose.yml picks the command. Only the runtime is
# installed (pyproject.toml's dependencies): no test, benchmark or local-broker packages.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends zstd \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml .
COPY sluice sluice
COPY tasks tasks
COPY bridge bridge
COPY beat_schedule.py .
RUN pip install --no-cache-dir .
ENV SLUICE_SPOOL_DIR=/spool SLUICE_STORE_URL=file:///archive
