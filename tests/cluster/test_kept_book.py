"""An ingress's :class:`KeptBook` when the quota keeper fails: the waiting call is refused
with a 503 that says to retry (never let through unchecked, never a 500), and a failed
batch that nobody waits for is logged. The keeper is real; only Serve's transport is
stood in for (``apply.remote`` as an awaitable), so that it can be cut."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest

from auto_glm.cluster.quotas import KeptBook, QuotaKeeper
from auto_glm.serving.errors import APIError
from auto_glm.serving.tenancy import Tenancy
from auto_glm.tenants import Tenant, TenantLimits, TenantStore
from auto_glm.tenants.loads import Load
from auto_glm.tenants.quotas import Reservation


class Transport:
    """Serve's handle to the keeper: ``apply.remote(calls)`` is awaited for the answers;
    ``cut`` makes every later call fail as a dead replica's does."""

    def __init__(self, keeper: QuotaKeeper) -> None:
        self.keeper = keeper
        self.cut = False
        self.apply = self
        self.sent = 0

    def remote(self, calls: list):
        self.sent += 1
        return self._answer(calls)

    async def _answer(self, calls: list):
        if self.cut:
            raise ConnectionError("the keeper's replica is gone")
        return await self.keeper.apply(calls)


def tenant(name: str, **limits) -> Tenant:
    return Tenant(name, TenantLimits(**limits), datetime(2024, 1, 1, tzinfo=timezone.utc))


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tenants.db'}"


@pytest.fixture
def tenancy_of(url: str):
    """A server's tenancy over a book (closed after the test)."""
    made: list[Tenancy] = []

    def make(book: KeptBook) -> Tenancy:
        made.append(Tenancy(TenantStore(url), "required", None, quotas=book))
        return made[-1]

    yield make
    for tenancy in made:
        tenancy.close()


async def test_a_keeper_that_fails_refuses_the_call_with_a_503(
    url: str, tmp_path: Path, tenancy_of, caplog: pytest.LogCaptureFixture
) -> None:
    keeper = QuotaKeeper(url)
    with sqlite3.connect(tmp_path / "tenants.db") as db:  # the keeper's store breaks
        db.execute("DROP TABLE daily_usage")
    book = KeptBook(Transport(keeper))
    tenancy = tenancy_of(book)
    with (
        caplog.at_level(logging.WARNING, logger="auto_glm.cluster"),
        pytest.raises(APIError) as refused,
    ):
        await tenancy.reserve(tenant("acme", tpm=1000), 100, Load(), 1)
    error = refused.value
    assert (error.status, error.code, error.headers["Retry-After"]) == (
        503,
        "quota_unavailable",
        "1",
    )
    assert error.message == (
        "the quota keeper, which checks tenants' limits for this application, failed "
        "(TenantStoreError), so the call was not admitted; retry shortly (see the server log)"
    )
    assert "the quota keeper failed 1 calls (reserve)" in caplog.text
    assert book._unplaced == set()  # the refused call is not counted as coming


async def test_the_rpm_precheck_of_a_cut_keeper_is_a_503(url: str, tenancy_of) -> None:
    transport = Transport(QuotaKeeper(url))
    book = KeptBook(transport)
    tenancy = tenancy_of(book)
    acme = tenant("acme", rpm=1)
    await tenancy.reserve(acme, 10, Load(), 1)
    with pytest.raises(APIError) as over:  # the keeper's refusal holds for a minute
        await tenancy.reserve(acme, 10, Load(), 1)
    assert (over.value.status, over.value.code) == (429, "rpm_exceeded")
    transport.cut = True
    with pytest.raises(APIError) as refused:  # which the book asks the keeper about again
        await tenancy.precheck(acme)
    assert (refused.value.status, refused.value.code) == (503, "quota_unavailable")
    assert "ConnectionError" in refused.value.message


async def test_a_settlement_the_keeper_never_got_is_logged(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    transport = Transport(QuotaKeeper(url))
    book = KeptBook(transport)
    held = await book.reserve(tenant("acme", tpm=1000), 100, Load(), 1)
    assert isinstance(held, Reservation)
    transport.cut = True
    with caplog.at_level(logging.WARNING, logger="auto_glm.cluster"):
        book.settle(held, 40)
        assert book._sender is not None
        await book._sender  # sent without waiting for the answer ...
        await asyncio.gather(*book._watching)  # ... which is watched for a failure
    assert transport.sent == 2
    assert "the quota keeper failed 1 calls (settle): ConnectionError" in caplog.text
