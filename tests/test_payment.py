"""``payment.charge`` and ``payment.refund`` (wayang_workers.payment): a charge happens once per
idempotency key whatever repeats it (a redelivery after ``kill -9``, a retry, a dead letter
replayed), refunds never exceed the charge, and a refund of a key that never charged voids it.

Real broker, real PostgreSQL (the ledger), and a fake Stripe-style API served by this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web
from wayang_workers.payment import Charge, PaymentSettings
from wayang_workers.payment.ledger import schema_sql
from wayang_workers.payment.providers import unavailable

from wayang_mq import Compensation, ErrorCode, RetryHints, Status, Task
from wayang_mq.client.replies import ResultSeen
from wayang_mq.core.errors import ConfigError
from wayang_mq.core.model import JsonLike, Result
from wayang_mq.ops.deadletters import list_dead_letters, replay
from wayang_mq.runtime.executor import load_executor
from wayang_mq.runtime.settings import WorkerFile
from wayang_mq.testing.harness import Fabric, WorkerProcess, eventually
from wayang_mq.testing.plugin import fresh_database

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
CHARGE = "payment.charge"
REFUND = "payment.refund"


# -- the ledger's database -------------------------------------------------------------------


@pytest.fixture
def ledger_url(postgres: str) -> Iterator[str]:
    """A fresh database with the ledger's schema, a merchant and a card network account."""
    with fresh_database(postgres) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(schema_sql().encode())
            _open_account(conn, "merchant", "EUR")
            _open_account(conn, "cards", "EUR", allow_negative=True)  # money from outside
        yield url


def _open_account(
    conn: psycopg.Connection[Any], account: str, currency: str, *, allow_negative: bool = False
) -> None:
    conn.execute(
        "INSERT INTO wayang_ledger.accounts (id, currency, allow_negative) VALUES (%s, %s, %s)",
        [account, currency, allow_negative],
    )


def _sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query.encode(), params).fetchall()


def _counts(url: str) -> tuple[int, int]:
    """(transfers that moved money, postings)."""
    ((transfers,),) = _sql(url, "SELECT count(*) FROM wayang_ledger.transfers WHERE amount > 0")
    ((postings,),) = _sql(url, "SELECT count(*) FROM wayang_ledger.postings")
    return transfers, postings


def _balances(url: str) -> dict[str, int]:
    return dict(_sql(url, "SELECT id, balance FROM wayang_ledger.accounts"))  # type: ignore[arg-type]


def _ledger(url: str, **overrides: Any) -> Charge:
    values: dict[str, Any] = {"provider": "ledger", "dsn": url, "merchant_account": "merchant"}
    return Charge(PaymentSettings(**(values | overrides)))


def _reason(result: Result) -> tuple[ErrorCode | None, bool | None, JsonLike]:
    assert result.error is not None, result
    return result.error.code, result.error.retryable, result.error.details.get("reason")


# -- settings --------------------------------------------------------------------------------


def test_the_example_settings_file_loads() -> None:
    # Given the shipped example, When the worker loads the executor with it
    executor = load_executor(
        "wayang_workers.payment:Charge", WorkerFile.read(ROOT / "workers/examples/payment.toml")
    )
    # Then it is the ledger, its DSN a secret by reference, serving charges and refunds
    assert isinstance(executor, Charge)
    settings = executor.settings
    assert (settings.provider, settings.merchant_account) == ("ledger", "merchant-eur")
    assert not isinstance(settings.dsn, str) and settings.dsn is not None
    assert settings.dsn.name == "ledger-dsn"
    assert executor.capabilities() == (CHARGE, REFUND)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('provider = "ledger"\nmerchant_account = "m"\n', 'provider "ledger" needs dsn'),
        ('provider = "http"\napi_key = "k"\n', 'provider "http" needs base_url'),
        ('provider = "paypal"\n', "[payment.charge].provider"),
        ('provider = "http"\nbase_url = "ftp://x"\napi_key = "k"\n', "[payment.charge].base_url"),
    ],
)
def test_settings_a_provider_cannot_work_with_are_refused(
    tmp_path: Path, table: str, expected: str
) -> None:
    path = tmp_path / "worker.toml"
    path.write_text("[payment.charge]\n" + table)
    with pytest.raises(ConfigError) as caught:
        load_executor("wayang_workers.payment:Charge", WorkerFile.read(path))
    assert expected in caught.value.message


