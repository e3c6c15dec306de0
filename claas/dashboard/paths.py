"""Untrusted names -> paths inside a data folder. A name must match a strict grammar and the resolved path must stay
inside the resolved root (symlinks included), so no query or path parameter reaches outside the data folders."""

from __future__ import annotations

import re
from pathlib import Path

from claas.errors import NotFoundError, UnprocessableError

MAX_NAME_LENGTH = 128
#: Letters, digits, `.`, `_`, `-`; no leading dot (so no `.`, `..` or hidden files); no `/`, `\`, NUL or spaces.
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def is_safe_name(name: str) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) is not None


def check_name(name: str, field: str) -> str:
    """`name` unchanged when it fits the grammar, else UnprocessableError (422) naming `field`."""
    if not is_safe_name(name):
        raise UnprocessableError(
            f"{field} must be 1-{MAX_NAME_LENGTH} characters of letters, digits, '.', '_' or '-', "
            "not starting with '.'",
            param=field,
        )
    return name


def inside(root: Path, *parts: str) -> Path | None:
    """`root/parts...` resolved, or None when it would leave the resolved `root`."""
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    return path if path.is_relative_to(base) else None


def existing_file(root: Path, *parts: str, what: str) -> Path:
    """The regular file `root/parts...` inside `root`; NotFoundError (404) when it is missing or outside."""
    path = inside(root, *parts)
    if path is None or not path.is_file():
        raise NotFoundError(f"{what} not found")
    return path
