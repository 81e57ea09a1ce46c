"""``autoglm tenants``, ``autoglm keys`` and ``autoglm usage``: manage the tenant store.

Every command takes ``--database URL`` (default ``$AUTOGLM_DATABASE_URL``, else the SQLite
file of :func:`~auto_glm.tenants.default_database_url`). A bad value or an unusable
database ends the command with exit status 2 and one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import date, datetime, timedelta
from typing import Any

from auto_glm.tenants.errors import TenantStoreError
from auto_glm.tenants.models import COUNTERS, KeyInfo, Tenant, TenantLimits, utc_now
from auto_glm.tenants.store import TenantStore

__all__ = ["configure", "run"]

Action = Callable[[argparse.Namespace], None]
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_NO_LIMIT = "; 'none': no limit"
_LIMIT_OPTIONS = {  # option: (field, metavar, help)
    "--rpm": ("rpm", "N", "requests per minute" + _NO_LIMIT),
    "--tpm": ("tpm", "N", "tokens per minute" + _NO_LIMIT),
    "--max-concurrent": ("max_concurrent", "N", "requests running at once" + _NO_LIMIT),
    "--max-queued": ("max_queued", "N", "requests waiting at once" + _NO_LIMIT),
    "--weight": ("weight", "W", "share of the server when tenants compete (default 1.0)"),
    "--max-priority": (
        "max_priority",
        "P",
        "most urgent priority it may ask for (lower runs sooner)" + _NO_LIMIT,
    ),
    "--models": ("models", "M1,M2", "served model names it may use; 'all': every one"),
    "--daily-tokens": (
        "daily_tokens",
        "N",
        "prompt plus completion tokens per UTC day" + _NO_LIMIT,
    ),
}


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the arguments of command ``name`` (tenants, keys or usage) to ``parser``."""
    commands = {"tenants": _configure_tenants, "keys": _configure_keys, "usage": _configure_usage}
    commands[name](parser)


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; 2 with a one-line message when the store refuses."""
    try:
        args.action(args)
    except TenantStoreError as error:
        print(f"autoglm: error: {error}", file=sys.stderr)
        return 2
    return 0


# Arguments


def _leaf(
    commands: argparse._SubParsersAction, name: str, help: str, action: Action
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=help)
    parser.set_defaults(action=action)
    _add_database(parser)
    return parser


def _add_database(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        metavar="URL",
        default=os.environ.get("AUTOGLM_DATABASE_URL") or None,
        help="sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB (default: "
        "$AUTOGLM_DATABASE_URL, else sqlite:///$AUTOGLM_HOME/autoglm.db, AUTOGLM_HOME "
        "defaulting to ~/.cache/autoglm)",
    )


def _add_limits(parser: argparse.ArgumentParser) -> None:
    for option, (_, metavar, help) in _LIMIT_OPTIONS.items():
        parser.add_argument(option, metavar=metavar, default=argparse.SUPPRESS, help=help)


def _configure_tenants(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(metavar="ACTION", title="actions", required=True)
    create = _leaf(commands, "create", "add a tenant with its limits", _create_tenant)
    create.add_argument("name", help="1 to 64 characters from A-Z, a-z, 0-9, '.', '_', '-'")
    _add_limits(create)
    _leaf(commands, "list", "list the tenants and their limits", _list_tenants)
    show = _leaf(commands, "show", "show one tenant's limits and keys", _show_tenant)
    show.add_argument("name")
    update = _leaf(commands, "update", "change some of a tenant's limits", _update_tenant)
    update.add_argument("name")
    _add_limits(update)
    delete = _leaf(commands, "delete", "delete a tenant and its keys (not its usage)", _delete)
    delete.add_argument("name")


def _configure_keys(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(metavar="ACTION", title="actions", required=True)
    create = _leaf(commands, "create", "make an API key (printed once)", _create_key)
    create.add_argument("--tenant", required=True, metavar="NAME")
    create.add_argument(
        "--expires", metavar="DURATION", help="e.g. 3600s, 90m, 12h, 30d (default: never)"
    )
    listing = _leaf(commands, "list", "list API keys (ids, never the keys)", _list_keys)
    listing.add_argument("--tenant", metavar="NAME", help="only this tenant's keys")
    revoke = _leaf(commands, "revoke", "revoke an API key for good", _revoke_key)
    revoke.add_argument("key_id", metavar="KEY_ID", help="as `autoglm keys list` shows it")


def _configure_usage(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(action=_usage)
    _add_database(parser)
    parser.add_argument("--tenant", metavar="NAME", help="only this tenant's usage")
    parser.add_argument("--since", metavar="DATE", help="from this UTC day on (YYYY-MM-DD)")
    parser.add_argument("--json", action="store_true", help="print a JSON array of rows")


# Values


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for option, (field, _, _) in _LIMIT_OPTIONS.items():
        text = getattr(args, field, None)
        if text is None:
            continue
        text = text.strip()
        if field == "models":
            values[field] = None if text.lower() == "all" else tuple(text.split(","))
        elif text.lower() == "none" and field != "weight":
            values[field] = None
        else:
            values[field] = _number(option, text, float if field == "weight" else int)
    return values


def _number(option: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        wanted = "a number" if kind is float else "a whole number or 'none'"
        raise TenantStoreError(f"{option} {text!r} is invalid: use {wanted}") from None


def _duration(text: str) -> timedelta:
    match = re.fullmatch(r"\s*(\d{1,8})\s*([smhd])\s*", text)
    if match is None or int(match.group(1)) == 0:
        raise TenantStoreError(
            f"--expires {text!r} is invalid: use a positive number and a unit, s, m, h or d "
            "(e.g. 30d); leave it out for a key that never expires"
        )
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise TenantStoreError(
            f"--since {text!r} is invalid: use a date as YYYY-MM-DD, e.g. 2026-01-31"
        ) from None


# Output


def _when(moment: datetime | None, empty: str = "never") -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC" if moment is not None else empty


def _status(key: KeyInfo) -> str:
    if key.revoked_at is not None:
        return f"revoked {_when(key.revoked_at)}"
    return "active" if key.active else "expired"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(headers)] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _describe(tenant: Tenant) -> None:
    print(f"{'tenant:':<16}{tenant.name}")
    print(f"{'created:':<16}{_when(tenant.created_at)}")
    for option, (field, _, _) in _LIMIT_OPTIONS.items():
        value = getattr(tenant.limits, field)
        if value is None:
            value = "all" if field == "models" else "no limit"
        print(f"{option[2:] + ':':<16}{_cell(value)}")


# Commands


def _create_tenant(args: argparse.Namespace) -> None:
    limits = TenantLimits(**_limits(args))
    with TenantStore(args.database) as store:
        _describe(store.create_tenant(args.name, limits))


def _list_tenants(args: argparse.Namespace) -> None:
    with TenantStore(args.database) as store:
        tenants = store.list_tenants()
    if not tenants:
        print("No tenants yet: add one with `autoglm tenants create NAME`.")
        return
    headers = ["NAME"] + [option[2:].upper() for option in _LIMIT_OPTIONS] + ["CREATED"]
    rows = [
        [t.name]
        + [getattr(t.limits, field) for field, _, _ in _LIMIT_OPTIONS.values()]
        + [_when(t.created_at)]
        for t in tenants
    ]
    _table(headers, rows)


def _show_tenant(args: argparse.Namespace) -> None:
    with TenantStore(args.database) as store:
        tenant = store.get_tenant(args.name)
        keys = store.list_keys(args.name)
    _describe(tenant)
    active = sum(key.active for key in keys)
    print(
        f"{'keys:':<16}{active} active of {len(keys)} (`autoglm keys list --tenant {tenant.name}`)"
    )


def _update_tenant(args: argparse.Namespace) -> None:
    changes = _limits(args)
    if not changes:
        raise TenantStoreError(
            f"nothing to change: name a limit, e.g. `autoglm tenants update {args.name} --rpm 60`"
        )
    with TenantStore(args.database) as store:
        _describe(store.update_tenant(args.name, **changes))


def _delete(args: argparse.Namespace) -> None:
    with TenantStore(args.database) as store:
        keys = store.list_keys(args.name)
        store.delete_tenant(args.name)
    print(f"Deleted tenant {args.name} and its {len(keys)} key(s); its usage rows are kept.")


def _create_key(args: argparse.Namespace) -> None:
    expires_in = _duration(args.expires) if args.expires is not None else None
    with TenantStore(args.database) as store:
        info, key = store.create_key(args.tenant, expires_in)
    print(f"Created key {info.key_id} for tenant {info.tenant}; expires: {_when(info.expires_at)}.")
    print("Copy the key now: it is not stored and cannot be shown again.")
    print(key)


def _list_keys(args: argparse.Namespace) -> None:
    with TenantStore(args.database) as store:
        keys = store.list_keys(args.tenant)
    if not keys:
        print("No keys yet: make one with `autoglm keys create --tenant NAME`.")
        return
    rows = [
        [k.key_id, k.tenant, _when(k.created_at), _when(k.expires_at), _status(k)] for k in keys
    ]
    _table(["KEY_ID", "TENANT", "CREATED", "EXPIRES", "STATUS"], rows)


def _revoke_key(args: argparse.Namespace) -> None:
    with TenantStore(args.database) as store:
        info = store.revoke_key(args.key_id)
    print(f"Key {info.key_id} of tenant {info.tenant} is revoked (since {_when(info.revoked_at)}).")


def _usage(args: argparse.Namespace) -> None:
    since = _day(args.since) if args.since is not None else None
    with TenantStore(args.database) as store:
        rows = store.usage(args.tenant, since)
    if args.json:
        print(json.dumps([{**asdict(row), "day": row.day.isoformat()} for row in rows], indent=2))
        return
    if not rows:
        print(f"No usage recorded (today is {utc_now():%Y-%m-%d} UTC).")
        return
    headers = ["DAY", "TENANT", "MODEL", "REQUESTS", "PROMPT", "CACHED", "COMPLETION", "ERRORS"]
    _table(headers, [[r.day, r.tenant, r.model, *(getattr(r, c) for c in COUNTERS)] for r in rows])
