"""API key text: ``agk_<id>_<secret>``, made from ``secrets``, kept only as a SHA-256 digest.

The id (8 letters and digits) is stored in clear to find the key and to name it in
listings; the secret (32 random bytes, URL-safe base64) never leaves the caller.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string

from auto_glm.tenants.errors import AuthError

__all__ = [
    "digest",
    "digest_matches",
    "key_id_of",
    "new_key",
    "parse_key",
    "redact",
    "shown_key_id",
]

PREFIX = "agk_"
_ID_CHARS = string.ascii_letters + string.digits
_ID_LENGTH = 8
_SECRET_BYTES = 32
_KEY = re.compile(rf"{PREFIX}([A-Za-z0-9]{{{_ID_LENGTH}}})_([A-Za-z0-9_-]{{43,}})")
_KEY_START = re.compile(rf"{PREFIX}([A-Za-z0-9]{{{_ID_LENGTH}}})_")
_IN_TEXT = re.compile(rf"{PREFIX}([A-Za-z0-9]{{{_ID_LENGTH}}}_)?[^/?#]*")  # to the segment's end


def new_key() -> tuple[str, str]:
    """A fresh ``(key_id, key)``."""
    key_id = "".join(secrets.choice(_ID_CHARS) for _ in range(_ID_LENGTH))
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"


def digest(key: str) -> str:
    """The hex SHA-256 of the whole key text: what the database keeps."""
    return hashlib.sha256(key.encode()).hexdigest()


def digest_matches(key: str, stored: str) -> bool:
    """Whether ``key`` hashes to ``stored``, compared in constant time."""
    return hmac.compare_digest(digest(key), stored)


def parse_key(key: str | None) -> str:
    """The key id of a well-formed key; :class:`AuthError` ("missing"/"malformed") if not."""
    if not key:
        raise AuthError("missing", "an API key is required: send it as a Bearer token")
    match = _KEY.fullmatch(key)
    if match is None:
        raise AuthError(
            "malformed",
            f"malformed API key: expected {PREFIX}<id>_<secret> as printed by "
            "`autoglm keys create`",
        )
    return match.group(1)


def key_id_of(text: str) -> str:
    """The key id in ``text``: a bare id, or a whole key pasted by mistake (stray spaces
    and a damaged secret do not matter: the id is enough)."""
    text = text.strip()
    match = _KEY_START.match(text)
    return match.group(1) if match else text


def redact(text: str) -> str:
    """``text`` with the secret of every key in it cut off (its id is kept): for paths that
    logs and traces keep, where a client may have put a key."""
    return _IN_TEXT.sub(lambda match: f"{PREFIX}{match.group(1) or ''}...", text)


def shown_key_id(text: str) -> str:
    """``text`` quoted for a message, unless it may hold a secret (too long for an id)."""
    if len(text) <= _ID_LENGTH * 2 and not text.startswith(PREFIX):
        return repr(text)
    return f"(the {len(text)} characters given are not shown: they may hold a secret)"
