"""Secrets by reference: tasks carry ``{"$secret": name}``, workers resolve them through their
providers, and no value leaves the worker (docs/security.md §8).

Pure parts (references, the Secret value, redaction, providers, the Fernet file and its CLI)
need no broker; the runtime parts and the canary run against the real one: a random canary
secret, the broker's password and a database password are driven through every failure path
of a worker daemon, and none of them may appear in its logs, the reaper's, the results, the
events or the dead letters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import secrets
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import msgpack
import psycopg
import pytest
from cryptography.fernet import Fernet

from wayang_mq import ErrorCode, Executor, ExecutorError, RetryHints, Status, Task, current
from wayang_mq.core import logs, names
from wayang_mq.core.errors import ConfigError
from wayang_mq.core.model import JsonLike
from wayang_mq.core.redact import RedactingFilter, Redactor
from wayang_mq.security.providers import (
    DirectoryProvider,
    EnvProvider,
    FernetFileProvider,
    MappingProvider,
    ProviderChain,
    env_variable,
    from_spec,
    read_secrets_file,
    write_secrets_file,
)
from wayang_mq.security.secrets import (
    BadReference,
    Resolver,
    Secret,
    SecretUnavailable,
    references,
    substitute,
    valid_name,
)
from wayang_mq.testing.harness import Fabric, WorkerProcess

CANARY = "canary-" + secrets.token_hex(16)


# -- references and the Secret value -------------------------------------------------------------


def test_references_are_found_at_any_depth_and_replaced_by_secret_values() -> None:
    # Given an input with references in maps and arrays
    task_input = {
        "url": "https://api.example.com",
        "headers": {"authorization": {"$secret": "stripe"}},
        "dsns": [{"$secret": "db.main"}, "plain", {"nested": [{"$secret": "stripe"}]}],
    }
    # When its references are read and substituted
    names_ = references(task_input)
    found = {"stripe": Secret("stripe", "sk_live_1"), "db.main": Secret("db.main", "pg://x")}
    resolved = substitute(task_input, found)
    # Then each name is found once, and each reference is now its Secret
    assert names_ == {"stripe", "db.main"}
    assert resolved["headers"]["authorization"] is found["stripe"]
    assert resolved["dsns"][0] is found["db.main"] and resolved["dsns"][1] == "plain"
    assert resolved["dsns"][2]["nested"][0] is found["stripe"]
    assert task_input["headers"]["authorization"] == {"$secret": "stripe"}  # a copy


@pytest.mark.parametrize(
    "bad",
    [
        {"$secret": "stripe", "extra": 1},  # more than the one key
        {"$secret": 5},
        {"$secret": ""},
        {"$secret": ".hidden"},
        {"$secret": "a/b"},
        {"$secret": "x" * 129},
        {"$secret": "sk_live_0123456789 with spaces"},  # a value pasted where the name goes
    ],
)
def test_a_map_holding_the_secret_key_that_is_not_a_reference_is_refused_without_echo(
    bad: dict[str, Any],
) -> None:
    with pytest.raises(BadReference) as refused:
        references({"a": [bad]})
    assert refused.value.code is ErrorCode.INVALID_TASK
    assert "input.a[0]" in refused.value.message
    assert "sk_live" not in refused.value.one_line()


def test_secret_names_charset_and_length() -> None:
    assert all(valid_name(n) for n in ("stripe", "DB_PASSWORD", "db.main-1", "a", "x" * 128))
    assert not any(valid_name(n) for n in ("", "-a", ".a", "a b", "a/b", "é", "x" * 129, 5))


def test_a_secret_shows_its_name_never_its_value_and_cannot_be_serialised() -> None:
    secret = Secret("stripe", "sk_live_value")
    shown = [str(secret), repr(secret), f"{secret}", f"{secret}", str([secret]), str({1: secret})]
    assert all("sk_live_value" not in text and "stripe" in text for text in shown)
    assert secret.reveal() == "sk_live_value"
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        msgpack.packb({"k": secret})
    with pytest.raises(TypeError):
        json.dumps({"k": secret})


# -- redaction ------------------------------------------------------------------------------------


def test_the_redactor_cuts_values_out_of_text_values_and_their_escaped_forms() -> None:
    redactor = Redactor()
    value = 'pa"ss\nword\\x'
    redactor.add("pw", value)
    redactor.add("short", "abc")  # too short to redact: ignored
    assert not Redactor()  # empty: a no-op
    for form in (value, repr(value), json.dumps(value), logs.line("e", v=value)):
        assert redactor.text(f"<{form}>").count("[secret:pw]") == 1, form
    redacted = redactor.value({value: [value, value.encode(), 3, None], "k": (f"x{value}y",)})
    assert redacted == {
        "[secret:pw]": ["[secret:pw]", b"[secret:pw]", 3, None],
        "k": ("x[secret:pw]y",),
    }
    assert redactor.found_in(msgpack.packb({"a": [value]}))
    assert not redactor.found_in(msgpack.packb({"a": "abc"}))
    assert redactor.text("abc") == "abc"


def test_the_logging_filter_redacts_messages_arguments_and_tracebacks() -> None:
    redactor = Redactor()
    redactor.add("canary", CANARY)
    record_logger = logging.getLogger("tests.secrets.filter")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.addFilter(RedactingFilter(redactor))
    handler.setFormatter(logs.PrintableFormatter("%(message)s"))
    record_logger.addHandler(handler)
    try:
        record_logger.warning("key=%s", CANARY)
        try:
            raise ValueError(f"bad {CANARY!r}")
        except ValueError:
            record_logger.exception("failed %r", {"k": CANARY}, stack_info=True)
    finally:
        record_logger.removeHandler(handler)
    text = "\n".join(lines)
    assert CANARY not in text
    assert text.count("[secret:canary]") >= 3 and "ValueError" in text


# -- providers ----------------------------------------------------------------------------------


async def test_env_provider_maps_names_to_prefixed_variables() -> None:
    provider = EnvProvider("APP_SECRET_", {"APP_SECRET_DB_MAIN": "v1", "APP_SECRET_X": "v2"})
    assert env_variable("db.main", "APP_SECRET_") == "APP_SECRET_DB_MAIN"
    assert await provider.get("db.main") == "v1"
    assert await provider.get("db-main") == "v1"
    assert await provider.get("missing") is None
    assert env_variable("stripe") == "WAYANG_SECRET_STRIPE"


async def test_directory_provider_reads_one_file_per_secret(tmp_path: Path) -> None:
    (tmp_path / "stripe").write_text("sk_live_1\n")
    (tmp_path / "pem").write_text("-----BEGIN-----\nabc\n-----END-----\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    provider = DirectoryProvider(tmp_path)
    assert await provider.get("stripe") == "sk_live_1"  # one trailing newline dropped
    assert await provider.get("pem") == "-----BEGIN-----\nabc\n-----END-----"
    assert await provider.get("missing") is None
    assert await provider.get("../etc/passwd") is None  # not a name: never leaves the directory
    with pytest.raises(SecretUnavailable, match="not UTF-8"):
        await provider.get("binary")


async def test_fernet_file_provider_rereads_the_file_when_it_changes(tmp_path: Path) -> None:
    key = Fernet.generate_key()
    path = tmp_path / "secrets.enc"
    write_secrets_file(path, Fernet(key), {"stripe": "sk_live_1"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"sk_live_1" not in path.read_bytes()
    provider = FernetFileProvider(path, key)
    assert await provider.get("stripe") == "sk_live_1"
    write_secrets_file(path, Fernet(key), {"stripe": "sk_live_2", "db": "pg-pass"})
    assert await provider.get("stripe") == "sk_live_2" and await provider.get("db") == "pg-pass"
    assert await provider.get("missing") is None
    with pytest.raises(SecretUnavailable, match="cannot be decrypted"):
        await FernetFileProvider(path, Fernet.generate_key()).get("stripe")


async def test_a_chain_answers_from_the_first_provider_that_knows_the_name() -> None:
    chain = ProviderChain(
        [MappingProvider({"a": "first"}), MappingProvider({"a": "x", "b": "second"})]
    )
    assert (await chain.get("a"), await chain.get("b"), await chain.get("c")) == (
        "first",
        "second",
        None,
    )


class Flaky:
    """A Vault-like provider whose store is down."""

    async def get(self, name: str) -> str | None:
        raise ConnectionError("vault.internal:8200 did not answer")


async def test_the_resolver_names_the_secret_never_a_value_and_says_what_may_pass() -> None:
    redactor = Redactor()
    resolver = Resolver(MappingProvider({"ok": "long-enough", "tiny": "abc"}), redactor)
    assert (await resolver.resolve(["ok"]))["ok"].reveal() == "long-enough"
    assert redactor.text("x long-enough") == "x [secret:ok]"  # registered before handed out
    with pytest.raises(SecretUnavailable, match="'missing' is not known") as unknown:
        await resolver.resolve(["missing"])
    assert not unknown.value.retryable
    with pytest.raises(SecretUnavailable, match="too short"):
        await resolver.resolve(["tiny"])
    with pytest.raises(SecretUnavailable, match=r"not allowed for capability 'http\.call'"):
        await resolver.resolve(["ok"], ("db.*",), capability="http.call")
    with pytest.raises(SecretUnavailable, match="provider failed") as down:
        await Resolver(Flaky(), redactor).resolve(["ok"])
    assert down.value.retryable  # an outage may pass: the task's retry hints apply


def test_provider_specs_are_checked_when_the_worker_starts(tmp_path: Path) -> None:
    key = Fernet.generate_key()
    write_secrets_file(tmp_path / "s.enc", Fernet(key), {"a": "abcd"})
    assert isinstance(from_spec("env", lambda: key), EnvProvider)
    assert isinstance(from_spec(f"dir:{tmp_path}", lambda: key), DirectoryProvider)
    assert isinstance(from_spec(f"fernet:{tmp_path / 's.enc'}", lambda: key), FernetFileProvider)
    assert isinstance(from_spec("class:tests.test_secrets:Flaky", lambda: key), Flaky)
    for bad in (
        "vault",
        f"dir:{tmp_path / 'none'}",
        f"fernet:{tmp_path / 'none'}",
        "class:tests.test_secrets:Caller",  # not a provider
    ):
        with pytest.raises(ConfigError):
            from_spec(bad, lambda: key)
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        from_spec(f"fernet:{tmp_path / 's.enc'}", Fernet.generate_key)


# -- the Fernet CLI -----------------------------------------------------------------------------


def wayang(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "wayang_mq.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_the_secrets_cli_edits_the_encrypted_file_and_never_prints_a_value(tmp_path: Path) -> None:
    key_file, path = tmp_path / "secrets.key", tmp_path / "secrets.enc"
    env = {"WAYANG_SECRETS_KEY_FILE": str(key_file)}
    # Given a key
    made = wayang("secrets", "keygen", "--out", str(key_file))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert wayang("secrets", "keygen", "--out", str(key_file)).returncode == 2  # never replaced
    # When two secrets are set from stdin, one replaced, one removed
    outputs = [
        wayang("secrets", "set", "stripe", "--file", str(path), stdin=f"{CANARY}\n", env=env),
        wayang("secrets", "set", "db", "--file", str(path), stdin="first-value", env=env),
        wayang("secrets", "set", "db", "--file", str(path), stdin="pg-password", env=env),
        wayang("secrets", "set", "gone", "--file", str(path), stdin="soon-gone", env=env),
        wayang("secrets", "rm", "gone", "--file", str(path), env=env),
    ]
    listed = wayang("secrets", "list", "--file", str(path), env=env)
    # Then the file holds them, encrypted, and no output showed a value
    assert all(o.returncode == 0 for o in [*outputs, listed]), [o.stderr for o in outputs]
    assert listed.stdout.split() == ["db", "stripe"]
    assert read_secrets_file(path, Fernet(key_file.read_bytes())) == {
        "stripe": CANARY,
        "db": "pg-password",
    }
    printed = "".join(o.stdout + o.stderr for o in [*outputs, listed])
    assert CANARY not in printed and "pg-password" not in printed and "first-value" not in printed
    assert CANARY.encode() not in path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # and mistakes are one line, exit 2
    for refused in (
        wayang("secrets", "rm", "missing", "--file", str(path), env=env),
        wayang("secrets", "set", "bad name", "--file", str(path), stdin="abcd", env=env),
        wayang("secrets", "set", "short", "--file", str(path), stdin="abc", env=env),
        wayang("secrets", "list", "--file", str(path)),  # no key
        wayang("secrets", "list", "--file", str(path), "--key-file", str(tmp_path / "nokey")),
    ):
        assert refused.returncode == 2 and refused.stderr.startswith("wayang-mq: error:")


# -- the runtime: what the executor sees, and what each failure answers (real broker) ------------


class Caller(Executor):
    """``http.call``: reports what it received, never a value."""

    serves = ("http.call",)
    allowed_secrets = ("api.*", "other")

    async def execute(self, task: Task) -> JsonLike:
        ctx = current()
        token = task.input["headers"]["token"]
        assert isinstance(token, Secret) and ctx.secret("api.token") is token
        if task.input.get("objects"):  # Secret objects where messages are encoded
            await ctx.progress(0.5, f"{token}", key=token)
            ctx.heartbeat(keys=[token])
            assert ctx.last_progress is not None
            raise ExecutorError(
                "failed on purpose",
                retryable=False,
                details={
                    "key": token,
                    "progress": ctx.last_progress.details,
                    "heartbeat": ctx.heartbeat_details,
                },
            )
        if task.input.get("ask_unreferenced"):
            ctx.secret("other")  # not referenced by this task: fails secret_unavailable
        return {
            "shown_as": f"{token}",
            "length": len(token.reveal()),
            "names": sorted(ctx.secrets),
            "leak": token.reveal(),
        }


@pytest.fixture
async def caller_fabric(fabric: Fabric) -> AsyncIterator[Fabric]:
    await fabric.purge("http.call")
    yield fabric
    await fabric.purge("http.call")


async def test_an_executor_gets_secret_values_and_its_output_is_redacted(
    caller_fabric: Fabric,
) -> None:
    value = "tok-" + secrets.token_hex(8)
    provider = MappingProvider({"api.token": value, "db.password": "not-for-http"})
    ref = {"$secret": "api.token"}
    async with (
        caller_fabric.worker([Caller()], secrets=provider),
        caller_fabric.dispatcher() as dispatcher,
    ):
        ok = await dispatcher.run("http.call", {"headers": {"token": ref}}, wait_s=30)
        unknown = await dispatcher.run(
            "http.call", {"headers": {"token": {"$secret": "api.x"}}}, wait_s=30
        )
        not_allowed = await dispatcher.run(
            "http.call", {"headers": {"token": ref}, "db": {"$secret": "db.password"}}, wait_s=30
        )
        unreferenced = await dispatcher.run(
            "http.call", {"headers": {"token": ref}, "ask_unreferenced": True}, wait_s=30
        )
        objects = await dispatcher.run(
            "http.call", {"headers": {"token": ref}, "objects": True}, wait_s=30
        )
        malformed = await dispatcher.run(
            "http.call", {"headers": {"token": {"$secret": "api.token", "x": 1}}}, wait_s=30
        )
    assert ok.status is Status.SUCCESS
    assert ok.output == {
        "shown_as": "[secret:api.token]",
        "length": len(value),
        "names": ["api.token"],
        "leak": "[secret:api.token]",
    }
    assert objects.error is not None and objects.error.details == {
        "key": "[secret:api.token]",
        "progress": {"key": "[secret:api.token]"},
        "heartbeat": {"keys": ["[secret:api.token]"]},
    }
    for failed, code, text in (
        (unknown, ErrorCode.SECRET_UNAVAILABLE, "'api.x' is not known"),
        (not_allowed, ErrorCode.SECRET_UNAVAILABLE, "'db.password' is not allowed"),
        (unreferenced, ErrorCode.SECRET_UNAVAILABLE, "'other' is not referenced"),
        (malformed, ErrorCode.INVALID_TASK, "input.headers.token holds '$secret'"),
    ):
        assert failed.status is Status.FAILED and failed.error is not None
        assert (failed.error.code, failed.error.retryable) == (code, False)
        assert text in failed.error.message


async def test_a_worker_without_providers_fails_tasks_that_reference_secrets(
    caller_fabric: Fabric,
) -> None:
    async with caller_fabric.worker([Caller()]), caller_fabric.dispatcher() as dispatcher:
        result = await dispatcher.run(
            "http.call", {"headers": {"token": {"$secret": "api.token"}}}, wait_s=30
        )
    assert result.error is not None and result.error.code is ErrorCode.SECRET_UNAVAILABLE
    assert "no secret providers" in result.error.message


# -- the canary: every failure path of a daemon, zero occurrences anywhere ----------------------


def _spawn_reaper(fabric: Fabric, env: dict[str, str]) -> WorkerProcess:
    """``wayang-mq reaper`` as its own process, logging to a file."""
    reaper_id = f"reaper-secrets-{secrets.token_hex(3)}"
    log_path = fabric.workdir / f"{reaper_id}.log"
    environment = {
        **os.environ,
        "WAYANG_AMQP_URL": fabric.endpoint.amqp_url,
        "WAYANG_KEY_DIR": str(fabric.key_dir),
        **env,
    }
    command = [sys.executable, "-m", "wayang_mq.cli", "--log-level", "DEBUG"]
    command += ["--log-format", "text", "reaper"]  # as the harness's daemons: readable text
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [*command, "--id", reaper_id],
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    spawned = WorkerProcess(reaper_id, process, log_path)
    fabric.processes.append(spawned)
    return spawned


async def _drain(channel: aio_pika.abc.AbstractChannel, queue_name: str) -> list[bytes]:
    """Every message of a queue, body and headers as bytes."""
    queue = await channel.get_queue(queue_name, ensure=False)
    taken: list[bytes] = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        taken.append(message.body + repr(message.headers).encode() + repr(message.info()).encode())
    return taken


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _tables_text(database_url: str) -> str:
    """Every row of every user table, as text (the product writes none yet: the check is
    here for when the control plane does)."""
    with psycopg.connect(database_url) as connection:
        tables = connection.execute(
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) "
            "FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        return "\n".join(
            str(row) for (table,) in tables for row in connection.execute(f"SELECT * FROM {table}")
        )


async def test_canaries_appear_nowhere_after_every_failure_path(
    fabric: Fabric, postgres: str
) -> None:
    db_password = "dbpw-" + secrets.token_hex(12)
    database_url = _with_password(postgres, db_password)
    canaries = {
        "task secret": CANARY,
        "broker password": fabric.endpoint.password,
        "database password": db_password,
    }
    env = {"WAYANG_SECRET_CANARY": CANARY, "WAYANG_DATABASE_URL": database_url}
    ref = {"$secret": "canary"}
    await fabric.purge("payment.charge")
    await fabric.purge_reaper()
    connection = await aio_pika.connect(fabric.endpoint.amqp_url)
    async with connection:
        channel = await connection.channel()
        events = await channel.declare_queue(exclusive=True)
        await events.bind(names.EVENTS_EXCHANGE, "#")
        reaper = _spawn_reaper(fabric, env)
        await reaper.until_logged("event=reaper.started")
        async with fabric.dispatcher(supervision=None) as dispatcher:
            # Given a task that expires queued (no worker yet): the broker dead-letters it and
            # the reaper answers it
            expired = await dispatcher.submit(
                "payment.charge", {"mode": "output", "key": ref}, queue_timeout_s=0.3
            )
            results = [await expired.result(30)]
            # and a worker daemon resolving secrets from its environment
            worker = fabric.spawn_worker(
                ["tests.secret_executors:Leaky"],
                executor_id=f"leaky-{secrets.token_hex(3)}",
                args=["--secrets", "env"],
                env=env,
            )
            await asyncio.to_thread(worker.wait_started)
            # When tasks leak the secret in every way an executor can
            for mode in (
                "output",
                "raise",
                "progress",
                "heartbeat",
                "credentials",
                "secret_object",
            ):
                results.append(
                    await dispatcher.run("payment.charge", {"mode": mode, "key": ref}, wait_s=30)
                )
            retry = RetryHints(max_attempts=2, initial_backoff_ms=100)
            results.append(
                await dispatcher.run(
                    "payment.charge", {"mode": "retry", "key": ref}, retry=retry, wait_s=60
                )
            )
            results.append(
                await dispatcher.run(
                    "payment.charge", {"mode": "timeout", "key": ref}, timeout_s=0.5, wait_s=30
                )
            )
        await worker.until_logged("event=task.finished")
        worker.stop()
        reaper.stop()
        dead = await _drain(channel, names.dead_queue("payment.charge"))
        published = await _drain(channel, events.name)
    # Then each path ran as intended
    expired_answer, output, raised, progressed, heartbeat, credentials, objected, retried, hung = (
        results
    )
    assert expired_answer.error is not None and expired_answer.error.code is ErrorCode.TIMEOUT
    assert expired_answer.executor_id == reaper.executor_id
    assert output.status is Status.SUCCESS and output.output["echo"] == "[secret:canary]"
    assert output.output["nested"] == [{"k": b"[secret:canary]"}]
    assert output.logs == ("the key is [secret:canary]",)
    assert raised.error is not None and "[secret:canary]" in raised.error.message
    assert progressed.status is heartbeat.status is Status.SUCCESS
    assert credentials.error is not None and "[secret:broker-password]" in credentials.error.message
    assert "[secret:database-password]" in credentials.error.message
    assert objected.error is not None and objected.error.code is ErrorCode.INVALID_RESULT
    assert retried.error is not None and retried.error.code is ErrorCode.RETRIES_EXHAUSTED
    assert "[secret:canary]" in json.dumps(retried.error.details)
    assert hung.error is not None and hung.error.code is ErrorCode.TIMEOUT
    assert len(dead) >= 2  # the expired task, the exhausted one
    everything_published = b"".join(published)
    assert b"wayang.progress.v1" in everything_published
    assert b"authorised with [secret:canary]" in everything_published
    assert b"[secret:canary]" in everything_published  # heartbeat details, attempt events
    logged = worker.log() + reaper.log()
    assert "[secret:canary]" in logged and "[secret:broker-password]" in logged
    # and no canary is anywhere
    places = {
        "worker and reaper logs": logged.encode(),
        "results": "".join(r.model_dump_json() + repr(r) for r in results).encode(),
        "events": everything_published,
        "dead letters": b"".join(dead),
        "PostgreSQL tables": _tables_text(database_url).encode(),
    }
    leaks = [
        f"{label} in {place}"
        for label, value in canaries.items()
        for place, data in places.items()
        if value.encode() in data
    ]
    assert leaks == []


def test_the_worker_settings_chain_providers_and_keep_passwords_out_of_logs(
    tmp_path: Path,
) -> None:
    from wayang_mq.config import Settings, redact_credentials, secret_provider
    from wayang_mq.core.redact import REDACTOR

    key = Fernet.generate_key()
    write_secrets_file(tmp_path / "s.enc", Fernet(key), {"a": "abcd"})
    settings = Settings(
        secrets=f"env:APP_, fernet:{tmp_path / 's.enc'}",
        secrets_key=key.decode(),
        database_url="postgresql://u:p%40ss-word@db:5432/x",
    )
    chained = secret_provider(settings)
    assert isinstance(chained, ProviderChain)
    assert [type(p) for p in chained.providers] == [EnvProvider, FernetFileProvider]
    assert isinstance(secret_provider(settings, ["env"]), EnvProvider)  # --secrets wins
    assert secret_provider(Settings()) is None
    redact_credentials(settings)
    text = f"postgresql://u:p%40ss-word@db p@ss-word {key.decode()}"
    assert REDACTOR.text(text) == (
        "postgresql://u:[secret:database-password]@db [secret:database-password] "
        "[secret:secrets-key]"
    )


def test_references_are_found_in_an_input_nested_past_the_recursion_limit() -> None:
    # Given an input nested deeper than Python's recursion limit (msgpack allows it; the
    # fuzzing found a valid task like this failing with RecursionError before it ran)
    deep: Any = [{"$secret": "stripe"}]
    for _ in range(sys.getrecursionlimit() * 3):
        deep = [deep]
    # When its references are collected, Then the walk neither recurses nor misses one
    assert references({"a": deep}) == frozenset({"stripe"})
