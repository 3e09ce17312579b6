"""Stop requests that all ranks agree on: a signal (Slurm's SIGTERM before preemption or
time-out), the --exit-duration-in-mins budget, or --exit-interval.

Like Megatron-LM's DistributedSignalHandler, the handler only records the signal; the
training loop asks `should_exit()` once per step, which all-reduces the flags (MAX) so
every rank stops at the same iteration, saves one checkpoint together and exits 0.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist


class ExitMonitor:
    """`checkpoint`: the run's CheckpointConfig (--exit-signal, --exit-duration-in-mins, --exit-interval)."""

    def __init__(self, checkpoint, device: torch.device):
        handled = checkpoint.exit_signal if checkpoint.exit_signal_handler else None
        self.signal_number = getattr(signal, handled) if handled else None
        self.exit_duration_in_mins = checkpoint.exit_duration_in_mins
        self.exit_interval = checkpoint.exit_interval
        self.device = device
        self.start_time = time.time()
        self.signal_received = False
        self.reason: str | None = None
        self._previous_handler = None

    def __enter__(self) -> ExitMonitor:
        if self.signal_number is not None:
            self._previous_handler = signal.getsignal(self.signal_number)
            signal.signal(self.signal_number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.signal_number is not None:
            signal.signal(self.signal_number, self._previous_handler or signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        self.signal_received = True

    def should_exit(self, iteration: int) -> bool:
        """Collective: True on every rank when any rank got the signal or ran out of time,
        or at a multiple of --exit-interval."""
        out_of_time = (
            self.exit_duration_in_mins is not None
            and (time.time() - self.start_time) / 60.0 > self.exit_duration_in_mins
        )
        flags = torch.tensor([float(self.signal_received), float(out_of_time)], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            self.reason = f"received {signal.Signals(self.signal_number).name}"
        elif flags[1] > 0:
            self.reason = f"reached --exit-duration-in-mins {self.exit_duration_in_mins}"
        elif self.exit_interval and iteration % self.exit_interval == 0:
            self.reason = f"reached --exit-interval {self.exit_interval}"
        return self.reason is not None
