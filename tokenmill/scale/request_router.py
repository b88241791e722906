"""The prefix-aware rule (routing.py) as a Ray Serve request router, used by every handle to the engine replicas."""

import itertools

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tokenmill.scale import metrics
from tokenmill.scale.routing import MAX_IMBALANCE, preferred, rank


class PrefixAwareRouter(RequestRouter):
    """Sends a request to the replica its prefix key hashes to, or to the least loaded when that one is busy.

    The key is the first argument of the handle call (EngineReplica.forward's `key`).
    """

    def initialize_state(self, max_imbalance: int = MAX_IMBALANCE) -> None:
        """Ray Serve passes RequestRouterConfig.request_router_kwargs here."""
        self.max_imbalance = max_imbalance
        self._turn = itertools.count()  # rotates ties between equally loaded replicas, one step per decision
        # Each request's prefix owner (None: no prefix) from its last routing attempt, until it completes.
        self._owners: dict[str, str | None] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """One replica per rank, in order of preference: Ray Serve sends to the first one that is not full."""
        key = pending_request.args[0] if pending_request is not None and pending_request.args else None
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        # NOTE: a queue length not cached yet counts as empty, and no rank holds two replicas: within a rank Ray
        # Serve takes a cached replica over one it would have to probe, so an idle replica it never probed lost
        # every request of a cold burst to one it had (tests/scale/test_routing.py).
        loads = {rid: self.replica_queue_len_cache.get(replica.replica_id) or 0 for rid, replica in by_id.items()}
        order, _ = rank(key, loads, self.max_imbalance, next(self._turn))
        if pending_request is not None:
            if len(self._owners) > 10_000:  # requests cancelled before they were sent never complete
                self._owners.pop(next(iter(self._owners)))
            self._owners[pending_request.metadata.internal_request_id] = (
                preferred(key, list(by_id)) if key is not None and by_id else None)
        return [[by_id[rid]] for rid in order]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Count the decision once per request (choose_replicas may run several times for one)."""
        if internal_request_id not in self._owners:
            return
        owner = self._owners.pop(internal_request_id)
        reason = "no_prefix" if owner is None else "prefix" if owner == replica_id.unique_id else "least_loaded"
        # NOTE: through the module: Ray Serve pickles this module by value into each handle's process, so a
        # counter defined here would be a copy that the ingress's /metrics never sees.
        metrics.ROUTING_DECISIONS.labels(reason).inc()
