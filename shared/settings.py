"""Runtime settings, read from environment variables prefixed ``BATCHGATE_``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_API_KEY = "sk-batchgate-dev"
DEV_TENANT = "dev"
# The largest upstream answer body kept, per provider: chat, completion, response and moderation answers fit with room
# to spare, and so does an image or two; embeddings of more than 256 inputs per request (1536 dimensions as floats)
# do not (README "Upstream answer sizes"). With 64 senders a worker holds at most 512 MiB of answers.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
WINDOW_UNITS = {"m": 60, "h": 3600, "d": 86400}


def parse_windows(text: str) -> dict[str, int]:
    """'1h,24h,7d' -> each window's length in seconds; 24h is always among them."""
    windows: dict[str, int] = {}
    for name in ["24h", *(w.strip() for w in text.split(","))]:
        if not name:
            continue
        number, unit = name[:-1], name[-1:]
        if unit not in WINDOW_UNITS or not number.isdigit() or int(number) <= 0:
            raise ValueError(f"{name!r} is not a completion window like 1h, 24h or 7d")
        windows[name] = int(number) * WINDOW_UNITS[unit]
    return dict(sorted(windows.items(), key=lambda item: item[1]))


def parse_sentinels(text: str) -> list[tuple[str, int]]:
    """'h1:26379,h2:26379' -> [('h1', 26379), ('h2', 26379)]; '' -> []."""
    addresses = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r} is not a Sentinel address like sentinel-1:26379")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATCHGATE_", extra="ignore")

    # Where state lives.
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="the Redis that holds every record, "
                           "index and counter, and (unless broker_url / result_backend_url say otherwise) Celery's "
                           "queues and results")
    broker_url: str | None = Field(default=None, description="Celery broker; defaults to redis_url")
    result_backend_url: str | None = Field(default=None, description="Celery results; defaults to redis_url")
    redis_sentinels: str = Field(default="", description="comma-separated host:port of Redis Sentinels; set, they "
                                 "replace redis_url: every client (API, workers, beat, Celery's broker and results) "
                                 "asks them for the current primary of redis_master (database 0) and follows a "
                                 "failover")
    redis_master: str = Field(default="mymaster", description="the name the Sentinels monitor the primary under "
                              "(with redis_sentinels)")
    redis_password: SecretStr | None = Field(default=None, description="the password of the primary and its "
                                             "replicas (with redis_sentinels; with redis_url it goes in the URL)")
    redis_sentinel_password: SecretStr | None = Field(default=None, description="the Sentinels' own password "
                                                      "(their requirepass), if they have one")
    data_dir: Path = Field(default=Path("./data"), description="root of the local blob store (uploads, result "
                           "parts, output files); every API and worker process must see the same directory")
    redis_timeout_s: float = Field(default=2.0, gt=0, description="the API's Redis connect and reply timeout: how "
                                   "long a request waits on a frozen Redis before it answers 503")
    storage_retry_after_s: int = Field(default=2, ge=1, le=120, description="Retry-After sent with a 503 while "
                                       "Redis is unavailable (the SDKs wait this long, up to 120 s, then retry)")

    # Blob storage: a local directory (one host, or a volume every host mounts) or an S3-compatible bucket.
    blob_backend: str = Field(default="local", description="local or s3")
    s3_bucket: str = Field(default="batchgate", description="the bucket (create it beforehand)")
    s3_prefix: str = Field(default="", description="key prefix inside the bucket")
    s3_endpoint_url: str | None = Field(default=None, description="for MinIO, Ceph, R2, moto...; unset for AWS")
    s3_region: str | None = Field(default=None, description="the bucket's region name")
    s3_access_key_id: str | None = Field(default=None, description="unset: boto3's usual credential chain")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="goes with s3_access_key_id")
    s3_part_size_mb: int = Field(default=8, ge=5, description="multipart part size; S3's minimum is 5")

    # Logs.
    log_format: str = Field(default="json", description="json (one object a line, with request_id and batch_id) "
                            "or text; secrets are masked in both (batchgate dev: text)")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    access_log: bool = Field(default=True, description="one INFO line per HTTP request (batchgate dev: off)")

    # Who may call.
    dev_mode: bool = Field(default=False, description="with no api_keys set, accept the development key "
                           "sk-batchgate-dev (as tenant 'dev')")
    api_keys: str = Field(default="", description="comma-separated key=tenant pairs; a key may be 'sha256:<hex>'")
    admin_api_key: SecretStr | None = Field(default=None, description="the operator's key for /admin routes")
    metrics_token: SecretStr | None = Field(default=None, description="a Bearer token for GET /metrics only (the "
                                            "admin key works too); /metrics is open only in dev mode without keys")

    # Idempotent writes.
    idempotency_ttl_s: float = Field(default=86400.0, gt=0, description="how long the answer to a request with an "
                                     "Idempotency-Key is kept and replayed")
    idempotency_wait_s: float = Field(default=30.0, gt=0, description="how long a request waits for an identical "
                                      "one holding the same Idempotency-Key before it answers 409 (retry)")

    # Files.
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, description="largest file upload (else 413 "
                                  "file_too_large)")
    body_read_timeout_s: float = Field(default=30.0, description="a request body must send a piece at least this "
                                       "often (else 408)")
    upload_deadline_s: float = Field(default=600.0, gt=0, description="a request body must arrive whole within "
                                     "this, however steadily it drips (else 408)")
    header_timeout_s: float = Field(default=10.0, gt=0, description="a connection must send a request's headers "
                                    "within this of opening or of its previous response (else it is closed; the API runs uvicorn with "
                                    "--http api.protocol:HTTPProtocol)")
    batch_file_default_ttl_s: int = Field(default=30 * 86400, description="how long an uploaded purpose=batch file "
                                          "is kept when the upload names no expires_after")

    # Batches.
    completion_windows: str = Field(default="1h,24h,48h,7d", description="the completion windows a batch may ask "
                                    "for (24h always); a number with m, h or d")
    completion_window_s: int = Field(default=86400, gt=0, description="how long a 24h window lasts: a test and "
                                     "development override that shortens every window in proportion")
    max_batch_lines: int = Field(default=50_000, description="most requests in one batch (else the batch fails "
                                 "with too_many_requests)")
    max_batch_input_bytes: int = Field(default=200 * 1024 * 1024, description="largest batch input file (else the "
                                       "batch fails with file_too_large)")
    max_line_bytes: int = Field(default=8 * 1024 * 1024, description="the largest one request line may be")
    output_default_ttl_s: int = Field(default=30 * 86400, description="how long output and error files are kept "
                                      "when the batch names no output_expires_after")

    # Execution.
    providers_file: Path | None = Field(default=None, description="TOML file of upstream providers and tenant "
                                        "options (providers.example.toml); unset: one provider from upstream_*")
    upstream_base_url: str = Field(default="http://127.0.0.1:8001/v1", description="the default provider's base "
                                   "URL, when no providers file is given")
    upstream_api_key: str = Field(default="", description="the default provider's API key, sent as "
                                  "'Authorization: Bearer'")
    upstream_max_concurrency: int = Field(default=64, description="the default provider's in-flight requests per "
                                          "worker process")
    upstream_timeout_s: float = Field(default=120.0, description="the default provider's time limit for one answer")
    upstream_max_retries: int = Field(default=5, description="the default provider's retries of a request that got "
                                      "no usable answer (429, 5xx, transport errors)")
    upstream_rpm: int = Field(default=0, description="the default provider's requests per minute across every "
                              "worker process; 0 = unlimited")
    upstream_tpm: int = Field(default=0, description="the default provider's estimated tokens per minute across "
                              "every worker process; 0 = unlimited")
    upstream_max_inflight: int = Field(default=0, description="the default provider's requests in flight across "
                                       "every worker process; 0 = unlimited")
    upstream_max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, ge=1,
                                             description="largest upstream answer kept (decoded bytes; larger is "
                                             "response_too_large); the default of providers without "
                                             "max_response_bytes (README: Upstream answer sizes)")
    retry_base_s: float = Field(default=0.5, description="first retry backoff (doubling, with jitter)")
    retry_max_s: float = Field(default=30.0, description="longest retry backoff (a longer Retry-After is capped "
                               "to it)")
    chunk_min_requests: int = Field(default=50, description="fewest requests in a chunk")
    chunk_max_requests: int = Field(default=2000, description="most requests in a chunk")
    chunk_waves: int = Field(default=4, description="a chunk holds about this many x a process's senders: the "
                             "scheduler's unit, so a new batch waits at most about this many upstream latencies")
    runner_budget_s: float = Field(default=60.0, gt=0, description="how long a worker process serves chunks for one "
                                   "ticket before it hands over to the next message")
    chunk_max_attempts: int = Field(default=3, description="a chunk started more often than this (its runs "
                                    "kept dying) writes its remaining requests as processing_error lines")
    chunk_lease_s: float = Field(default=30.0, description="a chunk run's or finalize's lease, renewed while it "
                                 "runs; a dead run's work is taken over once it lapses")
    progress_interval_s: float = Field(default=0.5, description="how often a chunk run makes its finished lines "
                                       "durable, renews its lease and checks for cancel or expiry")

    # Native batch forwarding (providers with batch_api = "native").
    forward_poll_min_s: float = Field(default=1.0, gt=0, description="how soon a forwarded batch's provider batch "
                                      "is polled again after its counts moved (and while it is being cancelled)")
    forward_poll_max_s: float = Field(default=20.0, gt=0, description="the longest wait between polls of a "
                                      "provider batch whose counts stand still (the wait grows 1.5x a poll); keep "
                                      "it well under visibility_timeout_s")

    # Webhooks.
    webhook_allowed_hosts: str = Field(default="", description="comma-separated hosts webhooks may be sent to")
    webhook_timeout_s: float = Field(default=10.0, description="time limit for one webhook delivery")
    webhook_retry_base_s: float = Field(default=2.0, description="first delay before a failed delivery is retried "
                                        "(doubling, at most 300 s)")
    webhook_max_attempts: int = Field(default=12, description="deliveries tried before an event is given up")

    # Celery reliability.
    visibility_timeout_s: int = Field(default=1800, description="Redis visibility timeout of broker and results "
                                      "alike; keep it well over chunk_time_limit_s")
    chunk_time_limit_s: int = Field(default=600, description="a chunk run's time limit: requests not done by 90% "
                                    "of it end as request_timeout lines (a ticket's task may run this plus "
                                    "runner_budget_s)")
    sweep_interval_s: float = Field(default=30.0, description="how often the sweeper (celery beat) looks at every "
                                    "active batch: expiry, lost chunks and finalizes, clean-up, expired files")
    redrive_after_s: float = Field(default=60.0, description="the sweeper re-sends an orchestrate or finalize "
                                   "message unanswered this long, and releases again a chunk taken this long ago "
                                   "that no run holds")
    cleanup_delay_s: float = Field(
        default=900.0, description="how long a finished batch's working blobs and keys are kept, so that a Redis "
        "restored a little older (failover, AOF everysec) can still finish the batch from them")
    durable_every_lines: int = Field(
        default=0, description="a chunk makes its finished lines durable at least every this many lines "
        "(0: the provider's max_concurrency), and at every progress tick: a killed process re-sends at most its "
        "in-flight requests plus these")

    @field_validator("s3_endpoint_url", "s3_region", "s3_access_key_id", "s3_secret_access_key", "metrics_token",
                     "redis_password", "redis_sentinel_password", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # docker compose passes `${VAR:-}` through as an empty string.
        return None if value == "" else value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_parse(cls, value: str) -> str:
        parse_sentinels(value)
        return value

    @field_validator("completion_windows")
    @classmethod
    def _windows_parse(cls, value: str) -> str:
        parse_windows(value)
        return value

    def window_seconds(self) -> dict[str, int]:
        """The windows a batch may ask for, shortest first, each scaled by `completion_window_s` / 24 h."""
        scale = self.completion_window_s / 86400
        return {name: max(1, round(seconds * scale)) for name, seconds in parse_windows(self.completion_windows).items()}

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """The Sentinels to ask for the primary; empty: Redis is `redis_url`."""
        return parse_sentinels(self.redis_sentinels)

    def celery_redis_url(self) -> str:
        """Celery's URL of the Redis in `redis_url`, or of the Sentinels (kombu's `sentinel://...;sentinel://...`,
        the master's name and the Sentinels' password go in the transport options: shared/queue.py)."""
        addresses = self.sentinel_addresses()
        if not addresses:
            return self.redis_url
        auth = ""
        if self.redis_password is not None:
            auth = ":" + quote(self.redis_password.get_secret_value(), safe="") + "@"
        return ";".join(f"sentinel://{auth}{host}:{port}/0" for host, port in addresses)

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or self.celery_redis_url()

    @property
    def celery_result_backend(self) -> str:
        return self.result_backend_url or self.celery_redis_url()


@lru_cache
def get_settings() -> Settings:
    return Settings()
