"""Tensor parallel between two "machines": network namespaces joined by a veth pair shaped to
1 Gbit/s (benchmarks/netns.py), the docs' two-node torchrun command (c10d rendezvous) run
once in each. They reach each other only over the pair, at 10.77.0.1 and 10.77.0.2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack

import pytest
from ranks import PROMPT, ROOT

import tinyformers

sys.path.insert(0, str(ROOT))  # benchmarks/ is not installed; netns.py serves the benchmark too
from benchmarks.netns import NamespaceError, two_hosts  # noqa: E402


@pytest.fixture
def hosts():
    with ExitStack() as stack:
        try:
            hosts = stack.enter_context(two_hosts("1gbit"))
        except NamespaceError as e:
            pytest.skip(f"network namespaces cannot be made here (needs root and iproute2): {e}")
        yield hosts


def test_two_namespaces_print_the_single_process_text(gpt2_small_dir, hosts):
    procs = []
    for host in hosts:
        torchrun = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{hosts[0].address}:29500", "--rdzv-id", "tinyformers",
            # both namespaces share one host name: say which one hosts the rendezvous, and
            # the address each one is reached at
            "--rdzv-conf", f"is_host={int(host is hosts[0])}", "--local-addr", host.address,
        ]  # fmt: skip
        generate = ["-m", "tinyformers", "generate", "--model", str(gpt2_small_dir)]
        generate += ["--temp", "0", "-n", "12", PROMPT]
        env = dict(os.environ, GLOO_SOCKET_IFNAME=host.interface, OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                host.command([*torchrun, *generate]),
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    want = tinyformers.load(gpt2_small_dir, threads=1).generate(
        PROMPT, max_new_tokens=12, temperature=0
    )
    assert [out for out, _ in results] == [want, ""]  # rank 0 prints, the other host nothing
