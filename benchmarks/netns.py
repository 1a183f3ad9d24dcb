"""Two "machines" on this one: network namespaces joined by a veth pair, its bandwidth shaped.

    with two_hosts(rate="1gbit") as hosts:
        hosts[1].run(["python", "-c", "..."])  # a process that sees only 10.77.0.2 and lo

Each namespace has one end of the pair (10.77.0.1/24 and 10.77.0.2/24) and its own loopback,
nothing else: a process in one reaches the other only over the pair. `tc` shapes each end's
egress with a token bucket filter (tbf) at `rate`; `netem` (delay) is not in every kernel, so
latency is what the pair gives, measured, never added. Needs root (CAP_NET_ADMIN) and `ip`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET = "10.77.0"


class NamespaceError(Exception):
    """The namespaces could not be made here (not root, no `ip`, no veth or tbf)."""


@dataclass
class Host:
    """One namespace: its name, its end of the pair and its address on it."""

    namespace: str
    interface: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` as run inside this namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str) -> None:
    try:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise NamespaceError("no `ip` command (iproute2)") from e
    except subprocess.CalledProcessError as e:
        raise NamespaceError(f"ip {' '.join(args)}: {e.stderr.strip()}") from e


def shape(host: Host, rate: str | None) -> None:
    """Limit `host`'s egress on the pair to `rate` ("10gbit", "100mbit"; None: unshaped) with
    tbf. The bucket holds 5 ms at the rate (at least 64 KB): a smaller one cannot pass the
    rate at all at the kernel's timer granularity, a larger one lets bursts through."""
    tc = ["netns", "exec", host.namespace, "tc", "qdisc"]
    if rate is None:  # back to the default qdisc; "nothing to delete" is fine
        subprocess.run(["ip", *tc, "del", "dev", host.interface, "root"], capture_output=True)
        return
    burst = max(64 * 1024, int(parse_rate(rate) / 8 * 0.005))
    tbf = ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]
    _ip(*tc, "replace", "dev", host.interface, "root", *tbf)


def parse_rate(rate: str) -> float:
    """Bits per second of a tc rate: parse_rate("1gbit") == 1e9."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate.removesuffix(unit)) * scale
    raise ValueError(f"rate {rate!r}: expected a number and kbit, mbit or gbit")


@contextmanager
def two_hosts(rate: str | None = None) -> Iterator[tuple[Host, Host]]:
    """Two namespaces joined by a veth pair shaped at `rate`; removed on the way out."""
    tag = f"tf{os.getpid() % 100000}"
    hosts = tuple(Host(f"{tag}-{i}", f"{tag}v{i}", f"{SUBNET}.{i + 1}") for i in range(2))
    made: list[str] = []
    try:
        for host in hosts:
            _ip("netns", "add", host.namespace)
            made.append(host.namespace)
        a, b = hosts
        _ip("link", "add", a.interface, "netns", a.namespace, "type", "veth",
            "peer", "name", b.interface, "netns", b.namespace)  # fmt: skip
        for host in hosts:
            inside = ("-n", host.namespace)
            _ip(*inside, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip(*inside, "link", "set", host.interface, "up")
            _ip(*inside, "link", "set", "lo", "up")
            if rate is not None:
                shape(host, rate)
        yield hosts
    finally:
        for namespace in made:  # the pair goes with its namespaces
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
