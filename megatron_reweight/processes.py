"""Helper processes that end with the process that started them, even when it is SIGKILLed."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Call first thing in a child process: the kernel kills it when its parent dies."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


def _checkpoint_writer_helper(parent_pid: int) -> None:
    """The writer's queue server: dies with the trainer, and outlives the stop signals.
    A preemption (Slurm's SIGTERM to every process of the step, torchrun's to each rank's
    process group) or a Ctrl-C (SIGINT to the terminal's process group) reaches it too; the
    trainer answers such a signal by saving, which needs this server until it is done."""
    die_with_parent(parent_pid)
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, signal.SIG_IGN)


def bind_checkpoint_writer_to_this_process() -> None:
    """megatron-core's torch_dist writer collects its write results through a queue served by a
    multiprocessing Manager, spawned at the first save (`filesystem_async._get_write_results_queue`);
    that server process, and the resource tracker the spawn starts, outlive a SIGKILLed trainer.
    Serve that queue from a Manager that dies with this process instead: the resource tracker then
    exits too, when its last client is gone. Call from the main thread (the death signal follows
    the thread that started the child), before the first save."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_checkpoint_writer_helper, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()
