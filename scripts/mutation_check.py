"""Mutation check: every guarantee's test must fail when the guarantee's code is removed.

``scripts/mutations.toml`` lists, per guarantee, one mutation of the product code (a line
deleted, a condition inverted) and the test that must catch it. For each entry this script
restores a scratch copy of the tree, applies that one mutation, runs that test against a real
RabbitMQ, and records whether the test failed (the mutant is *killed*) or passed (it
*survived*: the promise is unguarded). Exit status: 0 when every mutant was killed, 1 when one
survived, 2 when the check itself could not run (a stale table, a test failing unmutated).

Before any mutation the listed tests run once unmutated: a test that fails on the real code
would "kill" every mutant and prove nothing.

Run it with ``./scripts/mutation-check`` (``--list`` shows the table, ``--only TEXT`` picks
entries whose guarantee, file or test contains TEXT).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "scripts" / "mutations.toml"
#: a mutant whose test runs longer than this is stopped and counted as killed (it hung)
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Mutant:
    """One guarantee, the change that removes it, and the test that must notice."""

    guarantee: str
    file: str
    find: str
    replace: str
    test: str
    own_broker: bool = False  # the test stops, kills or restarts the broker itself
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def test_file(self) -> str:
        """The test's file, relative to the checkout."""
        return self.test.split("::", 1)[0]

    def label(self) -> str:
        """How the mutant is named in progress lines."""
        return f"{self.guarantee} ({self.file})"


@dataclass(frozen=True)
class Verdict:
    """What happened to one mutant."""

    mutant: Mutant
    outcome: str  # killed | survived | error
    seconds: float
    detail: str = ""


class TableError(Exception):
    """The mutation table does not match the code: fix the table, not the check."""


def load_table(path: Path = TABLE) -> list[Mutant]:
    """Every entry of the table, each checked against the checkout."""
    data = tomllib.loads(path.read_text())
    mutants = [Mutant(**entry) for entry in data.get("mutant", [])]
    problems = [p for m in mutants for p in _problems(m)]
    if problems:
        raise TableError("\n".join(problems))
    return mutants


def _problems(mutant: Mutant) -> list[str]:
    source = ROOT / mutant.file
    if not source.is_file():
        return [f"{mutant.guarantee}: no file {mutant.file}"]
    count = source.read_text().count(mutant.find)
    out = []
    if count != 1:
        out.append(f"{mutant.guarantee}: the snippet occurs {count} times in {mutant.file}")
    if mutant.find == mutant.replace:
        out.append(f"{mutant.guarantee}: the mutation changes nothing")
    if not (ROOT / mutant.test_file).is_file():
        out.append(f"{mutant.guarantee}: no test file {mutant.test_file}")
    return out


# -- the scratch copy -----------------------------------------------------------------------


