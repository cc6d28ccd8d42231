"""Stream: V = W_aligned − W_base for each weight in turn; the next weight is read meanwhile.

The hot path. Each weight is read once, with plain reads into reused byte buffers (no page of the
model stays mapped, so memory does not grow with the model). A prefetch thread only reads (the
read releases the GIL and needs no CPU threads of torch's); the conversion to float32, the
subtraction and ‖V‖ happen in the caller's thread, in cache-sized row blocks. On 2 cores, converting
in the prefetch thread instead was slower when tried (9.4-10.6 s against 8.9 s for the 22-layer
job): the two threads' torch pools compete for the same cores and memory bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar

import torch

from safelora_cli.index import TensorInfo
from safelora_cli.loader import TensorReader
from safelora_cli.projection import BLOCK_ELEMENTS, alignment_matrix_into


class Difference(Protocol):
    """Two stored weights of one shape whose difference, ``aligned − base``, is streamed: a
    ``pairing.ModulePair`` (V), or (W_aligned, W_ft) for a full fine-tune's D."""

    @property
    def base(self) -> TensorInfo: ...

    @property
    def aligned(self) -> TensorInfo: ...


P = TypeVar("P", bound=Difference)


def alignment_stream(
    pairs: Sequence[P], device: torch.device
) -> Iterator[tuple[P, torch.Tensor, float]]:
    """Yield (pair, V, ‖V‖_F) for each pair in order; V (float32, stored layout) is valid until
    the next item is requested, as its buffer is then reused.

    Args:
        pairs: the weights to read (their base/aligned ``TensorInfo``), in shard/offset order.
        device: where V is computed.
    """
    if not pairs:
        return
    nbytes = max(max(p.base.nbytes, p.aligned.nbytes) for p in pairs)
    numel = max(math.prod(p.base.shape) for p in pairs)
    block = max(BLOCK_ELEMENTS, *(p.base.shape[-1] for p in pairs))
    pin = device.type == "cuda"
    # two (base, aligned) byte-buffer pairs: one being read while the other is converted
    raw = [
        (torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin),
         torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin))
        for _ in range(2)
    ]  # fmt: skip
    v_buffer = torch.empty(numel, dtype=torch.float32, device=device)
    scratch = torch.empty(min(block, numel), dtype=torch.float32, device=device)

    def read(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        raw_base, raw_aligned = raw[i % 2]
        pair = pairs[i]
        return reader.read_into(pair.base, raw_base), reader.read_into(pair.aligned, raw_aligned)

    with TensorReader() as reader, ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        pending: Future[tuple[torch.Tensor, torch.Tensor]] | None = pool.submit(read, 0)
        for i, pair in enumerate(pairs):
            assert pending is not None
            w_base, w_aligned = pending.result()
            if device.type == "cuda":  # the copies below must finish before the buffers refill
                torch.cuda.current_stream(device).synchronize()
            pending = pool.submit(read, i + 1) if i + 1 < len(pairs) else None
            out = v_buffer[: w_base.numel()].view(w_base.shape)
            try:
                v, v_norm = alignment_matrix_into(w_base, w_aligned, out, scratch)
                yield pair, v, v_norm
            except GeneratorExit:
                if pending is not None:
                    pending.cancel()
                raise
