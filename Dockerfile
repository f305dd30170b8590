# One image for every sluice role; docker-compose.yml picks the command.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends zstd \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN pip install --no-cache-dir --no-deps -e .
ENV SLUICE_SPOOL_DIR=/spool SLUICE_STORE_URL=file:///archive
