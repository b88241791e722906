"""The machine's price per hour: --price-per-hour, or else a typical cloud price from a small table."""

import re
from dataclasses import dataclass

import torch

# On-demand list prices in USD per hour, as published in mid-2024; yours will differ, hence --price-per-hour.
# CPU: AWS EC2 c7i.large in us-east-1, $0.08925/h for 2 vCPUs, so $0.0446 per vCPU-hour.
USD_PER_VCPU_HOUR = 0.0446
# Per GPU: Lambda Cloud on-demand (H100 SXM, A100 80GB SXM, A10, RTX A6000, V100) and Google Cloud's
# GPU-only price in us-central1 (L4, T4).
USD_PER_GPU_HOUR = {"H100": 2.99, "A100": 1.79, "A6000": 0.80, "V100": 0.55, "L4": 0.56, "A10": 0.75, "T4": 0.35}
# A GPU the table lacks is priced as its dearest entry: overstating a cost is the safer mistake.
_UNKNOWN_GPU_USD_PER_HOUR = max(USD_PER_GPU_HOUR.values())
_OVERRIDE = "pass --price-per-hour USD to use your own price"


@dataclass(frozen=True)
class Price:
    """USD per hour of the machine and, for the start-up log, where the figure comes from."""

    usd_per_hour: float
    basis: str


def machine_price(price_per_hour: float | None, device: str) -> Price:
    """The given price, or the table's price for this device (call it after torch's threads are set)."""
    if price_per_hour is not None:
        return Price(price_per_hour, f"${price_per_hour:g}/h (--price-per-hour)")
    if device.split(":")[0] != "cuda":
        threads = torch.get_num_threads()
        usd = threads * USD_PER_VCPU_HOUR
        return Price(usd, f"${usd:.4f}/h by default: {threads} torch threads x ${USD_PER_VCPU_HOUR} per vCPU-hour "
                          f"(AWS c7i on-demand, us-east-1, 2024); {_OVERRIDE}")
    name = torch.cuda.get_device_name(torch.device(device))
    # A model number not followed by another digit: "A10" is not "A100", nor "L4" "L40S" (an A10G is an A10).
    known = next((gpu for gpu in USD_PER_GPU_HOUR if re.search(rf"\b{gpu}(?!\d)", name.upper())), None)
    if known is None:
        return Price(_UNKNOWN_GPU_USD_PER_HOUR, f"${_UNKNOWN_GPU_USD_PER_HOUR}/h by default: no price is known for "
                                                f"{name}, so the dearest GPU in the table; {_OVERRIDE}")
    usd = USD_PER_GPU_HOUR[known]
    return Price(usd, f"${usd}/h by default: one {known} ({name}) at a 2024 on-demand price; {_OVERRIDE}")
