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
def test_the_block_is_backed_by_huge_pages(int4_smollm2):
    # Here the block's 94 MB all came in huge pages. A machine short of free 2 MiB pages falls back to 4 KiB ones
    # for some of it, so one is asked for: without the advice, Linux's `madvise` mode gives none.
    assert _anon_huge_kib(int4_smollm2.lm_head.qweight.data_ptr()) * 1024 >= HUGE_PAGE


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping that holds address, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")
