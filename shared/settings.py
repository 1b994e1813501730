"""Runtime settings, read from environment variables prefixed ``BATCHGATE_``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_API_KEY = "sk-batchgate-dev"
DEV_TENANT = "dev"
# The largest upstream answer body kept, per provider: chat, completion, response and moderation answers fit with room
# to spare, and so does an image or two; embeddings of more than 256 inputs per request (1536 dimensions as floats)
# do not (README "Upstream answer sizes"). With 64 senders a worker holds at most 512 MiB of answers.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATCHGATE_", extra="ignore")

    # Where state lives.
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = Field(default=None, description="Celery broker; defaults to redis_url")
    result_backend_url: str | None = Field(default=None, description="Celery results; defaults to redis_url")
    data_dir: Path = Path("./data")
    redis_timeout_s: float = Field(default=2.0, gt=0, description="the API's Redis connect and reply timeout: how "
                                   "long a request waits on a frozen Redis before it answers 503")
    storage_retry_after_s: int = Field(default=2, ge=1, le=120, description="Retry-After sent with a 503 while "
                                       "Redis is unavailable (the SDKs wait this long, up to 120 s, then retry)")

    # Blob storage: a local directory (one host, or a volume every host mounts) or an S3-compatible bucket.
    blob_backend: str = Field(default="local", description="local or s3")
    s3_bucket: str = "batchgate"
    s3_prefix: str = Field(default="", description="key prefix inside the bucket")
    s3_endpoint_url: str | None = Field(default=None, description="for MinIO, Ceph, R2, moto...; unset for AWS")
    s3_region: str | None = None
    s3_access_key_id: str | None = Field(default=None, description="unset: boto3's usual credential chain")
    s3_secret_access_key: SecretStr | None = None
    s3_part_size_mb: int = Field(default=8, ge=5, description="multipart part size; S3's minimum is 5")

    # Logs.
    log_format: str = Field(default="json", description="json or text")
    log_level: str = "INFO"
    access_log: bool = Field(default=True, description="one INFO line per HTTP request (batchgate dev: off)")

    # Who may call.
    dev_mode: bool = False
    api_keys: str = Field(default="", description="comma-separated key=tenant pairs; a key may be 'sha256:<hex>'")
    admin_api_key: SecretStr | None = Field(default=None, description="the operator's key for /admin routes")
    metrics_token: SecretStr | None = Field(default=None, description="a Bearer token for GET /metrics only (the "
                                            "admin key works too); /metrics is open only in dev mode without keys")

    # Files.
    max_upload_bytes: int = 512 * 1024 * 1024
    body_read_timeout_s: float = 30.0
    upload_deadline_s: float = Field(default=600.0, gt=0, description="a request body must arrive whole within "
                                     "this, however steadily it drips (else 408)")
    header_timeout_s: float = Field(default=10.0, gt=0, description="a connection must send a request's headers "
                                    "within this of opening or of its previous response (else it is closed)")
    batch_file_default_ttl_s: int = 30 * 86400

    # Batches.
    completion_window_s: int = 86400
    max_batch_lines: int = 50_000
    max_batch_input_bytes: int = 200 * 1024 * 1024
    max_line_bytes: int = Field(default=8 * 1024 * 1024, description="the largest one request line may be")
    output_default_ttl_s: int = 30 * 86400

    # Execution.
    providers_file: Path | None = None
    upstream_base_url: str = "http://127.0.0.1:8001/v1"
    upstream_api_key: str = ""
    upstream_max_concurrency: int = 64
    upstream_timeout_s: float = 120.0
    upstream_max_retries: int = 5
    upstream_rpm: int = 0
    upstream_tpm: int = 0
    upstream_max_inflight: int = 0
    upstream_max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, ge=1,
                                             description="largest upstream answer kept; providers may set their own")
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    chunk_min_requests: int = 50
    chunk_max_requests: int = 2000
    chunk_target_count: int = 16
    chunk_waves: int = Field(default=10, description="a chunk holds at least this many x a process's senders")
    chunk_max_attempts: int = 3
    chunk_lease_s: float = 30.0
    progress_interval_s: float = 0.5

    # Webhooks.
    webhook_allowed_hosts: str = Field(default="", description="comma-separated hosts webhooks may be sent to")
    webhook_timeout_s: float = 10.0
    webhook_retry_base_s: float = 2.0
    webhook_max_attempts: int = 12

    # Celery reliability.
    visibility_timeout_s: int = 1800
    chunk_time_limit_s: int = 600
    sweep_interval_s: float = 30.0
    redrive_after_s: float = 60.0
    cleanup_delay_s: float = Field(
        default=900.0, description="how long a finished batch's working blobs and keys are kept, so that a Redis "
        "restored a little older (failover, AOF everysec) can still finish the batch from them")
    durable_every_lines: int = Field(
        default=0, description="a chunk makes its finished lines durable at least every this many lines "
        "(0: the provider's max_concurrency), and at every progress tick")

    @field_validator("s3_endpoint_url", "s3_region", "s3_access_key_id", "s3_secret_access_key", "metrics_token",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # docker compose passes `${VAR:-}` through as an empty string.
        return None if value == "" else value

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def celery_result_backend(self) -> str:
        return self.result_backend_url or self.redis_url


@lru_cache
def get_settings() -> Settings:
    return Settings()