def tracked_files() -> list[str]:
    """The files of the checkout, committed or not (ignored ones left out)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [name for name in out.split("\0") if name and (ROOT / name).is_file()]


def make_scratch(into: Path) -> Path:
    """A copy of the checkout to mutate; the checkout itself is never touched."""
    for name in tracked_files():
        target = into / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    # workers/ installs as wayang_workers, and the editable install points that name at the
    # checkout's workers/: a link makes the scratch copy's the one imported (tests and daemons)
    (into / ".import").mkdir(exist_ok=True)
    (into / ".import" / "wayang_workers").symlink_to(into / "workers", target_is_directory=True)
    return into


@contextlib.contextmanager
def mutated(scratch: Path, mutant: Mutant) -> Iterator[None]:
    """Apply one mutation to the scratch copy for the duration of the block."""
    path = scratch / mutant.file
    original = path.read_text()
    path.write_text(original.replace(mutant.find, mutant.replace, 1))
    try:
        yield
    finally:
        path.write_text(original)


# -- running tests ----------------------------------------------------------------------------


def run_tests(
    scratch: Path, tests: list[str], env: dict[str, str], timeout_s: float
) -> tuple[int | None, str]:
    """Run pytest on ``tests`` in the scratch copy: (exit code or None on timeout, output)."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    process = subprocess.Popen(
        command,
        cwd=scratch,
        env={**env, "PYTHONPATH": f"{scratch / '.import'}{os.pathsep}{scratch}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # one process group: daemons a test leaves behind die with it
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        output, code = b"", None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if code is None:
        process.wait()
    return code, output.decode(errors="replace")


def judge(mutant: Mutant, code: int | None, output: str, seconds: float) -> Verdict:
    """Killed when the test failed or hung; survived when it passed; error otherwise."""
    tail = _summary(output)
    if code is None:
        return Verdict(mutant, "killed", seconds, f"timed out after {mutant.timeout_s:.0f} s")
    if code == 1:
        return Verdict(mutant, "killed", seconds, f"{tail}: {_first_error(output)}")
    if code == 0 and " passed" in tail:
        return Verdict(mutant, "survived", seconds, tail)
    return Verdict(mutant, "error", seconds, f"pytest exit {code}: {tail}\n{output[-3000:]}")


def _first_error(output: str) -> str:
    """The first assertion or exception line pytest printed: why the mutant was caught."""
    for line in output.splitlines():
        if line.startswith("E "):
            return line[1:].strip()[:200]
    return "(no error line)"


def _summary(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "(no output)"


# -- the check ------------------------------------------------------------------------------


@contextlib.contextmanager
def shared_broker(workdir: Path) -> Iterator[dict[str, str]]:
    """One private RabbitMQ node for the mutants that do not restart it (saves a boot each)."""
    if os.environ.get("WAYANG_AMQP_URL"):
        yield {}
        return
    sys.path.insert(0, str(ROOT))
    from wayang_mq.testing.plugin import local_rabbitmq

    with local_rabbitmq(workdir / "broker", clean_shutdown=False) as broker:
        yield {
            "WAYANG_AMQP_URL": broker.amqp_url,
            "WAYANG_MANAGEMENT_URL": broker.management_url,
        }


def baseline(scratch: Path, mutants: list[Mutant], env: dict[str, str]) -> str | None:
    """Run every listed test once, unmutated; the failure output when one fails."""
    tests = sorted({m.test for m in mutants})
    print(f"==> baseline: {len(tests)} test(s) on the unmutated code", flush=True)
    started = time.monotonic()
    code, output = run_tests(scratch, tests, env, timeout_s=30 * 60)
    print(f"    {_summary(output)} ({time.monotonic() - started:.0f} s)", flush=True)
    return None if code == 0 else output[-6000:]


def check(mutants: list[Mutant], jobs: int = 1) -> list[Verdict]:
    """Apply each mutant alone, run its test, and judge it; ``jobs`` lanes at a time.

    Each lane has a scratch copy and a broker of its own, so two mutants never share a file
    or a queue. Most of a mutant's time is a test waiting for what the mutation broke, so a
    second lane nearly halves the run even on 2 cores.
    """
    verdicts: dict[int, Verdict] = {}
    todo: queue.SimpleQueue[tuple[int, Mutant]] = queue.SimpleQueue()
    for item in enumerate(mutants, 1):
        todo.put(item)
    printing = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="wayang-mutants-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "CI": "true"}
        failure = baseline(make_scratch(root / "tree-0"), mutants, env)
        if failure is not None:
            raise TableError(f"a listed test fails on the unmutated code:\n{failure}")

        def lane(number: int) -> None:
            scratch = root / f"tree-{number}"
            if not scratch.exists():
                make_scratch(scratch)
            with shared_broker(root / f"lane-{number}") as broker_env:
                while True:
                    try:
                        n, mutant = todo.get_nowait()
                    except queue.Empty:
                        return
                    verdict = run_mutant(scratch, mutant, env, broker_env)
                    with printing:
                        verdicts[n] = verdict
                        print(
                            f"[{n:>3}/{len(mutants)}] {verdict.outcome.upper():8} "
                            f"{mutant.label()}  <- {mutant.test} ({verdict.seconds:.0f} s)\n"
                            f"          {verdict.detail}",
                            flush=True,
                        )

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for done in [pool.submit(lane, number) for number in range(jobs)]:
                done.result()
    return [verdicts[n] for n in sorted(verdicts)]


def run_mutant(
    scratch: Path, mutant: Mutant, env: dict[str, str], broker_env: dict[str, str]
) -> Verdict:
    """One mutant in one lane: apply, run its test, restore, judge."""
    run_env = env if mutant.own_broker else {**env, **broker_env}
    started = time.monotonic()
    with mutated(scratch, mutant):
        code, output = run_tests(scratch, [mutant.test], run_env, mutant.timeout_s)
    return judge(mutant, code, output, time.monotonic() - started)


def report(verdicts: list[Verdict]) -> int:
    """Print the summary; the exit status."""
    by = {o: [v for v in verdicts if v.outcome == o] for o in ("killed", "survived", "error")}
    print(
        f"==> {len(by['killed'])} killed, {len(by['survived'])} survived, "
        f"{len(by['error'])} could not run, of {len(verdicts)} mutants"
    )
    for verdict in by["survived"]:
        print(
            f"SURVIVED: {verdict.mutant.guarantee}\n  unguarded: {verdict.mutant.file}: "
            f"{verdict.mutant.find.strip()!r}\n  test that should catch it: {verdict.mutant.test}"
        )
    if by["error"]:
        return 2
    return 1 if by["survived"] else 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the check."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="entries whose guarantee, file or test contains TEXT")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument(
        "--jobs", type=int, default=2, help="mutants run at once, each lane with its own broker"
    )
    args = parser.parse_args(argv)
    try:
        mutants = load_table()
    except TableError as exc:
        print(f"error: scripts/mutations.toml does not match the code:\n{exc}", file=sys.stderr)
        return 2
    if args.only:
        wanted = re.compile(re.escape(args.only), re.I)
        mutants = [m for m in mutants if wanted.search(f"{m.guarantee} {m.file} {m.test}")]
    if args.list:
        for m in mutants:
            print(f"{m.guarantee}\n    code: {m.file}: {m.find.strip()!r}\n    test: {m.test}")
        return 0
    if not mutants:
        print("error: no mutant matches", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        verdicts = check(mutants, max(1, args.jobs))
    except TableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = report(verdicts)
    print(f"==> took {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
