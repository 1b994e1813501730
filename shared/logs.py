"""Structured logs: one JSON object a line, carrying the request id and batch id of the work it describes.

Secrets never reach a line: the provider keys the process knows and anything shaped like a bearer token are
masked in every message and argument before formatting.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

from pythonjsonlogger.orjson import OrjsonFormatter

from shared.settings import Settings

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
batch_id_var: ContextVar[str | None] = ContextVar("batch_id", default=None)

_TOKEN = re.compile(r"(?i)(bearer\s+|sk-)[A-Za-z0-9._\-]{6,}")
MASK = "[redacted]"


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = getattr(record, "request_id", None) or request_id_var.get()
        record.batch_id = getattr(record, "batch_id", None) or batch_id_var.get()
        return True


class RedactFilter(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return _TOKEN.sub(lambda m: m.group(1) + MASK, text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = self.redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        record.exc_info = None
        return True


def known_secrets(settings: Settings) -> list[str]:
    from shared.providers import ProviderRegistry

    own = [settings.upstream_api_key]
    for secret in (settings.s3_secret_access_key, settings.redis_password, settings.redis_sentinel_password):
        if secret is not None:
            own.append(secret.get_secret_value())
    try:
        registry = ProviderRegistry.from_settings(settings)
    except Exception:  # noqa: BLE001 - a broken providers file is reported elsewhere; log with what we have
        return own
    return [p.secret() for p in registry.providers.values()] + own


ACCESS_LOGGER = "batchgate.access"


def configure_logging(settings: Settings, celery_level: int | str | None = None) -> None:
    """Every line through one handler, at `settings.log_level`. Celery's own loggers follow the `--loglevel` a
    `celery worker`/`beat` was started with (`celery_level`), so `--loglevel WARNING` hides its per-task lines;
    `access_log` off keeps the API's per-request lines out."""
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(OrjsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(batch_id)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        ))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(batch_id)s] %(message)s"))
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter(known_secrets(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    if celery_level is not None:
        logging.getLogger("celery").setLevel(celery_level.upper() if isinstance(celery_level, str) else celery_level)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET if settings.access_log else logging.WARNING)
