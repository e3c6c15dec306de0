"""The lora_id grammar, shared by the store, the engines, the routes and the serving proxy (no I/O, no torch).

An id is 1..4 ``/``-separated segments of ``[A-Za-z0-9][A-Za-z0-9._-]*``, no ``..``, at most 128 characters; a
version is ``<id>@latest`` or ``<id>@<UTC timestamp>`` (a checkpoint made by the store's ``save_version``).

Not here: whether an adapter with the id exists (the store), who may use it (claas.auth).
"""

from __future__ import annotations

import re

LATEST = "latest"
MAX_ID_LENGTH = 128
MAX_SEGMENTS = 4
VERSION_FORMAT = "%Y%m%dT%H%M%S%fZ"

_SEGMENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_ALNUM = _SEGMENT_CHARS - frozenset("._-")
_VERSION_RE = re.compile(r"\d{8}T\d{12}Z")


class InvalidLoraIdError(ValueError):
    """The lora_id breaks the grammar; the message says how."""


def validate_lora_id(lora_id: str, *, allow_version: bool = False) -> str:
    """Return ``lora_id`` unchanged if it is valid, else raise InvalidLoraIdError naming the problem.

    Grammar: 1..4 ``/``-separated segments of ``[A-Za-z0-9][A-Za-z0-9._-]*``, no ``..``, at most 128 characters. With
    ``allow_version`` the id may end in ``@latest`` or ``@<UTC timestamp>`` (a checkpoint made by ``save_version``).
    """
    if not isinstance(lora_id, str):
        raise InvalidLoraIdError(f"lora_id must be a string, not {type(lora_id).__name__}")
    base, sep, version = lora_id.partition("@")
    if sep:
        if not allow_version:
            raise InvalidLoraIdError(f"lora_id {lora_id!r} names a version ('@...'); this operation takes a plain id")
        if "@" in version:
            raise InvalidLoraIdError(f"lora_id {lora_id!r} contains more than one '@'")
        if version != LATEST and not _VERSION_RE.fullmatch(version):
            raise InvalidLoraIdError(
                f"version {version!r} in {lora_id!r} must be {LATEST!r} or a UTC timestamp like 20261124T201500123456Z"
            )
    if not base:
        raise InvalidLoraIdError("lora_id is empty" if not sep else f"lora_id {lora_id!r} has nothing before '@'")
    if len(base) > MAX_ID_LENGTH:
        raise InvalidLoraIdError(f"lora_id is {len(base)} characters long; at most {MAX_ID_LENGTH} are allowed")
    if "\\" in base:
        raise InvalidLoraIdError(f"lora_id {base!r} contains a backslash; separate segments with '/'")
    if base.startswith("/"):
        raise InvalidLoraIdError(f"lora_id {base!r} is an absolute path; use a relative id such as 'user/name'")
    if ".." in base:
        raise InvalidLoraIdError(f"lora_id {base!r} contains '..'")
    segments = base.split("/")
    if "" in segments:
        raise InvalidLoraIdError(f"lora_id {base!r} has an empty segment (a trailing or doubled '/')")
    if len(segments) > MAX_SEGMENTS:
        raise InvalidLoraIdError(f"lora_id {base!r} has {len(segments)} segments; at most {MAX_SEGMENTS} are allowed")
    for segment in segments:
        if segment[0] not in _ALNUM:
            raise InvalidLoraIdError(f"segment {segment!r} of lora_id {base!r} must start with a letter or a digit")
        bad = next((c for c in segment if c not in _SEGMENT_CHARS), None)
        if bad is not None:
            raise InvalidLoraIdError(
                f"lora_id {base!r} contains the character {bad!r}; allowed are ASCII letters, digits, '.', '_', '-'"
            )
    return lora_id


def split_version(lora_id: str) -> tuple[str, str | None]:
    """``'a/b@latest'`` → ``('a/b', 'latest')``; ``'a/b'`` → ``('a/b', None)``. Does not validate."""
    base, sep, version = lora_id.partition("@")
    return base, (version if sep else None)
