"""Stream: V = W_aligned − W_base for each weight in turn, and the caller's work on V.

The hot path. Each weight is read once, with plain reads into reused byte buffers (no page of the
model stays mapped, so memory does not grow with the model); the conversion to float32, the
subtraction and ‖V‖ happen in cache-sized row blocks.

``map_alignment`` (the one the pipeline uses) works on ``WORKERS`` weights at once, one per worker
thread, each worker running torch single-threaded on CPU (its share of torch's threads). On 2
cores this beat one thread running torch's two intra-op threads with a prefetch thread beside it:
2.4 s against 3.0 s for the 22-layer job's scoring on a quiet machine, and 3.7 s against 28-37 s
while another process kept one core busy. Every small torch op of the intra-op plan ends in a
barrier that waits for both threads, so each time the other process held a core, the op waited for
a scheduler time slice. Whole weights per thread need no barrier.

``alignment_stream`` is the single-consumer form: V in the caller's thread, one weight at a time.
"""

from __future__ import annotations

import math
import queue
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Protocol, TypeVar

import torch

from safelora_cli.inputs.index import TensorInfo
from safelora_cli.inputs.loader import TensorReader
from safelora_cli.math.projection import BLOCK_ELEMENTS, alignment_matrix_into

WORKERS = 2  # weights in flight at once: memory is about this many weights' V and raw bytes


class Difference(Protocol):
    """Two stored weights of one shape whose difference, ``aligned − base``, is streamed: a
    ``pairing.ModulePair`` (V), or (W_aligned, W_ft) for a full fine-tune's D."""

    @property
    def base(self) -> TensorInfo: ...

    @property
    def aligned(self) -> TensorInfo: ...


P = TypeVar("P", bound=Difference)
T = TypeVar("T")
AlignedFn = Callable[[P, torch.Tensor, float], T]
"""Called as ``fn(pair, V, ‖V‖_F)`` in a worker thread; V (float32, stored layout) is valid only
during the call (its buffer is reused)."""


class _Buffers:
    """One worker's reused buffers: both weights' raw bytes, V, and a conversion block."""

    def __init__(self, pairs: Sequence[Difference], device: torch.device) -> None:
        nbytes = max(max(p.base.nbytes, p.aligned.nbytes) for p in pairs)
        numel = max(math.prod(p.base.shape) for p in pairs)
        block = max(BLOCK_ELEMENTS, *(p.base.shape[-1] for p in pairs))
        pin = device.type == "cuda"
        self.raw_base = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.raw_aligned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.v = torch.empty(numel, dtype=torch.float32, device=device)
        self.scratch = torch.empty(min(block, numel), dtype=torch.float32, device=device)
        self.reader = TensorReader()
        self.device = device

    def read(self, pair: Difference) -> tuple[torch.Tensor, torch.Tensor]:
        """Both weights, as stored (views on the raw buffers)."""
        return (
            self.reader.read_into(pair.base, self.raw_base),
            self.reader.read_into(pair.aligned, self.raw_aligned),
        )

    def align(self, w_base: torch.Tensor, w_aligned: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(V, ‖V‖_F) of weights from ``read``, into this worker's V buffer."""
        out = self.v[: w_base.numel()].view(w_base.shape)
        return alignment_matrix_into(w_base, w_aligned, out, self.scratch)

    def release(self) -> None:
        """Wait for the device's copies out of the raw buffers, so that they can be refilled."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def worker_plan(device: torch.device, weights: int) -> tuple[int, int]:
    """(worker threads, torch intra-op threads in each) for ``weights`` weights on ``device``.

    On CPU, torch's threads are shared out between the workers (one each on 2 cores); on CUDA the
    workers only overlap reading with the device's work, and keep torch's setting.
    """
    threads = torch.get_num_threads()
    if device.type == "cuda":
        return max(1, min(WORKERS, weights)), threads
    workers = max(1, min(WORKERS, threads, weights))
    return workers, max(1, threads // workers)


def map_alignment(pairs: Sequence[P], device: torch.device, fn: AlignedFn[P, T]) -> Iterator[T]:
    """``fn(pair, V, ‖V‖_F)`` for each pair, run in worker threads; results yielded in order.

    Each worker reads its weights, builds V in its own buffers and calls ``fn`` on it, under
    ``torch.inference_mode()``. An exception from a worker (a file that changed, or ``fn``'s own)
    is raised here, in order; stopping the iteration cancels the weights not started yet.

    Args:
        pairs: the weights to read (their base/aligned ``TensorInfo``), in shard/offset order.
        device: where V is computed.
        fn: the work on each V, e.g. scoring every adapter module that uses the weight.
    Note:
        On CPU, the calling thread's torch thread count is restored at the end; threads that
        first use torch during the run start with the workers' count.
    """
    if not pairs:
        return
    workers, threads = worker_plan(device, len(pairs))
    free: queue.SimpleQueue[_Buffers] = queue.SimpleQueue()
    for _ in range(workers):
        free.put(_Buffers(pairs, device))

    cuda_index = 0
    if device.type == "cuda":  # no index: the caller's current device (each thread has its own)
        cuda_index = torch.cuda.current_device() if device.index is None else device.index

    def start() -> None:
        torch.set_num_threads(threads)  # torch keeps it per thread: this worker only
        if device.type == "cuda":
            torch.cuda.set_device(cuda_index)

    def work(pair: P) -> T:
        buffers = free.get()  # one per worker: never waits
        try:
            with torch.inference_mode():
                v, v_norm = buffers.align(*buffers.read(pair))
                return fn(pair, v, v_norm)
        finally:
            buffers.release()
            free.put(buffers)

    previous = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="safelora-weights", initializer=start)
    try:
        todo = iter(pairs)
        # twice the workers: one finishing early does not wait for the oldest result to be taken
        pending = deque(pool.submit(work, pair) for pair in islice(todo, 2 * workers))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(work, pair) for pair in islice(todo, 1))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(previous)  # also the default of threads started from now on
        while not free.empty():
            free.get().reader.close()


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
