"""``autoglm tenants`` / ``keys`` / ``usage`` end to end, as separate processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from auto_glm.tenants import TenantStore, UsageDelta


def autoglm(*args: str, database: str | None = None, home: Path | None = None):
    """Run ``python -m auto_glm.cli ARGS`` with ``$AUTOGLM_DATABASE_URL`` = ``database``."""
    env = {k: v for k, v in os.environ.items() if k != "AUTOGLM_DATABASE_URL"}
    if database is not None:
        env["AUTOGLM_DATABASE_URL"] = database
    if home is not None:
        env["AUTOGLM_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "auto_glm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit status 2 and one line naming the problem, with no traceback."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("autoglm: error: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_tenants_keys_and_usage_end_to_end(database_url: str) -> None:
    created = autoglm(
        "tenants", "create", "acme", "--rpm", "60", "--models", "glm,qwen",
        "--daily-tokens", "1000", "--weight", "2", database=database_url,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "rpm:            60" in created.stdout and "models:         glm,qwen" in created.stdout

    made = autoglm("keys", "create", "--tenant", "acme", "--expires", "30d", database=database_url)
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[-1]
    with TenantStore(database_url) as store:
        tenant, info = store.authenticate(key)
        assert tenant.limits.rpm == 60 and tenant.limits.models == ("glm", "qwen")
        assert (info.expires_at - info.created_at).days == 30
        store.add_usage([UsageDelta("acme", "glm", date(2026, 2, 3), requests=2, prompt_tokens=9)])
    assert key not in made.stdout.splitlines()[0]

    listed = autoglm("keys", "list", "--tenant", "acme", database=database_url)
    assert info.key_id in listed.stdout and "active" in listed.stdout and key not in listed.stdout

    updated = autoglm("tenants", "update", "acme", "--rpm", "none", "--models", "all",
                      database=database_url)  # fmt: skip
    assert updated.returncode == 0, updated.stderr
    shown = autoglm("tenants", "show", "acme", database=database_url).stdout
    assert "rpm:            no limit" in shown and "models:         all" in shown
    assert "1 active of 1" in shown
    assert "acme" in autoglm("tenants", "list", database=database_url).stdout

    usage = autoglm("usage", "--tenant", "acme", "--json", database=database_url)
    assert json.loads(usage.stdout) == [
        {"tenant": "acme", "model": "glm", "day": "2026-02-03", "requests": 2,
         "prompt_tokens": 9, "cached_tokens": 0, "completion_tokens": 0, "errors": 0}
    ]  # fmt: skip
    table = autoglm("usage", "--since", "2026-02-01", database=database_url).stdout.splitlines()
    assert table[0].split() == [
        "DAY", "TENANT", "MODEL", "REQUESTS", "PROMPT", "CACHED", "COMPLETION", "ERRORS",
    ]  # fmt: skip
    assert table[1].split() == ["2026-02-03", "acme", "glm", "2", "9", "0", "0", "0"]

    revoked = autoglm("keys", "revoke", info.key_id, database=database_url)
    assert revoked.returncode == 0 and "is revoked" in revoked.stdout
    assert "revoked" in autoglm("keys", "list", database=database_url).stdout

    deleted = autoglm("tenants", "delete", "acme", database=database_url)
    assert deleted.returncode == 0 and "1 key(s)" in deleted.stdout
    assert "No tenants yet" in autoglm("tenants", "list", database=database_url).stdout
    assert "2026-02-03" in autoglm("usage", database=database_url).stdout  # usage is kept


def test_store_refusals_exit_2_with_the_fix(database_url: str) -> None:
    assert autoglm("tenants", "create", "acme", database=database_url).returncode == 0
    refused(
        autoglm("tenants", "create", "acme", database=database_url),
        "tenant 'acme' already exists: choose another name",
    )
    for args in (
        ["tenants", "show", "ghost"],
        ["tenants", "update", "ghost", "--rpm", "1"],
        ["tenants", "delete", "ghost"],
        ["keys", "create", "--tenant", "ghost"],
        ["keys", "list", "--tenant", "ghost"],
    ):
        refused(
            autoglm(*args, database=database_url),
            "unknown tenant 'ghost': `autoglm tenants list` shows the existing ones",
        )
    refused(autoglm("keys", "revoke", "nope", database=database_url), "`autoglm keys list`")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tenants", "create", "acme", "--rpm", "-5"], "limit rpm=-5 is invalid: use a positive"),
        (["tenants", "create", "acme", "--tpm", "lots"], "--tpm 'lots' is invalid: use a whole"),
        (["tenants", "create", "acme", "--weight", "0"], "limit weight=0.0 is invalid"),
        (["tenants", "create", "acme", "--tpm", str(2**63)], f"limit tpm={2**63} is invalid"),
        (["tenants", "create", "a b"], "invalid tenant name 'a b'"),
        (["tenants", "update", "acme"], "nothing to change: name a limit"),
        (["keys", "create", "--tenant", "acme", "--expires", "tomorrow"], "--expires 'tomorrow'"),
        (["keys", "create", "--tenant", "acme", "--expires", "0d"], "use a positive number and"),
        (["keys", "create", "--tenant", "acme", "--expires", "99999d"], "within 36500 days"),
        (["usage", "--since", "yesterday"], "--since 'yesterday' is invalid: use a date as"),
    ],
)
def test_bad_values_exit_2_with_the_fix(tmp_path: Path, args: list[str], message: str) -> None:
    refused(autoglm(*args, database=f"sqlite:///{tmp_path / 'db'}"), message)


def test_bad_database_urls_exit_2_without_the_password(tmp_path: Path) -> None:
    refused(
        autoglm("tenants", "list", "--database", "nonsense"), "malformed database URL: use sqlite"
    )
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://bob:s3cret@127.0.0.1:{port}/db"
    result = autoglm("keys", "list", database=url)
    refused(result, "cannot use the database postgresql+psycopg://bob:***@127.0.0.1")
    assert "s3cret" not in result.stderr


def test_the_default_database_lives_in_autoglm_home(tmp_path: Path) -> None:
    assert autoglm("tenants", "create", "acme", home=tmp_path).returncode == 0
    assert (tmp_path / "autoglm.db").is_file()
    listed = autoglm("tenants", "list", "--database", f"sqlite:///{tmp_path / 'autoglm.db'}")
    assert "acme" in listed.stdout