# -- charges through the ledger ---------------------------------------------------------------


async def test_bad_input_is_invalid_task_and_charges_nothing(
    fabric: Fabric, ledger_url: str
) -> None:
    await fabric.purge(CHARGE)
    good = {"amount": 100, "currency": "EUR", "source": "cards"}
    bad = [
        good | {"currency": "EURO"},
        good | {"currency": "eur"},
        good | {"currency": "ABC"},  # three letters, not an ISO 4217 code
        good | {"amount": 0},
        good | {"amount": 1.5},
        good | {"amount": "100"},
        good | {"amount": 10**13},
        {"currency": "EUR", "source": "cards"},
        good | {"metadata": {"k": 1}},
        good | {"surprise": True},
    ]
    async with fabric.worker([_ledger(ledger_url)]), fabric.dispatcher() as dispatcher:
        results = [await dispatcher.run(CHARGE, task_input, wait_s=30) for task_input in bad]
        refund = await dispatcher.run(REFUND, {"charge_id": "x", "charge_key": "y"}, wait_s=30)
    for result in [*results, refund]:
        assert result.status is Status.FAILED
        assert result.error is not None and result.error.code is ErrorCode.INVALID_TASK
        assert not result.error.retryable
    assert "input.currency" in (results[0].error.message if results[0].error else "")
    assert "input.amount" in (results[4].error.message if results[4].error else "")
    assert _counts(ledger_url) == (0, 0)


async def test_insufficient_funds_unknown_accounts_and_currency_are_refused_posting_nothing(
    fabric: Fabric, ledger_url: str
) -> None:
    # Given a wallet that may not go negative, holding 500, and a USD account
    with psycopg.connect(ledger_url, autocommit=True) as conn:
        _open_account(conn, "wallet", "EUR")
        _open_account(conn, "usd", "USD")
    await fabric.purge(CHARGE)
    async with fabric.worker([_ledger(ledger_url)]), fabric.dispatcher() as dispatcher:
        funded = await dispatcher.run(
            CHARGE,
            {"amount": 500, "currency": "EUR", "source": "cards", "destination": "wallet"},
            wait_s=30,
        )
        assert funded.status is Status.SUCCESS, funded.error
        before = (_counts(ledger_url), _balances(ledger_url))
        # When the wallet is charged more than it holds, or accounts do not fit
        over = await dispatcher.run(
            CHARGE, {"amount": 501, "currency": "EUR", "source": "wallet"}, wait_s=30
        )
        unknown = await dispatcher.run(
            CHARGE, {"amount": 1, "currency": "EUR", "source": "nobody"}, wait_s=30
        )
        mismatch = await dispatcher.run(
            CHARGE, {"amount": 1, "currency": "USD", "source": "usd"}, wait_s=30
        )
        # Then each is refused for good, with its reason, and nothing was posted
        assert _reason(over) == (ErrorCode.EXECUTOR_ERROR, False, "insufficient_funds")
        assert _reason(unknown) == (ErrorCode.EXECUTOR_ERROR, False, "unknown_account")
        assert _reason(mismatch) == (ErrorCode.EXECUTOR_ERROR, False, "currency_mismatch")
        assert (_counts(ledger_url), _balances(ledger_url)) == before
        # and the wallet can still spend what it has, under the refused task's key: a
        # refusal rolled the key back with everything else
        assert over.error is not None
        spent = await dispatcher.run(
            CHARGE,
            {"amount": 500, "currency": "EUR", "source": "wallet"},
            idempotency_key=over.task_id,
            wait_s=30,
        )
    assert spent.status is Status.SUCCESS, spent.error
    assert _balances(ledger_url)["wallet"] == 0


