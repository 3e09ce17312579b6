"""Stop requests that all ranks agree on: a signal (Slurm's SIGTERM before preemption or
time-out), Ctrl-C, the --exit-duration-in-mins budget, or --exit-interval.

Like Megatron-LM's DistributedSignalHandler, the handlers only record the signal; the
training loop asks `should_exit()` once per step, which all-reduces the flags (MAX) so
every rank stops at the same iteration, saves one checkpoint together and exits.

Ctrl-C (SIGINT, from the terminal to the whole foreground process group; torchrun passes it
on to every rank) is such a request too, whatever --exit-signal says: the step finishes, the
checkpoint is saved, and the run exits 130. After a Ctrl-C, a second one aborts at once
without saving, as does the SIGTERM that torchrun sends its ranks at a second Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

INTERRUPTED = "Ctrl-C (SIGINT)"  # the exit reason of a Ctrl-C
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended


class ExitMonitor:
    """`checkpoint`: the run's CheckpointConfig (--save, --exit-signal, --exit-duration-in-mins,
    --exit-interval); `announce`: whether this rank prints (the logging rank)."""

    def __init__(self, checkpoint, device: torch.device, announce: bool = True):
        handled = checkpoint.exit_signal if checkpoint.exit_signal_handler else None
        self.signal_number = getattr(signal, handled) if handled else None
        self.exit_duration_in_mins = checkpoint.exit_duration_in_mins
        self.exit_interval = checkpoint.exit_interval
        self.saving = checkpoint.save is not None
        self.device = device
        self.announce = announce
        self.start_time = time.time()
        self.signal_received = False
        self.interrupted = False
        self.reason: str | None = None
        self._pid = os.getpid()  # forked helpers (data-loader and checkpoint-writer workers) inherit the handlers
        self._previous_handlers: dict[int, object] = {}

    def __enter__(self) -> ExitMonitor:
        handlers = {signal.SIGINT: self._interrupt}
        if self.signal_number not in (None, signal.SIGINT):
            handlers[self.signal_number] = self._handle
        for number, handler in handlers.items():
            self._previous_handlers[number] = signal.getsignal(number)
            signal.signal(number, handler)
        return self

    def __exit__(self, *exc) -> None:
        for number, previous in self._previous_handlers.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.interrupted:  # torchrun's SIGTERM at a second Ctrl-C
            self._abort()
        self.signal_received = True

    def _interrupt(self, signum, frame) -> None:
        if self.interrupted:
            self._abort()
        self.interrupted = True
        if self._pid == os.getpid() and self.announce:
            then = "saving a checkpoint" if self.saving else "not saving (no --save)"
            self._say(f"Ctrl-C: stopping after this step, {then}; press Ctrl-C again to abort at once")

    def _abort(self) -> None:
        if self._pid == os.getpid() and self.announce:
            self._say("second Ctrl-C: aborted at once, nothing saved since the last checkpoint")
        os._exit(INTERRUPTED_EXIT_CODE)

    @staticmethod
    def _say(line: str) -> None:
        # os.write, not print: a handler can interrupt a print on the same stream.
        os.write(sys.stderr.fileno(), (line + "\n").encode())

    def should_exit(self, iteration: int) -> bool:
        """Collective: True on every rank when any rank got the signal or Ctrl-C or ran out of
        time, or at a multiple of --exit-interval."""
        out_of_time = (
            self.exit_duration_in_mins is not None
            and (time.time() - self.start_time) / 60.0 > self.exit_duration_in_mins
        )
        flags = torch.tensor(
            [float(self.interrupted), float(self.signal_received), float(out_of_time)], device=self.device
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            self.reason = INTERRUPTED
        elif flags[1] > 0:
            self.reason = f"received {signal.Signals(self.signal_number).name}"
        elif flags[2] > 0:
            self.reason = f"reached --exit-duration-in-mins {self.exit_duration_in_mins}"
        elif self.exit_interval and iteration % self.exit_interval == 0:
            self.reason = f"reached --exit-interval {self.exit_interval}"
        return self.reason is not None
