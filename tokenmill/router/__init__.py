"""`model: "auto"`: which served model answers a request, by a policy chosen with `serve --router`."""

from tokenmill.router.policies import AUTO, POLICIES, Route, cheapest, escalate_to, mean_logprob

__all__ = ["AUTO", "POLICIES", "Route", "cheapest", "escalate_to", "mean_logprob"]