async def test_a_redelivered_and_a_retried_charge_charge_once(
    fabric: Fabric, ledger_url: str
) -> None:
    await fabric.purge(CHARGE)
    order = {"amount": 1999, "currency": "EUR", "source": "cards", "description": "order 42"}
    # Given a charge that ran on a worker that is gone since
    task_id = f"charge-{random.randrange(10**9)}"
    async with fabric.worker([_ledger(ledger_url)]), fabric.dispatcher() as first:
        charged = await first.run(CHARGE, order, task_id=task_id, wait_s=30)
    # When the same task (same id: a redelivery after a crash) reaches another worker
    async with fabric.worker([_ledger(ledger_url)]), fabric.dispatcher() as second:
        again = await second.run(CHARGE, order, task_id=task_id, wait_s=30)
        # and a new task retries the same payment under the same idempotency key, twice
        keyed = [
            await second.run(CHARGE, order, idempotency_key="order-42", wait_s=30) for _ in range(2)
        ]
        # and a different payment reuses that key
        conflict = await second.run(
            CHARGE, order | {"amount": 1}, idempotency_key="order-42", wait_s=30
        )
    # Then the redelivery found the first charge: same charge id, marked already charged
    assert charged.status is Status.SUCCESS and again.status is Status.SUCCESS
    assert charged.output is not None and again.output is not None
    assert charged.output["already_charged"] is False
    assert again.output == charged.output | {"already_charged": True}
    assert charged.output["idempotency_key"] == task_id  # the task id is the default key
    # and the keyed retry charged once
    assert [r.output["already_charged"] for r in keyed if r.output] == [False, True]
    assert keyed[0].output is not None and keyed[1].output is not None
    assert keyed[0].output["charge_id"] == keyed[1].output["charge_id"]
    assert _reason(conflict) == (ErrorCode.EXECUTOR_ERROR, False, "idempotency_conflict")
    # Two charges in all, four postings, and the money where it should be
    assert _counts(ledger_url) == (2, 4)
    assert _balances(ledger_url) == {"merchant": 3998, "cards": -3998}


async def test_two_copies_of_a_charge_at_once_charge_once(ledger_url: str) -> None:
    # Given two workers' executors, When both run the same task at the same moment
    executors = [_ledger(ledger_url), _ledger(ledger_url)]
    for executor in executors:
        await executor.setup()
    try:
        task = Task.create(CHARGE, {"amount": 700, "currency": "EUR", "source": "cards"})
        outputs = await asyncio.gather(*(e.execute(task) for e in executors for _ in range(5)))
    finally:
        for executor in executors:
            await executor.teardown()
    # Then one of them charged, and every other answer is that charge
    assert {o["charge_id"] for o in outputs if isinstance(o, dict)} != set()
    assert len({o["charge_id"] for o in outputs if isinstance(o, dict)}) == 1
    assert sorted(o["already_charged"] for o in outputs if isinstance(o, dict)) == [
        False,
        *[True] * 9,
    ]
    assert _counts(ledger_url) == (1, 2)


class _CommitThenLoseTheAnswer(Charge):
    """Charges, then fails as if the database's answer to COMMIT never came back: the charge
    happened, the task does not know it, and its retries run out."""

    async def execute(self, task: Task) -> JsonLike:
        await super().execute(task)
        raise unavailable("ledger_unavailable", "the connection dropped during COMMIT")


