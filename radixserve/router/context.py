"""The router's shared state, built once at start-up and read by every handler."""

from __future__ import annotations

from dataclasses import dataclass, field

from radixserve.router.admission import Admission
from radixserve.router.args import RouterArgs
from radixserve.router.http_client import HTTPClient
from radixserve.router.metrics import RouterMetrics
from radixserve.router.policies import Policy
from radixserve.router.registry import Registry


@dataclass
class RouterContext:
    args: RouterArgs
    registry: Registry
    policies: dict[str, Policy]  # role -> policy
    admission: Admission
    metrics: RouterMetrics
    client: HTTPClient = field(default_factory=HTTPClient)  # to the workers
    draining: bool = False  # shutting down: new requests get 503
    inflight: int = 0  # requests being served now
    background: list = field(default_factory=list)  # health checks, load polls, eviction

    @property
    def pd(self) -> bool:
        return self.args.pd_disaggregation

    def auth_headers(self) -> dict[str, str]:
        """For the router's own calls to workers (health, load, fan-outs)."""
        return {"Authorization": f"Bearer {self.args.api_key}"} if self.args.api_key else {}
