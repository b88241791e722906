"""The ops whose vector code the target CPU decides, built for other x86 CPUs than this one, against this one's build.

- For an AVX2-only CPU: on an AVX-512 machine this runs vec.h's and attention.cpp's AVX2 paths, which its own build
  never takes, and holds them to the AVX-512 code bit for bit; on an AVX2 machine both builds take the same path.
- For x86 without AVX2: vec.h's portable paths (GCC vector extensions), which aarch64 builds take and no x86 build
  of tokenmill's own does. They add up sums in another order, so they are held to within float rounding.

Each build compiles the sources that include vec.h. The int8/int4 kernels need no such build: each kernel file sets
its own target, so every one is built on any x86 CPU and tests/quant/test_kernels.py runs each (tests/test_ops_sources.py
compiles them for x86 without AVX2).
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from tokenmill import ops
from tokenmill.env import cpu_features

_CSRC = Path(ops.__file__).parent / "csrc"
_RUNS_AVX2 = ops.ARCH == "x86" and {"avx2", "fma", "f16c"} <= set(cpu_features()[1])


class _Build(NamedTuple):
    cpu: str  # as -march names it
    exact: bool  # whether it must give this machine's build's bits
    extra: list[str]  # flags after the build's own
    runs: bool  # whether this CPU runs its code: loading it elsewhere could fault in its static initializers


_BUILDS = {
    "avx2": _Build("haswell", True, [], _RUNS_AVX2),
    # -O1: attention.cpp builds in 9 s rather than 33, and without FMA on this target there is no contraction for
    # the level to change; only the results are under test here.
    "portable": _Build("x86-64", False, ["-O1"], True),
}

pytestmark = pytest.mark.skipif(ops.ARCH != "x86", reason="builds the ops for other x86 CPUs")


def _build(name: str) -> None:
    """torch.ops.tokenmill_<name>: the sources that include vec.h built for _BUILDS[name]'s CPU, build_ops.cpp registering."""
    build = _BUILDS[name]
    files = [str(Path(__file__).with_name("build_ops.cpp"))] + [s for s in ops.sources() if '#include "vec.h"' in Path(s).read_text()]
    flags = [*ops.compile_flags(cpu=build.cpu), *build.extra, f"-I{_CSRC}", f"-DTOKENMILL_BUILD_OPS=tokenmill_{name}"]
    # Under the ops' own lock: a run of the suite stopped mid-build left torch's lock file, and the next waited forever.
    ops.locked_build(f"tokenmill_{name}_test_ops", files, flags)


def _build_all() -> list[str]:
    """Every build this CPU runs at once, each a file at a time (MAX_JOBS=1): the AVX2 build's attention.cpp is most of
    the time, and the other files of both builds fit beside it. The builds' names."""
    names = [name for name, build in _BUILDS.items() if build.runs] if ops.ARCH == "x86" else []
    with ThreadPoolExecutor(len(_BUILDS)) as pool:
        list(pool.map(_build, names))
    return names


@pytest.fixture(scope="module")
def builds(early_output) -> None:
    """The builds loaded: this file's run as a script (tests/conftest.py) compiled them, so each load finds its build done."""
    assert ops.available(), "the C++ ops must build on the test machine"
    early_output(Path(__file__))
    _build_all()


@pytest.fixture(params=[
    pytest.param(name, marks=pytest.mark.skipif(not build.runs, reason=f"this CPU does not run {build.cpu} code"))
    for name, build in _BUILDS.items()
])
def build(request, builds) -> str:
    """One build's name."""
    return request.param


def _both(build: str, name: str, make) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Runs op `name` of the native build and of `build` on its own arguments from make(); each one's tensors after."""
    runs = []
    for op in (getattr(torch.ops.tokenmill, name), getattr(getattr(torch.ops, f"tokenmill_{build}"), name)):
        args = make()
        op(*args)
        runs.append([a for a in args if isinstance(a, torch.Tensor)])
    return runs[0], runs[1]


def _normal(t: torch.Tensor) -> torch.Tensor:
    """t with subnormal floats as zero: AVX512-BF16's conversion to bfloat16 flushes them, the others keep them."""
    return torch.where(t.abs() < torch.finfo(t.dtype).tiny, 0, t) if t.is_floating_point() else t


def _assert_agree(build: str, native: list[torch.Tensor], built: list[torch.Tensor]) -> None:
    """The same bits where the build must give them; else within assert_close's tolerances (a few units in the last place)."""
    for a, b in zip(native, built, strict=True):
        if _BUILDS[build].exact:
            assert torch.equal(_normal(a), _normal(b))
        else:
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "kv_dtype", "dtype", "window"),
    [
        (9, 3, 64, torch.float16, torch.float32, 0),  # SmolLM2, float16 KV (the default)
        (9, 3, 64, torch.int8, torch.float32, 0),
        (4, 1, 256, torch.float16, torch.float32, 48),  # Gemma 3's sliding-window layers
        (8, 8, 32, torch.float32, torch.float32, 0),
        (4, 2, 128, torch.bfloat16, torch.bfloat16, 0),
    ],
)
def test_paged_attention_agrees(build, heads, kv_heads, head_dim, kv_dtype, dtype, window):
    block_size, blocks, rows = 16, 40, 24

    def make():
        gen = torch.Generator().manual_seed(0)
        k, v = (torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen) for _ in range(2))
        scales = [None, None]  # the inferred schemas give no defaults
        if kv_dtype == torch.int8:
            k, v = ((x * 40).round().clamp(-127, 127).to(torch.int8) for x in (k, v))
            scales = [(torch.rand(blocks, block_size, kv_heads, generator=gen) / 40).half() for _ in range(2)]
        # Rows of 1 to 300 keys over shuffled blocks: a prompt's first 8 rows (one table: AVX-512 takes them 4 at a
        # time), then decodes deep into their blocks.
        lens = torch.cat([torch.arange(1, 9), torch.randint(9, 300, (rows - 8,), generator=gen)])
        tables = torch.stack([torch.randperm(blocks, generator=gen)[:19] for _ in range(rows)])
        tables[:8] = tables[0]
        q = (torch.randn(rows, heads, head_dim, generator=gen) * 3).to(dtype)
        return [q, k.to(kv_dtype), v.to(kv_dtype), tables, lens, head_dim**-0.5, window, torch.zeros_like(q), *scales]

    native, built = _both(build, "paged_attention", make)
    assert native[5].abs().sum() > 0  # the output
    _assert_agree(build, native, built)