async def test_replaying_a_dead_charge_that_succeeded_does_not_charge_again(
    fabric: Fabric, ledger_url: str
) -> None:
    await fabric.purge(CHARGE)
    order = {"amount": 2500, "currency": "EUR", "source": "cards"}
    settings = PaymentSettings(provider="ledger", dsn=ledger_url, merchant_account="merchant")
    seen: list[ResultSeen] = []
    async with fabric.dispatcher() as dispatcher:
        dispatcher.observe(seen.append)
        # Given a charge that committed on each of its 2 attempts but never said so: it ends
        # FAILED retries_exhausted, a copy in wayang.dead.payment.charge
        async with fabric.worker([_CommitThenLoseTheAnswer(settings)]):
            failed = await dispatcher.run(
                CHARGE,
                order,
                retry=RetryHints(max_attempts=2, initial_backoff_ms=1000),
                wait_s=60,
            )
        assert failed.error is not None
        assert failed.error.code is ErrorCode.RETRIES_EXHAUSTED
        assert _counts(ledger_url) == (1, 2)
        ((charge_id,),) = _sql(ledger_url, "SELECT id FROM wayang_ledger.transfers")
        dead = await list_dead_letters(fabric.endpoint.amqp_url, CHARGE, keyring=fabric.keyring)
        assert failed.task_id in {d.task_id for d in dead}
        # When an operator replays it (`wayang-mq dead replay payment.charge --task ID`) to a
        # healthy worker
        async with fabric.worker([_ledger(ledger_url)]):
            (outcome,) = await replay(
                fabric.endpoint.amqp_url,
                CHARGE,
                keyring=fabric.keyring,
                signer=fabric.signer,
                task_id=failed.task_id,
            )
            assert outcome.replayed, outcome.detail

            def replayed() -> Result | None:
                for s in seen:
                    r = s.result
                    if r is not None and r.task_id == failed.task_id and r.status is Status.SUCCESS:
                        return r
                return None

            await eventually(lambda: replayed() is not None, what="the replay's SUCCESS")
    # Then the replay answered with the charge that happened, and charged nothing more
    result = replayed()
    assert result is not None and result.output is not None
    assert result.output["charge_id"] == charge_id
    assert result.output["already_charged"] is True
    assert _counts(ledger_url) == (1, 2)
    assert _balances(ledger_url)["merchant"] == 2500


# -- refunds, voids and compensation ----------------------------------------------------------


async def test_a_refund_gives_back_once_never_more_than_the_charge(
    fabric: Fabric, ledger_url: str
) -> None:
    await fabric.purge(CHARGE, REFUND)
    async with fabric.worker([_ledger(ledger_url)]), fabric.dispatcher() as dispatcher:
        # Given a charge of 1000
        charged = await dispatcher.run(
            CHARGE,
            {"amount": 1000, "currency": "EUR", "source": "cards"},
            idempotency_key="order-7",
            wait_s=30,
        )
        assert charged.output is not None
        charge_id = charged.output["charge_id"]
        # When 300 of it is refunded, twice under one key, then the rest by the charge's key
        part = [
            await dispatcher.run(
                REFUND, {"charge_id": charge_id, "amount": 300}, idempotency_key="rf-1", wait_s=30
            )
            for _ in range(2)
        ]
        rest = await dispatcher.run(REFUND, {"charge_key": "order-7", "reason": "x"}, wait_s=30)
        # and then one more cent is asked for
        more = await dispatcher.run(REFUND, {"charge_id": charge_id, "amount": 1}, wait_s=30)
    # Then the first key refunded 300 once, the rest was 700, and nothing more is given
    outputs = [r.output for r in part]
    assert outputs[0] is not None and outputs[1] is not None
    assert (outputs[0]["amount"], outputs[0]["already_refunded"]) == (300, False)
    assert outputs[1] == outputs[0] | {"already_refunded": True}
    assert rest.output is not None
    assert (rest.output["amount"], rest.output["charge_id"]) == (700, charge_id)
    assert _reason(more) == (ErrorCode.EXECUTOR_ERROR, False, "refund_exceeds_charge")
    # and every balance is back where it was, the postings still summing to zero
    assert _balances(ledger_url) == {"merchant": 0, "cards": 0}
    assert _counts(ledger_url) == (3, 6)


