"""Optional bearer API keys (`CLAAS_API_KEYS`): `key` is an admin key, `key:prefix` may only touch lora ids under
`prefix`, matched on whole path segments (`k1:alice` or `k1:alice/` grant `alice/...` and `alice` itself, never
`alice2/...`), plus the inference server's base models. With no keys configured every caller is an admin.

`AuthDep` (claas.deps) resolves the caller's `AuthScope`; routes that act on a lora_id call `scope.require(lora_id)`.

Not here: users, rate limits, key rotation; keys come from settings at start-up.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from claas.errors import ForbiddenError, UnauthorizedError


@dataclass(frozen=True)
class AuthScope:
    """Who is calling: `prefix` None means every lora id (an admin key, or auth disabled)."""

    prefix: str | None = None
    authenticated: bool = False

    @property
    def is_admin(self) -> bool:
        return self.prefix is None

    def allows(self, lora_id: str) -> bool:
        """Whether `lora_id` (versions included: `x@latest` is under x's prefix) is under this key's prefix."""
        if self.prefix is None:
            return True
        namespace = self.prefix.rstrip("/")
        base = lora_id.partition("@")[0]
        return base == namespace or base.startswith(namespace + "/")

    def require(self, lora_id: str, *, param: str = "lora_id") -> None:
        if self.prefix is not None and not self.allows(lora_id):
            raise ForbiddenError(
                f"this API key may only use lora ids under '{self.prefix.rstrip('/')}/' (and base models), "
                f"not '{lora_id}'",
                param=param,
            )


OPEN_SCOPE = AuthScope()


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[tuple[str, str | None], ...] = ()  # (key, prefix or None for admin)

    @classmethod
    def parse(cls, spec: str | None) -> ApiKeys:
        entries: list[tuple[str, str | None]] = []
        for raw in (spec or "").split(","):
            raw = raw.strip()
            if not raw:
                continue
            key, sep, prefix = raw.partition(":")
            key, prefix = key.strip(), prefix.strip()
            if not key:
                raise ValueError("CLAAS_API_KEYS has an entry with an empty key (expected `key` or `key:prefix`)")
            if sep and not prefix:
                raise ValueError(f"CLAAS_API_KEYS entry for key ending ...{key[-4:]} has an empty prefix")
            entries.append((key, prefix if sep else None))
        return cls(tuple(entries))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> AuthScope:
        if not self.keys:
            return OPEN_SCOPE
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise UnauthorizedError("missing API key: send the header 'Authorization: Bearer <key>'")
        match: AuthScope | None = None
        for key, prefix in self.keys:  # compare against every key: no early exit that would leak timing
            if hmac.compare_digest(key.encode(), token.encode()) and match is None:
                match = AuthScope(prefix=prefix, authenticated=True)
        if match is None:
            raise UnauthorizedError("invalid API key")
        return match
