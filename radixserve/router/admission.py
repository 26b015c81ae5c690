"""Admission: at most --max-concurrent-requests at once, a queue of --queue-size behind them (429
when full, 408 after --queue-timeout-secs), and, with --rate-limit-tokens-per-second, starts paced
by a token bucket refilled at that rate (its size the concurrency limit). Without a rate only the
concurrency limit applies."""

from __future__ import annotations

import asyncio
import time
from collections import deque


class Rejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Admission:
    def __init__(self, max_concurrent: int, queue_size: int, queue_timeout: float,
                 rate_per_second: float | None) -> None:
        self.limit = max_concurrent  # -1: no limit (nothing below applies)
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.rate = rate_per_second  # None: no pacing
        self.capacity = float(max(max_concurrent, 1))
        self.tokens = self.capacity
        self.refilled = time.monotonic()
        self.running = 0
        self.waiters: deque[asyncio.Future] = deque()

    @property
    def queued(self) -> int:
        return len(self.waiters)

    def _take_token(self) -> bool:
        if self.rate is None:
            return True
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def _can_start(self) -> bool:
        return self.running < self.limit and self._take_token()

    async def acquire(self) -> None:
        if self.limit < 0:
            return
        if not self.waiters and self._can_start():
            self.running += 1
            return
        if len(self.waiters) >= self.queue_size:
            raise Rejected(429, f"too many requests: {self.running} running and the queue of "
                                f"{self.queue_size} is full")
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self._wake_soon()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout)
        except BaseException as e:  # timed out, or the client left while queued
            if waiter.done() and not waiter.cancelled():
                self.release()  # admitted just as it gave up
            else:
                waiter.cancel()
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
            if isinstance(e, asyncio.TimeoutError):
                raise Rejected(408, f"request waited {self.queue_timeout:g} s in the router's queue") from None
            raise

    def release(self) -> None:
        if self.limit < 0:
            return
        self.running -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiters and self.running < self.limit:
            if not self._take_token():
                self._wake_soon()
                return
            waiter = self.waiters.popleft()
            if waiter.done():  # timed out or cancelled meanwhile
                if self.rate is not None:
                    self.tokens += 1.0
                continue
            self.running += 1
            waiter.set_result(None)

    def _wake_soon(self) -> None:
        """Waiters held back by the bucket alone are tried again once a token has refilled."""
        if self.waiters and self.running < self.limit and self.rate:
            delay = max(0.001, (1.0 - self.tokens) / self.rate)
            asyncio.get_running_loop().call_later(delay, self._wake)
