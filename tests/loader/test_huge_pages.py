"""A quantized model's weights in one block of 2 MiB pages, which every decode step streams."""

import sys
from pathlib import Path

import pytest

from tokenmill.config import EngineConfig
from tokenmill.loader.model_loader import HUGE_PAGE, load_model
from tokenmill.quant.linear import QuantizedLinear

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.fixture(scope="module")
def int4_smollm2(smollm2_source):
    model, _ = load_model(EngineConfig(quantization="int4"), smollm2_source)
    return model


def test_quantized_weights_share_one_block_from_a_huge_page_boundary(int4_smollm2):
    weights = [
        t for m in int4_smollm2.modules() if isinstance(m, QuantizedLinear) for t in (m.qweight, m.scale)
    ]
    assert len({t.untyped_storage().data_ptr() for t in weights}) == 1
    start = min(t.data_ptr() for t in weights)
    assert start % HUGE_PAGE == 0
    end = max(t.data_ptr() + t.numel() * t.element_size() for t in weights)
    # Packed one after another: the block is the weights' own bytes, 64-byte aligned each.
    assert end - start < sum(t.numel() * t.element_size() + 64 for t in weights)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="transparent huge pages exist only on Linux, where they are not turned off",
)
def test_the_block_is_advised_into_huge_pages(int4_smollm2):
    # Without the advice, Linux's `madvise` mode gives no huge page. With it, the block's 94 MB came in huge pages on
    # this machine, but whether a fault gets one is the kernel's to decide: a CI run once got none (free 2 MiB pages
    # short, or the cgroup's memory full of page cache). So the advice is what is checked.
    assert "hg" in _mapping(int4_smollm2.lm_head.qweight.data_ptr())["VmFlags"].split()


def _mapping(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields (AnonHugePages, VmFlags, ...) of the mapping that holds address."""
    fields: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):
            if fields is not None:
                return fields
            low, high = (int(part, 16) for part in head.split("-"))
            if low <= address < high:
                fields = {}
        elif fields is not None:
            fields[head.rstrip(":")] = rest.strip()
    if fields is None:
        raise AssertionError(f"no mapping holds {address:#x}")
    return fields
