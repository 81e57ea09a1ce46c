"""``--serve`` entries: which registered model (and version) to serve, and how.

``NAME[@VERSION][,keep_alive=DURATION][,kv_share=NUMBER]``, e.g. ``chat@v2,keep_alive=10m``;
in a config file the same entry may be a mapping (``{name: chat, version: v2}``). Without a
version the newest registered one is served. Durations are seconds or carry a unit
(``30s``, ``10m``, ``2h``); ``keep_alive`` unloads a model that has been idle that long.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["ServeSpec", "parse_duration"]

_NAME = r"[A-Za-z0-9._-]{1,64}"
_ENTRY = re.compile(rf"(?P<name>{_NAME})(?:@(?P<version>{_NAME}))?")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_FORM = "NAME[@VERSION][,keep_alive=DURATION][,kv_share=NUMBER], e.g. chat@v2,keep_alive=10m"


def parse_duration(text: str, what: str) -> float:
    """Seconds in ``text`` (``90``, ``30s``, ``10m``, ``2h``); ValueError naming ``what``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"{what}={text!r} is not a duration: use seconds or 30s, 10m, 2h")
    return float(match[1]) * _UNITS[match[2]]


@dataclass(frozen=True)
class ServeSpec:
    name: str
    version: str | None = None
    keep_alive: float | None = None
    kv_share: float = 1.0

    @property
    def ref(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, entry: Any) -> ServeSpec:
        """From ``"chat@v2,keep_alive=10m"`` or ``{"name": "chat", "version": "v2"}``."""
        if isinstance(entry, ServeSpec):
            return entry
        if isinstance(entry, dict):
            unknown = set(entry) - {"name", "version", "keep_alive", "kv_share"}
            if unknown or "name" not in entry:
                raise ValueError(
                    f"serve entry {entry!r} needs name and may have version, keep_alive, "
                    f"kv_share{f'; unknown: {sorted(unknown)}' if unknown else ''}"
                )
            head = entry["name"] + (f"@{entry['version']}" if entry.get("version") else "")
            options = {k: str(v) for k, v in entry.items() if k in ("keep_alive", "kv_share")}
        elif isinstance(entry, str):
            head, *rest = [part.strip() for part in entry.split(",")]
            options = {}
            for part in rest:
                key, sep, value = part.partition("=")
                if not sep or key not in ("keep_alive", "kv_share"):
                    raise ValueError(f"serve entry {entry!r}: unknown option {part!r}; use {_FORM}")
                options[key] = value
        else:
            raise ValueError(f"serve entry {entry!r} is not a string or mapping; use {_FORM}")
        match = _ENTRY.fullmatch(head)
        if match is None:
            raise ValueError(
                f"serve entry {entry!r}: {head!r} is not NAME or NAME@VERSION (names: 1-64 "
                f"characters of A-Z a-z 0-9 . _ -); use {_FORM}"
            )
        keep_alive = options.get("keep_alive")
        share = options.get("kv_share", "1")
        try:
            kv_share = float(share)
        except ValueError:
            kv_share = -1.0
        if not kv_share > 0:
            raise ValueError(f"serve entry {entry!r}: kv_share={share!r} must be a number > 0")
        return cls(
            match["name"],
            match["version"],
            None if keep_alive is None else parse_duration(keep_alive, "keep_alive"),
            kv_share,
        )
