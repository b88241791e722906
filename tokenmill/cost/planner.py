"""`tokenmill plan`: the rate one replica sustains within latency targets, the replicas a rate needs, and the bill."""

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from tokenmill.cost.simulator import Workload, simulate, summarize
from tokenmill.cost.step_times import Profile, load_profile
from tokenmill.errors import InvalidRequestError
from tokenmill.flags import output_path, workload_seed

HOURS_PER_MONTH = 730  # 8,760 hours a year over 12 months, as cloud price lists count a month
# Rates are searched to within this ratio: finer than a simulation of a few hundred requests can tell apart.
RATE_PRECISION = 1.01


@dataclass(frozen=True)
class Targets:
    """Latency targets in milliseconds, met when that percentile of the simulated requests is within each."""

    ttft_ms: float | None
    tpot_ms: float | None
    percentile: float = 99.0

    def met_by(self, summary: dict) -> bool:
        """True when the summary's percentile TTFT and TPOT are within the targets that are set."""
        key = f"p{self.percentile:g}"
        tpot = summary["tpot_ms"][key]
        return ((self.ttft_ms is None or summary["ttft_ms"][key] <= self.ttft_ms)
                and (self.tpot_ms is None or tpot is None or tpot <= self.tpot_ms))


def predict(profile: Profile, workload: Workload, rate: float, percentile: float) -> dict:
    """The simulated latencies and throughput of one replica at this request rate."""
    return summarize(simulate(profile.times, profile.settings, workload.requests(rate)), percentile)


def capacity(profile: Profile, workload: Workload) -> float:
    """Requests per second one replica completes when every request is already waiting: no rate above is sustained."""
    return predict(profile, workload, math.inf, 50)["request_throughput"]


def max_rate(profile: Profile, workload: Workload, targets: Targets, ceiling: float) -> float:
    """The highest rate below ceiling (the capacity) whose simulation meets the targets; 0 if none does."""
    def meets(rate: float) -> bool:
        return targets.met_by(predict(profile, workload, rate, targets.percentile))

    lo, hi = ceiling / 1000, ceiling  # at a thousandth of capacity a request runs as good as alone
    if not meets(lo):
        return 0.0
    # A finite run below capacity always ends, so latency targets alone decide; the search is on a log scale.
    while hi / lo > RATE_PRECISION:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo


def plan(profile: Profile, workload: Workload, rate: float, targets: Targets, price_per_hour: float) -> dict:
    """For one profile: capacity, the highest rate within the targets, replicas for `rate`, their latencies and bill."""
    ceiling = capacity(profile, workload)
    best = max_rate(profile, workload, targets, ceiling)
    result = {"profile": str(profile.path), "label": profile.label, "price_per_hour": price_per_hour,
              "capacity_rps": ceiling, "max_rate_rps": best, "replicas": None, "per_replica": None,
              "monthly_usd": None, "usd_per_1m_tokens": None, "usd_per_1m_output_tokens": None}
    if best == 0:
        return result
    replicas = math.ceil(rate / best / (1 + 1e-9))  # a rate equal to the maximum needs one replica, not two
    requests = workload.requests(rate / replicas)
    monthly = replicas * price_per_hour * HOURS_PER_MONTH
    seconds = HOURS_PER_MONTH * 3600
    output_per_request = sum(out for _, _, out in requests) / len(requests)
    tokens_per_request = sum(prompt for _, prompt, _ in requests) / len(requests) + output_per_request
    result.update(
        replicas=replicas,
        per_replica={"rate_rps": rate / replicas, **predict(profile, workload, rate / replicas, targets.percentile)},
        monthly_usd=monthly,
        usd_per_1m_tokens=monthly / (rate * tokens_per_request * seconds) * 1e6,
        usd_per_1m_output_tokens=monthly / (rate * output_per_request * seconds) * 1e6,
    )
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `plan` flags."""
    parser.add_argument("--profile", type=Path, nargs="+", required=True,
                        help="JSON from `tokenmill bench profile`; several compare their settings")
    parser.add_argument("--rate", type=float, required=True, help="requests per second to serve")
    parser.add_argument("--prompt-len", type=int, default=128, help="mean prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="mean tokens generated")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="lengths uniform in mean * (1 +- spread), as `bench serve --range-ratio`")
    parser.add_argument("--ttft-ms", type=float, help="time-to-first-token target")
    parser.add_argument("--tpot-ms", type=float, help="time-per-output-token target")
    parser.add_argument("--percentile", type=float, default=99.0, help="which percentile must meet the targets")
    parser.add_argument("--price-per-hour", type=float, metavar="USD",
                        help="machine price (default: the price each profile recorded, stated in the output)")
    parser.add_argument("--num-requests", type=int, default=500, help="requests per simulated run")
    parser.add_argument("--seed", type=workload_seed, default=0, help="arrivals and lengths, as `bench serve --seed`")
    parser.add_argument("--out", type=output_path, help="also write the plans as JSON here")


def main(args: argparse.Namespace) -> int:
    """Plan for each profile and print the comparison."""
    _check(args)
    profiles = [load_profile(path) for path in args.profile]
    workload = Workload(args.prompt_len, args.output_len, args.spread, args.num_requests, args.seed)
    longest = max(prompt + out for _, prompt, out in workload.requests(args.rate))
    for profile in profiles:
        if longest > profile.settings["max_model_len"]:
            raise InvalidRequestError(f"the longest request is {longest} tokens; {profile.path}'s engine takes "
                                      f"{profile.settings['max_model_len']}; shorten the workload")
    targets = Targets(args.ttft_ms, args.tpot_ms, args.percentile)
    plans = [plan(p, workload, args.rate, targets,
                  p.price_per_hour if args.price_per_hour is None else args.price_per_hour) for p in profiles]
    print(format_plans(args, profiles, plans))
    if args.out:
        args.out.write_text(json.dumps(plans, indent=2))
    return 0


def _check(args: argparse.Namespace) -> None:
    if args.ttft_ms is None and args.tpot_ms is None:
        raise InvalidRequestError("give a target: --ttft-ms, --tpot-ms or both")
    if any(v is not None and not 0 < v < math.inf for v in (args.rate, args.ttft_ms, args.tpot_ms)):
        raise InvalidRequestError("--rate, --ttft-ms and --tpot-ms must be positive numbers")
    if args.prompt_len < 1 or args.output_len < 1 or args.num_requests < 1:
        raise InvalidRequestError("--prompt-len, --output-len and --num-requests must be at least 1")
    if not 0 <= args.spread < 1 or not 0 < args.percentile <= 100:
        raise InvalidRequestError("need 0 <= --spread < 1 and 0 < --percentile <= 100")
    if args.price_per_hour is not None and not 0 <= args.price_per_hour < math.inf:
        raise InvalidRequestError("--price-per-hour must be a USD amount >= 0")


def format_plans(args: argparse.Namespace, profiles: list[Profile], plans: list[dict]) -> str:
    """One column per profile."""
    p = f"p{args.percentile:g}"
    targets = " and ".join(f"{name} <= {value:g} ms" for name, value in (("TTFT", args.ttft_ms), ("TPOT", args.tpot_ms))
                           if value is not None)
    lines = [f"workload: {args.rate:g} req/s, prompts {args.prompt_len} and outputs {args.output_len} tokens "
             f"(+-{args.spread:.0%}), Poisson; targets: {p} {targets}"]
    rows: list[tuple[str, list[str]]] = [("profile", [x["label"] for x in plans])]
    rows.append(("price per hour (USD)", [f"{x['price_per_hour']:g}" for x in plans]))
    rows.append(("capacity (req/s, all waiting)", [f"{x['capacity_rps']:.2f}" for x in plans]))
    rows.append(("max rate within targets (req/s)", [f"{x['max_rate_rps']:.2f}" for x in plans]))
    rows.append((f"replicas for {args.rate:g} req/s", [str(x["replicas"] or "none meets the targets") for x in plans]))
    per = [x["per_replica"] for x in plans]
    rows.append(("rate per replica (req/s)", [_num(r and r["rate_rps"], ".2f") for r in per]))
    for name in ("ttft", "tpot"):
        rows.append((f"{name.upper()} ms median / {p}",
                     [f"{_num(r and r[f'{name}_ms']['median'], '.1f')} / {_num(r and r[f'{name}_ms'][p], '.1f')}"
                      for r in per]))
    rows.append(("throughput per replica (req/s)", [_num(r and r["request_throughput"], ".2f") for r in per]))
    rows.append(("output tokens/s per replica", [_num(r and r["output_throughput"], ".1f") for r in per]))
    rows.append(("monthly bill (USD)", [_num(x["monthly_usd"], ",.2f") for x in plans]))
    rows.append(("USD per 1M tokens (prompt + output)", [_num(x["usd_per_1m_tokens"], ".4f") for x in plans]))
    rows.append(("USD per 1M output tokens", [_num(x["usd_per_1m_output_tokens"], ".4f") for x in plans]))
    width = max(len(name) for name, _ in rows)
    widths = [max(len(values[i]) for _, values in rows) for i in range(len(plans))]
    lines += [f"{name:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, widths)) for name, values in rows]
    if args.price_per_hour is None:
        lines += [f"price of {profile.path}: {profile.price_basis}" for profile in profiles]
    return "\n".join(lines)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
