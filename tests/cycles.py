"""Tensors that only Python's cycle collector would free: what a block of code leaves in reference cycles."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def collector_off() -> Iterator[list[tuple[int, ...]]]:
    """Run the block with the cycle collector off; the list it yields then holds the shapes of the tensors that the
    block left unreachable in reference cycles (freed only by the collector's next pass, which a busy server
    reaches seldom). The collector is on again afterwards, whatever happened."""
    left: list[tuple[int, ...]] = []
    gc.collect()
    gc.disable()
    try:
        yield left
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left.extend(tuple(o.shape) for o in gc.garbage if isinstance(o, torch.Tensor))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
