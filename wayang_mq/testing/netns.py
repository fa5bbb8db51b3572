"""A network namespace joined to this host by one veth cable, which a test can cut and mend.

Why: a network partition cannot be faked on one machine by killing a process (that is a crash,
which peers see at once as a closed connection). Cutting a cable is different: the peers'
TCP connections stay open and go silent, and each side has to notice by itself (Erlang's
``net_ticktime`` between RabbitMQ nodes, AMQP heartbeats between a client and its broker).
A process started in the namespace (``ip netns exec``) has its own loopback and one address,
``ns_ip``; the host reaches it through ``host_ip`` on the other end of the cable.

There is no iptables or ``tc netem`` on our machines, so the cut is the host end of the veth
pair going down: the namespace's end loses its carrier too, and nothing crosses until it is
up again. Addresses stay on both ends across a cut.

Needs root (CAP_NET_ADMIN) and ``ip`` from iproute2. Everything is undone by :meth:`close`,
also when creating failed half-way: the processes left in the namespace (for example the
``epmd`` a RabbitMQ node started there, which detaches from its parent) are killed, then the
namespace is deleted, which destroys the cable with it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Final, Self

from wayang_mq.core.errors import StackError

IP: Final = "ip"
#: namespaces are named ``wayang-<subnet>-<pid of the creator>``, so a stale one is recognised
NAME_PREFIX: Final = "wayang-"
#: each namespace gets the /30 ``10.201.<subnet>.0``: .1 on the host, .2 inside
SUBNET_BASE: Final = "10.201"
_SUBNETS: Final = range(1, 255)
_NAME = re.compile(rf"^{NAME_PREFIX}(\d+)-(\d+)$")
_HINT: Final = "run as root on Linux with iproute2 installed (apt-get install iproute2)"


class NetnsError(StackError):
    """A namespace, cable or address could not be set up or changed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; NetnsError with its message when it fails and ``check`` is set."""
    if shutil.which(IP) is None:
        raise NetnsError("the `ip` command is not installed", hint=_HINT)
    done = subprocess.run(
        [IP, *args], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed: {done.stderr.strip()}", hint=_HINT)
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(name: str) -> list[int]:
    """The processes running in namespace ``name`` (empty if it does not exist)."""
    done = _ip("netns", "pids", name, check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def _kill_all_in(name: str, timeout_s: float = 10.0) -> None:
    """SIGKILL every process in the namespace and wait until none is left.

    Deleting a namespace only removes its name: the processes inside keep it (and its cable)
    alive, so they must go first.
    """
    deadline = time.monotonic() + timeout_s
    while pids := namespace_pids(name):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NetnsError(
                f"processes {pids} in network namespace {name} survive SIGKILL",
                hint=f"kill them, then `ip netns delete {name}`",
            )
        time.sleep(0.05)


def reap_stale() -> list[str]:
    """Delete our namespaces whose creator process is gone (a test run killed outright).

    Only names of the form ``wayang-<subnet>-<pid>`` with a dead ``pid`` are touched, so
    namespaces of runs still going are left alone.
    """
    reaped = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        found = _NAME.match(name)
        if found is None or _pid_alive(int(found.group(2))):
            continue
        _kill_all_in(name)
        _ip("netns", "delete", name, check=False)
        reaped.append(name)
    return reaped


class NetworkNamespace:
    """A namespace with loopback up and one veth cable to the host (``host_ip`` <-> ``ns_ip``).

    Use as a context manager (or call :meth:`create` and then :meth:`close` in a ``finally``)::

        with NetworkNamespace() as ns:
            node = subprocess.Popen([*ns.exec_prefix, "rabbitmq-server"])
            ns.partition()   # the cable is cut: nothing crosses
            ns.heal()        # and mended
    """

    def __init__(self) -> None:
        self.subnet: int | None = None
        self.name = ""
        self._created = False
        self.partitioned = False

    # -- naming ----------------------------------------------------------------------------

    @property
    def host_ip(self) -> str:
        """The host's end of the cable: how processes in the namespace reach the host."""
        return f"{SUBNET_BASE}.{self._subnet()}.1"

    @property
    def ns_ip(self) -> str:
        """The namespace's end: the one address (besides loopback) its processes have."""
        return f"{SUBNET_BASE}.{self._subnet()}.2"

    @property
    def host_link(self) -> str:
        """The host end's interface name (15 characters at most, as Linux requires)."""
        return f"wyg{self._subnet()}h{os.getpid() % 10000}"

    @property
    def ns_link(self) -> str:
        """The namespace end's interface name."""
        return f"wyg{self._subnet()}n{os.getpid() % 10000}"

    @property
    def exec_prefix(self) -> list[str]:
        """Put this before a command to run it inside the namespace."""
        return [IP, "netns", "exec", self.name]

    def _subnet(self) -> int:
        if self.subnet is None:
            raise NetnsError("the namespace is not created yet", hint="call create() first")
        return self.subnet

    # -- life cycle ------------------------------------------------------------------------

    def create(self) -> Self:
        """Claim a free subnet, make the namespace and its cable, bring everything up."""
        reap_stale()
        self._claim_subnet()
        try:
            self._wire()
        except BaseException:
            self.close()
            raise
        return self

    def _claim_subnet(self) -> None:
        # `ip netns add` of an existing name fails: the name is the lock on its subnet, so
        # parallel runs never share one. A subnet someone else's interface uses is skipped.
        taken = _ip("-o", "-4", "addr", "show").stdout
        candidates = list(_SUBNETS)
        random.shuffle(candidates)
        for subnet in candidates:
            if f" {SUBNET_BASE}.{subnet}." in taken:
                continue
            name = f"{NAME_PREFIX}{subnet}-{os.getpid()}"
            if any(n.startswith(f"{NAME_PREFIX}{subnet}-") for n in self._existing()):
                continue
            if _ip("netns", "add", name, check=False).returncode == 0:
                self.subnet, self.name, self._created = subnet, name, True
                return
        raise NetnsError(
            f"no free subnet {SUBNET_BASE}.X.0/30 for a network namespace",
            hint=f"delete stale namespaces: `ip netns list | grep {NAME_PREFIX}`",
        )

    @staticmethod
    def _existing() -> list[str]:
        lines = _ip("netns", "list", check=False).stdout.splitlines()
        return [line.split()[0] for line in lines if line.split()]

    def _wire(self) -> None:
        _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link)
        _ip("link", "set", self.ns_link, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_link)
        _ip("link", "set", self.host_link, "up")
        self.run([IP, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_link])
        self.run([IP, "link", "set", self.ns_link, "up"])
        # Erlang's epmd and the node's own CLI calls talk over loopback inside.
        self.run([IP, "link", "set", "lo", "up"])

    def close(self) -> None:
        """Kill what runs inside, delete the namespace and the cable. Safe to call twice."""
        if not self._created:
            return
        try:
            _kill_all_in(self.name)
        finally:
            _ip("netns", "delete", self.name, check=False)
            # Deleting the namespace destroys its end, and a veth pair dies with either end;
            # this only matters if the cable was made but never moved into the namespace.
            _ip("link", "delete", self.host_link, check=False)
            self._created = False

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- running and cutting ---------------------------------------------------------------

    def run(self, command: Sequence[str], timeout_s: float = 30.0) -> str:
        """Run ``command`` inside the namespace; its output, or NetnsError with its errors."""
        return _run([*self.exec_prefix, *command], timeout_s)

    def pids(self) -> list[int]:
        """The processes running inside right now."""
        return namespace_pids(self.name)

    def partition(self) -> None:
        """Cut the cable: from now on no packet crosses in either direction."""
        _ip("link", "set", self.host_link, "down")
        self.partitioned = True

    def heal(self) -> None:
        """Mend the cable and return once the host's route to the namespace is back."""
        _ip("link", "set", self.host_link, "up")
        self.partitioned = False
        deadline = time.monotonic() + 10
        while "linkdown" in _ip("route", "show", "dev", self.host_link).stdout:
            if time.monotonic() > deadline:
                raise NetnsError(f"{self.host_link} stayed down after `ip link set up`")
            time.sleep(0.05)

    def __repr__(self) -> str:
        where = f"{self.host_ip} <-> {self.ns_ip}" if self.subnet is not None else "not created"
        return f"NetworkNamespace({self.name or '-'}: {where})"


def _run(command: Sequence[str], timeout_s: float = 30.0) -> str:
    done = subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise NetnsError(
            f"{' '.join(command)} failed (exit {done.returncode}): {done.stderr.strip()}",
            hint=_HINT,
        )
    return done.stdout
