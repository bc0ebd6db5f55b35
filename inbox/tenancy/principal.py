"""Who is calling: the authenticated principal and its scopes. Pure data."""

from __future__ import annotations

from dataclasses import dataclass

from inbox.errors import Forbidden

SCOPES = ("send", "read", "admin")


@dataclass(frozen=True)
class Principal:
    org: str
    key_id: str
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        # admin implies every scope.
        if scope not in self.scopes and "admin" not in self.scopes:
            raise Forbidden(f"this API key lacks the '{scope}' scope")
