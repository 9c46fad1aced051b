"""Capture a step function once as a CUDA graph, then replay it.

Why: one denoising step of an 8B model is ~1 000 small kernels; launched one by
one from Python, the launch gaps cost more than the arithmetic at batch 1
(docs/decisions.md: 18.1 ms eager against 7.9 ms replayed for one cached block
step). A graph replays the whole recorded sequence with one launch.

A captured function must keep its tensors in place: it reads and writes
buffers that live as long as the graph (inputs are changed with ``copy_`` /
``fill_`` between replays), never allocates outside the capture and never
synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor


class GraphSteps:
    """Step functions by key, captured on first use and replayed afterwards.

    ``state`` names the tensors a step mutates besides its own buffers whose
    values must survive the warm-up run done before capture (the warm-up
    executes the step for real: it compiles and autotunes the kernels and lets
    cuBLAS pick its algorithms, none of which may happen during capture). They
    are restored after it, so the first replay starts from the same state. All
    graphs share one memory pool: they run one after another, never at once.
    """

    def __init__(self, state: list[Tensor]) -> None:
        self.state = state
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.pool: Any = None  # the memory pool handle of the first capture

    def run(self, key: Hashable, step: Callable[[], None]) -> None:
        """Replay the graph of ``key``, capturing ``step`` first if it is new."""
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(step)
            self.graphs[key] = graph
        graph.replay()

    def _capture(self, step: Callable[[], None]) -> torch.cuda.CUDAGraph:
        saved = [t.clone() for t in self.state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up: compile, autotune, pick cuBLAS algorithms
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(self.state, saved, strict=True):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        self.pool = graph.pool()
        return graph
