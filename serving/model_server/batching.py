"""Server-side batching (``--enable_batching``): concurrent Predict calls merged along dim 0.

Calls to the same servable and signature whose inputs have the same names, dtypes and trailing
shapes share a queue. A batch closes when it reaches ``max_batch_size`` or its oldest request
has waited ``batch_timeout_micros``; ``num_batch_threads`` threads run the batches, and each
caller gets its own rows back. Options and error messages follow TF Serving's
``BatchingParameters`` (see ``serving/batching_parameters.txt``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import Future

import grpc
import numpy as np
from google.protobuf import text_format

from serving.model_server.protos import BatchingParameters
from serving.model_server.servable import PreparedRequest, Servable, ServingError, Signature

log = logging.getLogger("tfrs_ctx.serving")


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """TF Serving's BatchingParameters, with its defaults for omitted fields."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = os.cpu_count() or 1
    allowed_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.num_batch_threads < 1 or self.max_enqueued_batches < 1:
            raise ValueError(f"max_batch_size, num_batch_threads and max_enqueued_batches must be >= 1: {self}")
        sizes = self.allowed_batch_sizes
        if sizes and (list(sizes) != sorted(set(sizes)) or sizes[-1] != self.max_batch_size):
            raise ValueError("allowed_batch_sizes must increase and end with max_batch_size")

    @classmethod
    def from_text(cls, text: str) -> BatchingOptions:
        """Parse a BatchingParameters text proto."""
        params = BatchingParameters()
        try:
            text_format.Parse(text, params)
        except text_format.ParseError as e:
            log.warning("batching parameters: %s; parsing again ignoring unknown fields", e)
            params = text_format.Parse(text, BatchingParameters(), allow_unknown_field=True)
        if params.pad_variable_length_inputs:
            raise ValueError("pad_variable_length_inputs: true is not supported by this server")
        fields = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
        values = {f: getattr(params, f).value for f in fields if params.HasField(f)}
        return cls(**values, allowed_batch_sizes=tuple(params.allowed_batch_sizes))

    @classmethod
    def from_file(cls, path: str) -> BatchingOptions:
        with open(path) as f:
            return cls.from_text(f.read())


def batch_size_of(inputs: dict[str, np.ndarray]) -> int:
    """The common 0th dimension of a request's inputs (TF Serving's batching rules)."""
    sizes = set()
    for array in inputs.values():
        if array.ndim == 0:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, "Batching Run() input tensors must have at least one dimension"
            )
        sizes.add(array.shape[0])
    if len(sizes) > 1:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT, "Batching Run() input tensors must have equal 0th-dimension size"
        )
    return sizes.pop() if sizes else 0


class _Task:
    __slots__ = ("enqueued", "future", "inputs", "size")

    def __init__(self, inputs: dict[str, np.ndarray], size: int):
        self.inputs, self.size = inputs, size
        self.future: Future = Future()
        self.enqueued = time.monotonic()


class _Queue:
    def __init__(self, servable: Servable, signature: Signature):
        self.servable, self.signature = servable, signature
        self.tasks: collections.deque[_Task] = collections.deque()
        self.size = 0


def check_batch_size(size: int, max_batch_size: int) -> None:
    """TF Serving's refusal of a request with more than ``max_batch_size`` rows."""
    if size > max_batch_size:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Task size {size} is larger than maximum input batch size {max_batch_size}",
        )


class BatchScheduler:
    """Merges concurrent requests into batches and runs them on ``num_batch_threads`` threads."""

    def __init__(self, options: BatchingOptions):
        self.options = options
        self._timeout_s = options.batch_timeout_micros / 1e6
        self._cond = threading.Condition()
        self._queues: dict[tuple, _Queue] = {}
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, servable: Servable, request: PreparedRequest) -> dict[str, np.ndarray]:
        """Run one request as part of a batch; blocks until its rows are back."""
        size = batch_size_of(request.inputs)
        check_batch_size(size, self.options.max_batch_size)
        sig = request.signature
        if size == 0:
            return servable.run(sig, request.inputs, request.outputs)
        layout = tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in request.inputs.items()))
        key = (id(servable), sig.name, layout)
        task = _Task(request.inputs, size)
        with self._cond:
            if self._stopped:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(servable, sig)
            if queue.size + size > self.options.max_enqueued_batches * self.options.max_batch_size:
                raise ServingError(
                    grpc.StatusCode.UNAVAILABLE, "The batch scheduling queue to which this task was submitted is full"
                )
            queue.tasks.append(task)
            queue.size += size
            self._cond.notify()
        outputs = task.future.result()
        return {k: outputs[k] for k in request.outputs}

    def stop(self) -> None:
        """Run what is queued, then stop the batch threads."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    batch, wait_s = self._take(time.monotonic())
                    if batch is not None:
                        if self._queues:
                            self._cond.notify()
                        break
                    if self._stopped:
                        return
                    self._cond.wait(wait_s)
            self._execute(*batch)

    def _take(self, now: float) -> tuple[tuple[_Queue, list[_Task]] | None, float | None]:
        """Pop the ready batch with the oldest request, or say how long until one is due."""
        ready, wait_s = None, None
        for key, queue in self._queues.items():
            head = queue.tasks[0]
            due = head.enqueued + self._timeout_s
            if self._stopped or queue.size >= self.options.max_batch_size or due <= now:
                if ready is None or head.enqueued < self._queues[ready].tasks[0].enqueued:
                    ready = key
            else:
                wait_s = due - now if wait_s is None else min(wait_s, due - now)
        if ready is None:
            return None, wait_s
        queue, tasks, total = self._queues[ready], [], 0
        while queue.tasks and total + queue.tasks[0].size <= self.options.max_batch_size:
            task = queue.tasks.popleft()
            tasks.append(task)
            total += task.size
        queue.size -= total
        if not queue.tasks:
            del self._queues[ready]
        return (queue, tasks), None

    def _padded(self, total: int) -> int:
        return next((s for s in self.options.allowed_batch_sizes if s >= total), total)

    def _execute(self, queue: _Queue, tasks: list[_Task]) -> None:
        sig = queue.signature
        try:
            total = sum(t.size for t in tasks)
            if len(tasks) == 1:
                inputs = tasks[0].inputs
            else:
                inputs = {k: np.concatenate([t.inputs[k] for t in tasks]) for k in sig.inputs}
            padded = self._padded(total)
            if padded > total:
                inputs = {k: np.concatenate([v, np.repeat(v[:1], padded - total, axis=0)]) for k, v in inputs.items()}
            outputs = queue.servable.run(sig, inputs, sig.outputs)
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != padded:
                    raise ServingError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"Batched output tensor '{name}' has 0th dimension {value.shape[:1]}, expected {padded}",
                    )
            offset = 0
            for task in tasks:
                task.future.set_result({k: v[offset : offset + task.size] for k, v in outputs.items()})
                offset += task.size
        except Exception as e:
            error = e if isinstance(e, ServingError) else ServingError(grpc.StatusCode.INTERNAL, f"batch failed: {e}")
            for task in tasks:
                if not task.future.done():
                    task.future.set_exception(error)
