"""Who a request acts for: the tenant its API key maps to, narrowed to one end user when one is named."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    tenant: str
    end_user: str | None = None

    @property
    def scope(self) -> str:
        return self.tenant if self.end_user is None else f"{self.tenant}\x1f{self.end_user}"
