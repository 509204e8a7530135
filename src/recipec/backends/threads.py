"""torch's intra-op thread count, set for a block and restored after it.

Results that must be identical at any thread count (a factorization, a calibration, a parity check) are
computed on one torch thread: matmul and LAPACK reductions split their sums by thread, so their bits depend
on the count. Timings use the count a recipe asks for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