@pytest.mark.parametrize(("head_dim", "kv_dtype"), [(64, torch.float16), (256, torch.float16), (64, torch.int8)])
def test_a_decode_row_split_across_threads_agrees(build, head_dim, kv_dtype):
    # One row of one KV head over 1,000 keys: its scores split over key ranges, its sums over heads and halves.
    def make():
        gen = torch.Generator().manual_seed(1)
        k, v = (torch.randn(80, 16, 1, head_dim, generator=gen) for _ in range(2))
        scales = [None, None]
        if kv_dtype == torch.int8:
            k, v = ((x * 40).round().clamp(-127, 127).to(torch.int8) for x in (k, v))
            scales = [(torch.rand(80, 16, 1, generator=gen) / 40).half() for _ in range(2)]
        q = torch.randn(1, 3, head_dim, generator=gen) * 3
        tables = torch.randperm(80, generator=gen)[:63][None]
        return [q, k.to(kv_dtype), v.to(kv_dtype), tables, torch.tensor([1000]), head_dim**-0.5, 0, torch.zeros_like(q),
                *scales]

    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        native, built = _both(build, "paged_attention", make)
    finally:
        torch.set_num_threads(threads)
    assert native[5].abs().sum() > 0
    _assert_agree(build, native, built)

@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int8, torch.bfloat16])
def test_store_kv_agrees(build, kv_dtype):
    def make():
        gen = torch.Generator().manual_seed(1)
        qkv = torch.randn(10, 9, 64, generator=gen) * 3
        scales = [torch.zeros(4, 16, 3, dtype=torch.float16) for _ in range(2)] if kv_dtype == torch.int8 else [None, None]
        caches = [torch.zeros(4, 16, 3, 64, dtype=kv_dtype) for _ in range(2)]
        # k and v are views into the fused QKV output, as the model passes them.
        return [qkv[:, 3:6], qkv[:, 6:], *caches, torch.randperm(64, generator=gen)[:10], *scales]

    native, built = _both(build, "store_kv", make)
    assert native[2].float().abs().sum() > 0  # the key cache
    _assert_agree(build, native, built)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_agree(build, dtype):
    def rows():
        gen = torch.Generator().manual_seed(2)
        x, residual = (torch.randn(33, 576, generator=gen).to(dtype) for _ in range(2))
        return x, residual, (torch.rand(576, generator=gen) + 0.5).to(dtype)

    def heads():  # query heads sliced out of rows that also hold key heads
        gen = torch.Generator().manual_seed(3)
        qk = torch.randn(7, 5, 32, generator=gen).to(dtype)
        return [qk[:, :3], (torch.rand(32, generator=gen) + 0.5).to(dtype), 1e-6, torch.empty(7, 3, 32, dtype=dtype)]

    def plain():
        x, _, weight = rows()
        return [x, weight, 1e-5, torch.empty_like(x)]

    def fused():
        x, residual, weight = rows()
        return [x, residual, weight, 1e-5]

    for op, make in (("rms_norm", plain), ("rms_norm", heads), ("fused_add_rms_norm", fused)):
        _assert_agree(build, *_both(build, op, make))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["silu_and_mul", "gelu_tanh_and_mul"])
def test_gated_activations_agree(build, op, dtype):
    def make():
        gate_up = torch.randn(17, 2 * 1536, generator=torch.Generator().manual_seed(4)) * 4
        gate_up[0, :16] = torch.tensor([-200.0, 200.0, -90.0, 90.0] * 4)  # past exp's clamps at -87 and 88
        return [gate_up.to(dtype), torch.empty(17, 1536, dtype=dtype)]

    _assert_agree(build, *_both(build, op, make))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_agrees(build, dtype):
    def make():
        gen = torch.Generator().manual_seed(5)
        qkv = torch.randn(12, 15, 64, generator=gen).to(dtype)
        angles = torch.rand(12, 1, 32, generator=gen) * 6
        return [qkv[:, :12], angles.cos().to(dtype), angles.sin().to(dtype)]  # the query and key heads, in place

    _assert_agree(build, *_both(build, "rotary_", make))


def test_argmax_rows_gives_the_same_indices(build):
    def make():
        logits = torch.randint(0, 40, (9, 49155), generator=torch.Generator().manual_seed(6)).float()  # many ties
        logits[3, ::7] = float("nan")
        return [logits, torch.empty(9, dtype=torch.long)]

    native, built = _both(build, "argmax_rows", make)
    assert torch.equal(native[1], make()[0].max(dim=-1).indices)
    assert torch.equal(built[1], native[1])  # the logits hold NaN, which never equals itself


if __name__ == "__main__":
    os.environ["MAX_JOBS"] = "1"
    print(json.dumps(_build_all()))
