"""The next step's micro-batches, loaded by a background thread while the current step runs.

Wraps any training-data object with `next_step()`, `state_dict()`, `load_state_dict()` and
`eval_batches()` (keel.data.loader.TrainData, a family's own). Batches come out in exactly the
order the wrapped object gives them; `state_dict()` is the position after the last batch handed
out, not after the ones loaded ahead, so checkpoints resume exactly. With `pin=True` (CUDA) the
tensors are placed in pinned host memory, so the trainer's `.to(device, non_blocking=True)` copies
asynchronously.
"""
from __future__ import annotations

import queue
import threading


class Prefetcher:
    def __init__(self, data, pin: bool = False, depth: int = 1):
        self.data = data
        self.pin = pin
        self.depth = depth
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state = None  # the wrapped position after the last step handed out

    # ------------------------------------------------------------ the loading thread
    def _load_ahead(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batches = self.data.next_step()
                if self.pin:
                    batches = [{k: v.pin_memory() for k, v in mb.items()} for mb in batches]
                self._put(out, stop, (batches, self.data.state_dict()))
        except BaseException as e:  # re-raised in the training thread, where it belongs
            self._put(out, stop, e)

    @staticmethod
    def _put(out: queue.Queue, stop: threading.Event, item) -> None:
        """Wait for room, but never past close(): a blocked put would hang its join."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._load_ahead, args=(self._queue, self._stop),
                                        name="keel-data", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop loading ahead. Batches loaded but not handed out are dropped; the next next_step()
        rewinds the wrapped object to the position after the last batch handed out."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = self._queue = None

    # ------------------------------------------------------------ the training thread
    def next_step(self) -> list[dict]:
        if self._thread is None:
            if self._state is not None:  # loaded ahead and dropped by close(): rewind first
                self.data.load_state_dict(self._state)
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batches, self._state = item
        return batches

    def state_dict(self) -> dict:
        return self.data.state_dict() if self._state is None else self._state

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.data.load_state_dict(state)
        self._state = None

    def eval_batches(self, *args, **kwargs):
        return self.data.eval_batches(*args, **kwargs)

    def __getattr__(self, name):  # anything else a family's data object offers
        return getattr(self.data, name)