async def test_a_compensation_voids_a_key_that_never_charged_and_a_late_charge_is_refused(
    fabric: Fabric, ledger_url: str
) -> None:
    with psycopg.connect(ledger_url, autocommit=True) as conn:
        _open_account(conn, "wallet", "EUR")  # empty, may not go negative
    await fabric.purge(CHARGE, REFUND)
    order = {"amount": 900, "currency": "EUR", "source": "wallet"}
    async with fabric.worker([_ledger(ledger_url)]), fabric.dispatcher() as dispatcher:
        # Given a charge whose compensation refunds it by its key, and which fails for good
        failed = await dispatcher.run(
            CHARGE,
            order,
            idempotency_key="order-9",
            compensation=Compensation(
                capability=REFUND, input={"charge_key": "order-9", "reason": "order cancelled"}
            ),
            wait_s=30,
        )
        assert _reason(failed) == (ErrorCode.EXECUTOR_ERROR, False, "insufficient_funds")
        # When the compensation runs
        assert failed.compensation_task_id is not None
        compensated = await dispatcher.result_of(failed.compensation_task_id, 30)
        # and the wallet gets money, and the charge comes again (late, under the same key)
        funded = await dispatcher.run(
            CHARGE,
            {"amount": 900, "currency": "EUR", "source": "cards", "destination": "wallet"},
            wait_s=30,
        )
        assert funded.status is Status.SUCCESS, funded.error
        late = await dispatcher.run(CHARGE, order, idempotency_key="order-9", wait_s=30)
        # and the compensation is repeated
        repeated = await dispatcher.run(REFUND, {"charge_key": "order-9"}, wait_s=30)
    # Then the key was voided: nothing refunded, the late charge refused for good
    assert compensated.status is Status.SUCCESS, compensated.error
    assert compensated.output is not None
    assert compensated.output["voided"] is True and compensated.output["amount"] == 0
    assert compensated.output["already_refunded"] is False
    assert _reason(late) == (ErrorCode.EXECUTOR_ERROR, False, "voided")
    assert repeated.output is not None and repeated.output["already_refunded"] is True
    assert repeated.output["refund_id"] == compensated.output["refund_id"]
    assert _balances(ledger_url)["wallet"] == 900  # only the funding moved money
    assert _counts(ledger_url) == (1, 2)


# -- the http provider -------------------------------------------------------------------------


