"""The router's workers, by role, as they come and go while it serves: a removed worker takes no
new requests and leaves once its in-flight ones have finished."""

from __future__ import annotations

import logging

from radixserve.router.policies import Policy
from radixserve.router.worker import BreakerConfig, CircuitBreaker, Worker

logger = logging.getLogger("radixserve.router")

ROLES = ("regular", "prefill", "decode")


class WorkerExists(ValueError):
    pass


class Registry:
    def __init__(self, policies: dict[str, Policy], breaker: BreakerConfig) -> None:
        self.policies = policies  # role -> its policy
        self.breaker = breaker
        self.workers: dict[str, Worker] = {}  # url -> worker, draining ones included

    def add(self, url: str, role: str = "regular", bootstrap_port: int | None = None,
            healthy: bool = False) -> Worker:
        if role not in self.policies:
            raise ValueError(f"worker_type {role!r} does not serve here (this router takes "
                             f"{', '.join(r for r in ROLES if r in self.policies)})")
        known = self.workers.get(url)
        if known is not None and not known.draining:
            raise WorkerExists(f"worker {url} is already registered")
        worker = Worker(url, role, bootstrap_port, healthy=healthy, breaker=CircuitBreaker(self.breaker))
        if known is not None:  # re-added while its last requests drain: those finish on the old entry
            known.url = f"{url}#draining-{id(known)}"
            self.workers[known.url] = known
        self.workers[url] = worker
        logger.info("worker added: %s (%s%s)", url, role,
                    f", bootstrap port {bootstrap_port}" if bootstrap_port else "")
        return worker

    def remove(self, url: str) -> Worker | None:
        """Stop sending to `url`; it leaves once its in-flight requests end. None if unknown."""
        worker = self.workers.get(url)
        if worker is None or worker.draining:
            return None
        worker.draining = True
        self.policies[worker.role].remove_worker(url)
        logger.info("worker removed: %s (%d requests in flight finish there)", url, worker.inflight)
        self._drop_if_idle(worker)
        return worker

    def release(self, worker: Worker, tokens: int, ok: bool) -> None:
        worker.finished(tokens, ok)
        self._drop_if_idle(worker)

    def _drop_if_idle(self, worker: Worker) -> None:
        if worker.draining and worker.inflight <= 0 and self.workers.get(worker.url) is worker:
            del self.workers[worker.url]

    def of_role(self, role: str, include_draining: bool = False) -> list[Worker]:
        return [w for w in self.workers.values() if w.role == role and (include_draining or not w.draining)]

    def candidates(self, role: str, exclude: set[str] | frozenset[str] = frozenset()) -> list[Worker]:
        """Workers of `role` that may take a request now; those in `exclude` (tried already) only
        when nothing else is left."""
        available = [w for w in self.workers.values() if w.role == role and w.available]
        fresh = [w for w in available if w.url not in exclude]
        return fresh or available

    def serving(self) -> list[Worker]:
        return [w for w in self.workers.values() if not w.draining]
