"""Micro-batching: one model thread encodes whatever requests are queued in one forward pass.

Admission is separate from queueing: a request is admitted (`Batcher.admit`) before its images are
decoded, and a full queue refuses it there with `Overloaded` (HTTP 429), so overload costs no decoding.
Imports no FastAPI: the HTTP layer maps `Overloaded` to its status.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from clip_pipe.classifier import ZeroShotClassifier

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue holds `max_queue` items already; try again in `retry_after_s` seconds."""

    def __init__(self, num_queued: int, max_queue: int, retry_after_s: int):
        super().__init__(
            f"the server is busy: {num_queued} images or texts queued (at most {max_queue}); "
            f"retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    """One request's work: images (pixels) or texts to encode, then `finish(features)` for its answer."""

    pixels: torch.Tensor | None
    texts: list[str] | None
    finish: Callable[[torch.Tensor], Any]
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]
    ticket: Ticket | None = None

    @property
    def size(self) -> int:
        return len(self.pixels) if self.pixels is not None else len(self.texts)


class Ticket:
    """Room for `num_items` in the queue, held from admission until the items enter a forward pass.

    A context manager: leaving it gives back what is left (the items of a request that failed before
    reaching the queue).
    """

    def __init__(self, batcher: Batcher, num_items: int):
        self.batcher, self.num_items = batcher, num_items

    def release(self, num_items: int | None = None) -> None:
        """Give back `num_items` (default: all that is left). Idempotent once all is given back."""
        num_items = self.num_items if num_items is None else min(num_items, self.num_items)
        self.num_items -= num_items
        self.batcher.num_queued -= num_items

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Batcher:
    """Collects queued jobs into batches and runs them on the model in one worker thread.

    `max_queue` bounds the items (images or texts) admitted and not yet in a forward pass, counting
    those whose images are still being decoded. A request that finds the queue empty is always admitted,
    however large, so no request is refused forever. `on_batch(num_items)` is called for each batch.
    """

    def __init__(
        self,
        clf: ZeroShotClassifier,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(
                f"max_batch and max_queue must be >= 1 and max_wait_ms >= 0, "
                f"got {max_batch}, {max_queue}, {max_wait_ms}"
            )
        self.clf, self.max_batch, self.max_wait_s = clf, max_batch, max_wait_ms / 1000
        self.max_queue, self.on_batch = max_queue, on_batch
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-pipe-model")
        self.num_batches = self.num_items = self.num_queued = 0
        self.seconds_per_item = 0.0  # moving average of forward-pass time, for Retry-After

    def admit(self, num_items: int) -> Ticket:
        """Reserve queue room for a request's `num_items`, or raise `Overloaded`. Call before decoding."""
        if self.num_queued and self.num_queued + num_items > self.max_queue:
            # The time the model needs to work through what is queued now, rounded up to whole seconds.
            retry_after = max(1, math.ceil(self.num_queued * self.seconds_per_item))
            raise Overloaded(self.num_queued, self.max_queue, retry_after)
        self.num_queued += num_items
        return Ticket(self, num_items)

    async def submit(self, job: Job, ticket: Ticket | None = None) -> Any:
        """Queue `job` (whose items `ticket` admitted, if given) and wait for its answer."""
        job.future = asyncio.get_running_loop().create_future()
        job.ticket = ticket
        await self.queue.put(job)
        return await job.future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        carried: Job | None = None
        while True:
            batch = [carried or await self.queue.get()]
            carried = None
            size = batch[0].size
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                try:  # what is already queued joins at once; then wait a little for latecomers
                    job = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    if (timeout := deadline - loop.time()) <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), timeout)
                    except TimeoutError:
                        break
                if size + job.size > self.max_batch:  # would overflow: it starts the next batch
                    carried = job
                    break
                batch.append(job)
                size += job.size
            for job in batch:
                if job.ticket is not None:
                    job.ticket.release(job.size)
            self.num_batches += 1
            self.num_items += size
            if self.on_batch is not None:
                self.on_batch(size)
            start = time.perf_counter()
            results = await loop.run_in_executor(self.executor, self.process, batch)
            seconds_per_item = (time.perf_counter() - start) / size
            self.seconds_per_item = 0.8 * self.seconds_per_item + 0.2 * seconds_per_item
            for job, result in zip(batch, results, strict=True):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def process(self, batch: list[Job]) -> list[Any]:
        """In the model thread: one forward pass for all images, one for all texts, then each answer."""
        features: dict[int, torch.Tensor] = {}
        try:
            for kind, encode in (("pixels", self.clf.encode_pixels), ("texts", self.clf.embed_texts)):
                jobs = [job for job in batch if getattr(job, kind) is not None]
                if not jobs:
                    continue
                if kind == "pixels":
                    encoded = encode(torch.cat([job.pixels for job in jobs]))  # (sum N, D)
                else:
                    encoded = encode([text for job in jobs for text in job.texts])  # (sum N, D)
                for job, part in zip(jobs, encoded.split([job.size for job in jobs]), strict=True):
                    features[id(job)] = part
        except Exception as e:  # a model failure fails every request of the batch, not the server
            log.exception("batch of %d jobs failed", len(batch))
            return [e] * len(batch)
        results = []
        for job in batch:
            try:
                results.append(job.finish(features[id(job)]))
            except Exception as e:
                results.append(e)
        return results
