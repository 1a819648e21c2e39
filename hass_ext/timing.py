"""Timing a decode round (or any call) on a device: wall clock on the CPU, CUDA events on a GPU.

GPU work is asynchronous, so a CPU clock read around it measures only the launch. ``time_call`` synchronises
around the call; ``PhaseTimer`` records CUDA events (no synchronisation between the steps it times) and reads
them once the round is done.
"""
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Tuple

import torch


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device) -> float:
    """Seconds ``fn()`` takes on ``device``, queued device work before and after included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_times(calls: Dict[object, Callable[[], object]], device, repeats: int, tick=lambda: None
                 ) -> Dict[object, float]:
    """The median seconds of each call over ``repeats`` passes, the calls timed in turns (a noisy machine then
    affects all alike) after one untimed warm-up pass; ``tick()`` after each of the ``(repeats + 1) * len(calls)``
    calls."""
    times = {key: [] for key in calls}
    for rep in range(repeats + 1):
        for key, fn in calls.items():
            t = time_call(fn, device)
            tick()
            if rep:
                times[key].append(t)
    return {key: statistics.median(t) for key, t in times.items()}


class PhaseTimer:
    """A ``phase`` hook for ``speculative_round`` (or any code): ``with timer("verify"): ...`` records the step's
    start and end; ``seconds()`` (after the timed code has finished) gives ``{name: seconds}``, repeated names
    summed. On a GPU the marks are CUDA events, so timing adds no synchronisation inside the round."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: List[Tuple[str, object, object]] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def __call__(self, name: str):
        start = self._now()
        yield
        self.marks.append((name, start, self._now()))

    def seconds(self) -> Dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out: Dict[str, float] = {}
        for name, s, e in self.marks:
            out[name] = out.get(name, 0.0) + (s.elapsed_time(e) / 1e3 if self.cuda else e - s)
        return out