@dataclass
class FakeStripe:
    """A Stripe-style PaymentIntents API: keeps the first answer per Idempotency-Key and
    replays it (``Idempotent-Replayed: true``); ``fail_next`` 503s come first."""

    fail_next: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        key = request.headers.get("Idempotency-Key", "")
        self.requests.append({"path": request.path, "headers": dict(request.headers), "form": form})
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"error": {"message": "try again"}}, status=503)
        if key in self.answers:
            status, body = self.answers[key]
            return web.json_response(body, status=status, headers={"Idempotent-Replayed": "true"})
        status, body = self._answer(request.path, form)
        self.answers[key] = (status, body)
        return web.json_response(body, status=status)

    def _answer(self, path: str, form: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        n = len(self.answers)
        if path == "/v1/refunds":
            return 200, {"id": f"re_{n}", "amount": int(form.get("amount", 0)), "currency": "eur"}
        if form.get("customer") == "cus_declined":
            error = {"type": "card_error", "code": "card_declined", "decline_code": "do_not_honor"}
            return 402, {"error": error | {"message": "Your card was declined."}}
        return 200, {"id": f"pi_{n}", "status": "succeeded", "amount": int(form["amount"])}


@contextlib.asynccontextmanager
async def _fake_stripe() -> AsyncIterator[FakeStripe]:
    fake = FakeStripe()
    app = web.Application()
    app.router.add_post("/v1/payment_intents", fake.handle)
    app.router.add_post("/v1/refunds", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


async def test_the_http_provider_retries_with_the_same_idempotency_key(fabric: Fabric) -> None:
    await fabric.purge(CHARGE, REFUND)
    order = {"amount": 4200, "currency": "EUR", "source": "cus_1", "metadata": {"order": "42"}}
    async with _fake_stripe() as stripe:
        settings = PaymentSettings(
            provider="http",
            base_url=stripe.url,
            api_key="sk_test_fake",
            max_retries=3,
            retry_backoff_s=0.01,
        )
        async with fabric.worker([Charge(settings)]), fabric.dispatcher() as dispatcher:
            # Given a provider that answers 503 twice before it charges
            stripe.fail_next = 2
            first = await dispatcher.run(CHARGE, order, idempotency_key="order-42", wait_s=30)
            # When another task charges under the same key
            second = await dispatcher.run(CHARGE, order, idempotency_key="order-42", wait_s=30)
            declined = await dispatcher.run(CHARGE, order | {"source": "cus_declined"}, wait_s=30)
            assert first.output is not None
            refunded = await dispatcher.run(
                REFUND, {"charge_id": first.output["charge_id"]}, idempotency_key="r1", wait_s=30
            )
    # Then the 3 tries carried the task's key, each, and the form Stripe expects
    tries = stripe.requests[:3]
    assert [t["headers"]["Idempotency-Key"] for t in tries] == ["order-42"] * 3
    assert {t["headers"]["Authorization"] for t in tries} == {"Bearer sk_test_fake"}
    assert tries[0]["form"] | {} == {
        "amount": "4200",
        "currency": "eur",
        "customer": "cus_1",
        "confirm": "true",
        "metadata[idempotency_key]": "order-42",
        "metadata[order]": "42",
    }
    assert first.status is Status.SUCCESS, first.error
    assert first.output["already_charged"] is False
    # and the second task was answered from the provider's record of the key
    assert stripe.requests[3]["headers"]["Idempotency-Key"] == "order-42"
    assert second.output == first.output | {"already_charged": True}
    # a declined card fails for good, with the provider's decline code
    assert _reason(declined) == (ErrorCode.EXECUTOR_ERROR, False, "card_declined")
    assert declined.error is not None and declined.error.details["decline_code"] == "do_not_honor"
    # and a refund carries a key of its own
    assert refunded.status is Status.SUCCESS, refunded.error
    assert stripe.requests[-1]["headers"]["Idempotency-Key"] == "refund-r1"
    assert stripe.requests[-1]["form"] == {"payment_intent": first.output["charge_id"]}


# -- 1,000 charges through 3 daemons, one of them killed 5 times -----------------------------


PAYERS = 20
CHARGES = 1000
KILLS = 5


def _write_config(tmp_path: Path) -> Path:
    path = tmp_path / "payment.toml"
    path.write_text(
        "[payment.charge]\n"
        'provider = "ledger"\n'
        'dsn = {"$secret" = "ledger-dsn"}\n'
        'merchant_account = "merchant"\n'
        "pool_size = 8\n"
    )
    return path


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_1000_charges_through_3_daemons_one_killed_5_times_charge_each_exactly_once(
    fabric: Fabric, ledger_url: str, tmp_path: Path
) -> None:
    """Why the delivery limit (3 for payment.charge) is not reached: a kill returns the
    victim's unacked deliveries (at most its prefetch, 8) to the queue, where the two other
    workers, which consume all along, take them at once; the victim is back only after it has
    restarted (a couple of seconds), and each life is killed once it has finished 5 charges of
    its own, so a task would have to be held by the victim at 3 of the 5 kills to be
    dead-lettered, which rules it out in practice.
    A reaper runs anyway: a task that did reach the limit would end FAILED ``delivery_limit``
    and fail the assertion below, not hang."""
    with psycopg.connect(ledger_url, autocommit=True) as conn:
        for n in range(PAYERS):
            _open_account(conn, f"card-{n:02}", "EUR", allow_negative=True)
    await fabric.purge(CHARGE)
    await fabric.purge_reaper()
    config = _write_config(tmp_path)
    env = {"WAYANG_SECRET_LEDGER_DSN": ledger_url}
    args = ["--config", str(config), "--secrets", "env", "--concurrency", "8", "--prefetch", "8"]

    def spawn(executor_id: str) -> WorkerProcess:
        return fabric.spawn_worker(
            ["wayang_workers.payment:Charge"], executor_id=executor_id, args=args, env=env
        )

    rng = random.Random(13)
    amounts = [rng.randint(1, 100_000) for _ in range(CHARGES)]
    suffix = f"{random.randrange(16**6):06x}"
    steady = [spawn(f"pay-{n}-{suffix}") for n in (1, 2)]
    victims = [spawn(f"pay-0-{suffix}-life-0")]
    try:
        for worker in [*steady, *victims]:
            await asyncio.to_thread(worker.wait_started, 60)
        async with fabric.reaper(), fabric.dispatcher() as dispatcher:
            # Given 1,000 charges from one dispatcher, 64 in flight at most, released in 6
            # waves: a wave goes once the victim (re)started, so each life has work to hold
            done: list[Result] = []
            gate = asyncio.Semaphore(64)
            waves = [asyncio.Event() for _ in range(KILLS + 1)]
            wave_size = -(-CHARGES // len(waves))

            async def charge(n: int) -> None:
                await waves[n // wave_size].wait()
                async with gate:
                    result = await dispatcher.run(
                        CHARGE,
                        {
                            "amount": amounts[n],
                            "currency": "EUR",
                            "source": f"card-{n % PAYERS:02}",
                        },
                        queue_timeout_s=240,
                        retry=RetryHints(max_attempts=3, initial_backoff_ms=1000),
                        wait_s=240,
                    )
                done.append(result)

            running = asyncio.gather(*(charge(n) for n in range(CHARGES)))
            waves[0].set()
            # When one daemon is killed with SIGKILL 5 times, each time in the middle of its
            # charges (once it finished 5 of its life), and restarted each time
            for life in range(1, KILLS + 1):
                victim = victims[-1]
                await eventually(
                    lambda victim=victim: victim.log().count("event=task.finished") >= 5,
                    timeout_s=60,
                    what=f"{victim.executor_id} charging",
                )
                victim.signal(signal.SIGKILL)
                assert await asyncio.to_thread(victim.wait) == -signal.SIGKILL
                victims.append(spawn(f"pay-0-{suffix}-life-{life}"))
                await asyncio.to_thread(victims[-1].wait_started, 60)
                waves[life].set()
            await asyncio.wait_for(running, 240)
    finally:
        fabric.stop_processes()
    # Then every task succeeded, each with a charge of its own
    assert [r.status for r in done] == [Status.SUCCESS] * CHARGES, [
        r.error for r in done if r.error
    ][:3]
    outputs = [r.output for r in done if isinstance(r.output, dict)]
    charge_ids = {o["charge_id"] for o in outputs}
    assert len(charge_ids) == CHARGES
    # and the ledger holds exactly 1,000 charges, 2,000 postings, those charges and no other
    assert _counts(ledger_url) == (CHARGES, 2 * CHARGES)
    stored = {row[0] for row in _sql(ledger_url, "SELECT id FROM wayang_ledger.transfers")}
    assert stored == charge_ids
    # and the money adds up: balances sum to zero, the merchant holds every amount charged
    balances = _balances(ledger_url)
    assert sum(balances.values()) == 0
    assert balances["merchant"] == sum(amounts)
    ((unbalanced,),) = _sql(
        ledger_url,
        "SELECT count(*) FROM (SELECT transfer_id FROM wayang_ledger.postings"
        " GROUP BY transfer_id HAVING sum(amount) <> 0 OR count(*) <> 2) t",
    )
    assert unbalanced == 0
    # and the kills hit work in flight: tasks the victims started and never finished were
    # run again elsewhere, and charged once all the same
    killed = victims[:-1]
    cut_short = set()
    for victim in killed:
        log = victim.log()
        started = _task_ids(log, "event=task.started")
        finished = _task_ids(log, "event=task.finished")
        cut_short |= started - finished
    assert cut_short, "no kill caught a charge in flight"
    by_task = {r.task_id: r for r in done}
    assert all(by_task[t].status is Status.SUCCESS for t in cut_short)


def _task_ids(log: str, event: str) -> set[str]:
    ids = set()
    for line in log.splitlines():
        if event in line:
            for part in line.split():
                if part.startswith("task_id="):
                    ids.add(part.removeprefix("task_id="))
    return ids
