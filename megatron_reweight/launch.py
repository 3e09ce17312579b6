"""Launches on one machine (tests, benchmarks, single-node CPU runs): a free loopback port,
torchrun's command line, and a plain process for a single rank."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_torchrun(nproc: int, target: list[str]) -> list[str]:
    """`python -m torch.distributed.run` with `nproc` ranks on this machine; `target` is a
    script and its arguments, or `["-m", module, ...]`."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", *target,
    ]  # fmt: skip


def local_command(nproc: int, target: list[str]) -> list[str]:
    """`local_torchrun`, or for one rank a plain `python` process (the trainer makes itself a
    world of one)."""
    return [sys.executable, *target] if nproc == 1 else local_torchrun(nproc, target)
