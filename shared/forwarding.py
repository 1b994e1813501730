"""Native batch forwarding's rules that the API and the workers share: which windows a forwarded batch may have,
how a provider's batch is tied back to batchgate's, and how its statuses read.

A provider with `batch_api = "native"` (providers TOML) gets a batch whole: batchgate uploads the input to the
provider's `/files`, creates the batch there with the window providers accept (24h), mirrors its status and counts,
and downloads its output and error files at the end (workers/forward.py). A local window shorter than that is
refused (a 400 at create when the provider is named by header; a failed batch when its model picks the provider);
a longer one is the local batch's own deadline.
"""

from __future__ import annotations

from shared.settings import Settings, parse_windows

REMOTE_WINDOW = "24h"
REMOTE_WINDOW_S = 86400
# The provider batch's metadata key that names the batchgate batch: how a create whose reply was lost is found.
METADATA_KEY = "batchgate_batch_id"
WINDOW_TOO_SHORT = "completion_window_too_short"


def window_too_short(settings: Settings, window: str) -> bool:
    """Whether a completion window is shorter than the provider's 24h (measured unscaled: BATCHGATE_COMPLETION_WINDOW_S
    shortens every local window alike, the provider's too in effect)."""
    return parse_windows(settings.completion_windows).get(window, REMOTE_WINDOW_S) < REMOTE_WINDOW_S


def window_message(window: str, provider: str) -> str:
    return (f"Invalid 'completion_window': '{window}' is shorter than the {REMOTE_WINDOW} window of the provider "
            f"'{provider}', which runs the batch with its own Batch API (batch_api = \"native\"). "
            f"Use {REMOTE_WINDOW} or longer.")
