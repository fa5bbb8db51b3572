"""docs/operations.md is what an operator follows at night: every alert has its runbook there,
and every ``wayang-mq`` command it tells them to type exists, with the flags it shows."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

from wayang_mq.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "operations.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
#: a command as the doc writes it: `wayang-mq` and its words up to the end of the code span
COMMAND = re.compile(r"wayang-mq((?:[ \n]+[A-Za-z0-9_.:=/\-]+)+)")


def _alert_names() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["alert"] for group in rules["groups"] for rule in group["rules"]]


def _runbook_headings() -> set[str]:
    text = DOC.read_text()
    runbooks = text.split("\n## Runbooks\n", 1)
    assert len(runbooks) == 2, "docs/operations.md has no '## Runbooks' section"
    return set(re.findall(r"^### (\S+)$", runbooks[1], re.M))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _commands() -> list[list[str]]:
    """Every ``wayang-mq ...`` the doc shows, as words (placeholders included)."""
    found = []
    for span in re.findall(r"`([^`]*)`", DOC.read_text()):
        for match in COMMAND.finditer(span):
            found.append(match.group(1).split())
    return found


def test_every_alert_has_a_runbook_heading_named_for_it() -> None:
    # Given the alert rules Prometheus loads
    names = _alert_names()
    assert names, "no alerts read from deploy/prometheus/alerts.yml"
    # When the runbooks' headings are read
    headings = _runbook_headings()
    # Then each alert has one, by its exact name, and no runbook names an alert that is gone
    assert sorted(set(names) - headings) == [], "alerts without a runbook"
    assert sorted(headings - set(names)) == [], "runbooks for alerts that do not exist"


def test_every_wayang_mq_command_in_the_doc_is_a_real_verb_with_real_flags() -> None:
    # Given every `wayang-mq ...` command the doc tells an operator to run
    commands = _commands()
    assert len(commands) > 20, commands
    verbs = _subparsers(build_parser())
    for words in commands:
        # Then its verb exists
        assert words[0] in verbs, f"`wayang-mq {' '.join(words)}`: no verb {words[0]!r}"
        parser = verbs[words[0]]
        rest = words[1:]
        # and so does its action, for verbs that have actions (dead list, keys rotate, ...)
        actions = _subparsers(parser)
        if actions:
            assert rest and rest[0] in actions, (
                f"`wayang-mq {' '.join(words)}`: {words[0]} takes one of {sorted(actions)}"
            )
            parser = actions[rest[0]]
        # and every flag it shows is one that command takes
        flags = {word.split("=", 1)[0] for word in rest if word.startswith("--")}
        unknown = flags - _options(parser)
        assert not unknown, f"`wayang-mq {' '.join(words)}`: no such option {sorted(unknown)}"
