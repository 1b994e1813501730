"""Where a batch's working blobs live in the blob store, in one place: the workers write them, the API's results
read them, and clean-up deletes everything under `batch_blob_prefix`."""

from __future__ import annotations


def batch_blob_prefix(batch_id: str) -> str:
    """Every working blob of a batch (its input copy, result segments, forwarded files) is under this prefix."""
    return f"batches/{batch_id}"


def batch_input_key(batch_id: str) -> str:
    return f"batches/{batch_id}/input.jsonl"


def segment_key(batch_id: str, index: int, run: str, seq: int, kind: str) -> str:
    """A durable segment's output ("out") or error ("err") lines, written by one run of a chunk."""
    return f"batches/{batch_id}/parts/{index:05d}-{run}-{seq:05d}.{kind}.jsonl"


def part_key(batch_id: str, index: int, run: str, kind: str) -> str:
    """Where versions before durable segments wrote a chunk run's lines (one part per run)."""
    return f"batches/{batch_id}/parts/{index:05d}-{run}.{kind}.jsonl"


def lost_lines_key(batch_id: str, index: int) -> str:
    """The `result_lost` error lines finalize writes for a chunk whose segments are gone."""
    return f"batches/{batch_id}/parts/{index:05d}-lost.err.jsonl"


def forwarded_key(batch_id: str, kind: str) -> str:
    """A forwarded batch's "output" or "error" lines, collected from the provider's files."""
    return f"batches/{batch_id}/forward/{kind}.jsonl"
