FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 BATCHGATE_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY workers ./workers
COPY shared ./shared
COPY simulator ./simulator
COPY cli ./cli
RUN pip install --no-cache-dir ".[monitoring]" \
    && useradd --create-home --uid 10001 batchgate \
    && mkdir -p /data && chown batchgate /data
USER batchgate
EXPOSE 8000
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
