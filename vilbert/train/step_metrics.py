"""Training metrics that stay on the device until a logging step reads them.

A `.item()` per loss per micro batch makes the host wait for the device each time, so a
GPU step can never run ahead of Python. Here every micro batch adds its metrics (the
objective's: losses, accuracies) to one float64 tensor on the device; a logging step reads it once (after the mean
over ranks), and the numbers are the same, bit for bit, as reading each value on the host
and summing there in Python floats.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class StepMetrics:
    """Sums over the micro batches of one optimizer step, each divided by the accumulation
    steps (so the sum is the step's mean), plus counters of the logging window: the training
    steps since the last read (evaluations and checkpoints in between are not counted)."""

    def __init__(self, device, accumulation: int, names: tuple[str, ...]):
        self.accumulation, self.names = accumulation, names
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        self.new_window = True

    def start_step(self) -> None:
        self.sums.zero_()
        if self.new_window:
            self.window_start, self.samples, self.tokens, self.waited = time.perf_counter(), 0, 0, 0.0
            self.new_window = False

    def add(self, values: torch.Tensor) -> None:
        """One micro batch's metrics, [len(names)] detached, on the device."""
        self.sums += values.double() / self.accumulation

    def count(self, samples: int, tokens: int, waited: float) -> None:
        """Host-side counters: samples and real tokens fed, seconds spent waiting for data."""
        self.samples, self.tokens, self.waited = self.samples + samples, self.tokens + tokens, self.waited + waited

    def read(self, world_size: int, totals: dict[str, int] | None = None) -> dict[str, float]:
        """The step's metrics averaged over ranks and `totals` (per-rank counts, e.g. bad
        samples) summed over ranks, in one collective, and the window's rates; the one
        place that waits for the device. The next step starts a new window."""
        totals = totals or {}
        values = torch.cat([self.sums, torch.tensor(list(totals.values()), dtype=torch.float64,
                                                    device=self.sums.device)])
        if world_size > 1:
            dist.all_reduce(values)
        values = values.tolist()
        metrics = {f"train/{name}": value / world_size for name, value in zip(self.names, values)}
        metrics.update(zip(totals, values[len(self.names):]))
        elapsed = time.perf_counter() - self.window_start
        metrics.update({"train/samples_per_s": self.samples * world_size / elapsed,
                        "train/tokens_per_s": self.tokens * world_size / elapsed,
                        "train/data_wait_fraction": self.waited / elapsed})
        if self.sums.device.type == "cuda":  # this rank's peak so far: what a micro batch size must fit under
            metrics["system/gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(self.sums.device) / 2 ** 30
        self.new_window = True
        return metrics
