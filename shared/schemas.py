"""Wire types of the Files and Batches API, field for field as the OpenAI SDK's types."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

FilePurpose = Literal[
    "assistants", "assistants_output", "batch", "batch_output", "fine-tune", "fine-tune-results", "vision", "user_data",
    "evals",
]
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]

SUPPORTED_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
    "/v1/images/generations",
)

T = TypeVar("T")


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FileObject(WireModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None


class FileDeleted(WireModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ExpiresAfter(WireModel):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2592000)


class BatchRequestCounts(WireModel):
    total: int = 0
    completed: int = 0
    failed: int = 0
    # batchgate's extensions: of the failed, the requests never sent because the batch was cancelled
    # (`batch_cancelled` lines) or its window ran out (`batch_expired`); final once the batch has ended.
    cancelled: int = 0
    expired: int = 0
    # Anthropic's split: succeeded (= completed), errored (failed lines other than cancelled and expired), processing
    # (not yet ended; 0 once terminal); and the error lines by code (final once the batch has ended; while it runs,
    # those of its committed chunks).
    succeeded: int = 0
    errored: int = 0
    processing: int = 0
    errors_by_code: dict[str, int] = Field(default_factory=dict)


class InputTokensDetails(WireModel):
    cached_tokens: int = 0


class OutputTokensDetails(WireModel):
    reasoning_tokens: int = 0


class BatchUsage(WireModel):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0
    # batchgate's extension (the SDKs keep it as an extra field: `batch.usage.model_extra["cost"]`); both fields are
    # left out of the JSON when the model has no price. The serializer has no return type so the schema stays.
    cost: float | None = Field(default=None, description="the usage at the model's price in the providers file "
                               "([prices]), in `currency`, rounded to millionths; absent when the model has no price")
    currency: str | None = Field(default=None, description="the currency of `cost` (the providers file's `currency`)")

    @model_serializer(mode="wrap")
    def _without_absent_cost(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        for name in ("cost", "currency"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class BatchError(WireModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(WireModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class Batch(WireModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = Field(default_factory=BatchRequestCounts)
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None
    # Extensions the SDKs keep as extra fields (pass `priority` with `extra_body`).
    priority: int = 0
    queued_reason: str | None = None  # why a `validating` batch waits: its tenant's max_enqueued_requests
    queue_position: int | None = None  # its place among the tenant's waiting batches, from 1
    provider_batch_id: str | None = None  # the provider's own batch, when forwarded to a batch_api = native provider
    retry_of: str | None = None  # the batch whose failed lines this one retries (POST /v1/batches/{id}/retry)
    retried_by: list[str] = Field(default_factory=list)  # the batches made by retrying this one, oldest first


class ProgressSample(WireModel):
    """A batch's counts at one moment (unix seconds)."""

    t: float
    completed: int
    failed: int


class BatchProgress(WireModel):
    """`GET /v1/batches/{id}/progress`, a batchgate extension: the batch's progress over time, with the rate over
    its last seconds and the time left at that rate (null when the batch is not running)."""

    object: Literal["list"] = "list"
    data: list[ProgressSample]
    requests_per_second: float | None = None
    eta_seconds: float | None = None


class ResultLineResponse(WireModel):
    status_code: int
    request_id: str
    body: Any = None


class ResultLineError(WireModel):
    code: str
    message: str


class ResultLineObject(WireModel):
    """A line of a batch's output or error file, as it is written there."""

    id: str
    custom_id: str
    response: ResultLineResponse | None = None
    error: ResultLineError | None = None
    provider: str | None = None  # extension: the provider that answered; absent for requests never sent


class ResultItem(WireModel):
    file: Literal["output", "error"]
    line: ResultLineObject


class ResultsPage(WireModel):
    """`GET /v1/batches/{id}/results`, a batchgate extension: the batch's finished lines so far, output and error
    lines in one stream. `after=<next_cursor>` continues; `next_cursor` is null once the batch has ended and every
    line was read. `first_id` / `last_id` are the page's first and last `custom_id`."""

    object: Literal["list"] = "list"
    data: list[ResultItem]
    first_id: str | None = None
    last_id: str | None = None
    next_cursor: str | None = None
    has_more: bool = False


class RequestStatus(WireModel):
    """`GET /v1/batches/{id}/requests/{custom_id}`, a batchgate extension: where one request of a batch stands, with
    its line once it has finished (equal to its line in the output or error file)."""

    custom_id: str
    status: Literal["pending", "in_progress", "succeeded", "errored", "cancelled", "expired"]
    line: ResultLineObject | None = None


class ListPage(WireModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class BatchCreateRequest(WireModel):
    """The body of `POST /v1/batches`; checked by hand in the service so each problem gets OpenAI's wording."""

    input_file_id: Any = None
    endpoint: Any = None
    completion_window: Any = None
    metadata: Any = None
    output_expires_after: Any = None
    priority: Any = None


class BatchRetryRequest(WireModel):
    """The optional body of `POST /v1/batches/{id}/retry`, a batchgate extension: which failed lines to retry.
    Checked by hand in the service (shared/retry_service.py)."""

    codes: list[str] | None = Field(
        default=None,
        description="Retry only the error-file lines with one of these codes, as counted in "
                    "request_counts.errors_by_code (the error's code, else http_<status>). Default: every line of "
                    "the error file, batch_cancelled and batch_expired included.",
        examples=[["rate_limit_exceeded", "http_500"]],
    )


class ErrorDetail(WireModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(WireModel):
    error: ErrorDetail
