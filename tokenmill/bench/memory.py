"""`tokenmill bench memory`: peak RSS of the loaded workload, tokenmill against llama.cpp, one fresh process each.

Each engine runs in its own child process, so one's pages never count for the other; the children alternate.
NOTE: this module imports only the standard library at its top and the child loads it by file path, outside the
tokenmill package: `import tokenmill` alone is 9 MiB, which would count for llama.cpp, and the tokenmill child
measures torch's and tokenmill's imports as stages of its own.
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_MIB = 1 << 20
# The child: this file as a module of its own (not tokenmill.bench.memory), then child(engine, options JSON).
_CHILD = ("import importlib.util as u, sys; s = u.spec_from_file_location('tokenmill_bench_memory', sys.argv[1]); "
          "m = u.module_from_spec(s); s.loader.exec_module(m); m.child(sys.argv[2], sys.argv[3])")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench memory` flags: the workload, the peer, and the engine flags."""
    from tokenmill.flags import add_engine_flags, workload_seed

    parser.add_argument("--num-seqs", type=int, default=16, help="sequences in one LLM.generate")
    parser.add_argument("--prompt-len", type=int, default=500, help="prompt tokens per sequence")
    parser.add_argument("--output-len", type=int, default=500, help="generated tokens per sequence (EOS ignored)")
    parser.add_argument("--rounds", type=int, default=1, help="times each engine runs, alternating")
    parser.add_argument("--peer", choices=("llama.cpp", "none"), default="llama.cpp")
    parser.add_argument("--peer-n-ctx", type=int, default=None,
                        help="llama.cpp's n_ctx (default: the workload's total tokens rounded up to 1024); its KV "
                             "cache is allocated for all of it at load, so it runs one sequence")
    parser.add_argument("--sample-ms", type=float, default=0,
                        help="sample tokenmill's RSS on a thread this often to say when its peak came (default: off; "
                             "the thread's own glibc arena adds about 2 MiB to the peak)")
    parser.add_argument("--seed", type=workload_seed, default=0)
    add_engine_flags(parser)


def main(args: argparse.Namespace) -> int:
    """Run the children, alternating, and print the peak table and tokenmill's stages."""
    from tokenmill.errors import InvalidRequestError
    from tokenmill.flags import engine_options

    for name in ("num_seqs", "prompt_len", "output_len", "rounds"):
        if getattr(args, name) < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1")
    if args.peer == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        raise InvalidRequestError("the llama.cpp peer needs llama-cpp-python (`pip install llama-cpp-python`, "
                                  "builds from source); or pass --peer none")
    total = args.num_seqs * (args.prompt_len + args.output_len)
    n_ctx = args.peer_n_ctx or -(-total // 1024) * 1024
    workload = {"num_seqs": args.num_seqs, "prompt_len": args.prompt_len, "output_len": args.output_len,
                "seed": args.seed, "sample_ms": args.sample_ms}
    ours = {**workload, "engine": engine_options(args, enable_prefix_caching=False)}
    peer = {**workload, "model": str(_gguf_path(args.model)) if args.peer == "llama.cpp" else "", "n_ctx": n_ctx,
            "threads": args.num_threads or 2}
    runs: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        runs.append(_spawn("tokenmill", ours))
        if args.peer == "llama.cpp":
            runs.append(_spawn("llama.cpp", peer))
    print(f"model {args.model}, {args.num_seqs} sequences x ({args.prompt_len} prompt + {args.output_len} generated) "
          f"tokens in one LLM.generate, kv-cache-dtype {args.kv_cache_dtype}, quantization {args.quantization}"
          + (f"; llama.cpp n_ctx {n_ctx}, {peer['threads']} threads, one sequence of the same lengths (its KV "
             "cache is allocated for all of n_ctx at load)" if args.peer == "llama.cpp" else ""))
    print()
    print(_peak_table(runs))
    for engine in ("tokenmill", "llama.cpp"):
        first = next((r for r in runs if r["engine"] == engine), None)
        if first is not None:
            print()
            print(_stage_table(first))
    return 0


def _gguf_path(model: str) -> Path:
    """The GGUF file both engines load: a path as given, else the catalog's file (pulled if missing)."""
    from tokenmill.errors import InvalidRequestError
    from tokenmill.loader import catalog

    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise InvalidRequestError("the llama.cpp peer loads the same GGUF file; give a .gguf model or --peer none")
        return path
    if "/" in model:
        raise InvalidRequestError(f"no such file: {model}")
    catalog.entry_for(model)
    path = catalog.pull(model)
    if path.suffix != ".gguf":
        raise InvalidRequestError(f"{model} is not a GGUF file; llama.cpp cannot load it: pass --peer none")
    return path


def _spawn(engine: str, options: dict[str, Any]) -> dict[str, Any]:
    """One fresh child process; its last stdout line is the JSON report."""
    from tokenmill.errors import InvalidRequestError

    run = subprocess.run([sys.executable, "-c", _CHILD, __file__, engine, json.dumps(options)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise InvalidRequestError(f"the {engine} child failed:\n{run.stderr.strip()[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _peak_table(runs: list[dict[str, Any]]) -> str:
    """Each child's peak, in the order they ran, against llama.cpp's lowest."""
    peers = [r["peak"] for r in runs if r["engine"] == "llama.cpp"]
    baseline = min(peers) if peers else None
    lines = ["| engine | peak RSS, MiB (ru_maxrss) | highest between steps | vs llama.cpp |", "|---|---|---|---|"]
    for r in runs:
        ratio = f"{r['peak'] / baseline:.2f}x" if baseline and r["engine"] != "llama.cpp" else ""
        lines.append(f"| {r['engine']} | {r['peak']:.1f} | {r['steady_peak']:.1f} | {ratio} |")
    ours = [r["peak"] for r in runs if r["engine"] == "tokenmill"]
    if len(ours) > 1:  # a round's peak moves by a few MiB with where glibc's heap happens to put things
        median = statistics.median(ours)
        ratio = f"{median / statistics.median(peers):.3f}x (medians)" if peers else ""
        lines.append(f"| tokenmill, median of {len(ours)} rounds | {median:.1f} | | {ratio} |")
    return "\n".join(lines)


def _stage_table(run: dict[str, Any]) -> str:
    """One engine's RSS after each stage and its increment; for tokenmill, what its peak holds."""
    lines = [f"| {run['engine']} stage | RSS, MiB | + MiB |", "|---|---|---|"]
    before = 0.0
    for name, rss in run["stages"]:
        lines.append(f"| {name} | {rss:.1f} | {rss - before:+.1f} |")
        before = rss
    d = run["detail"]
    lines += ["", f"at the end: anonymous {d['anonymous']:.1f} MiB, shared memory {d['shmem']:.1f} (tokenmill's KV "
              f"pool), file-backed {d['file']:.1f}"]
    if run["engine"] == "tokenmill":
        stages = dict(run["stages"])
        torch_import = stages["import torch"] - stages["start"]
        other = run["peak"] - stages["start"] - torch_import - d["weights"] - d["kv_written"]
        lines += [
            f"peak {run['peak']:.1f} MiB = interpreter {stages['start']:.1f} + torch's import {torch_import:.1f} + "
            f"weights {d['weights']:.1f} + KV written {d['kv_written']:.1f} ({d['kv_tokens']} tokens at its peak, "
            f"{d['kv_dtype']}) + other {other:.1f}",
            f"generate: {d['steps']} steps, {d['generate_s']:.1f} s"
            + (f"; the sampled peak came {d['peak_at']:.1f} s into it" if d["peak_at"] is not None else ""),
        ]
    return "\n".join(lines)


def _rss() -> float:
    """Resident set now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / _MIB


def _peak() -> float:
    """The process's peak resident set, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _smaps() -> dict[str, float]:
    """Resident MiB by kind from /proc/self/smaps_rollup (shared memory: no other process maps tokenmill's pool)."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    anonymous, shmem = fields["Anonymous"], fields["Pss_Shmem"]
    return {"anonymous": anonymous, "shmem": shmem, "file": fields["Rss"] - anonymous - shmem}


class _Sampler:
    """RSS sampled on a thread, to say when in the run the peak came."""

    def __init__(self, period_ms: float) -> None:
        self.period = period_ms / 1000
        self.start = time.perf_counter()
        self.high, self.high_at = 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            rss = _rss()
            if rss > self.high:
                self.high, self.high_at = rss, time.perf_counter() - self.start

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _child_tokenmill(options: dict[str, Any]) -> dict[str, Any]:
    stages = [("start", _rss())]
    import torch  # noqa: F401

    stages.append(("import torch", _rss()))
    import random

    from tokenmill import LLM, SamplingParams
    from tokenmill.bench.datasets import ordinary_tokens

    stages.append(("import tokenmill", _rss()))
    llm = LLM(**options["engine"])
    stages.append(("model loaded", _rss()))
    engine = llm.engine
    # The harness's memory is not the engine's: the standard library's generator, as the llama.cpp child's (numpy's
    # is 1.1 MiB of extension modules the engine never imports), and the vocabulary's ids dropped once drawn from.
    rng = random.Random(options["seed"])
    ordinary = ordinary_tokens(llm.tokenizer)
    prompts = [{"prompt_token_ids": [int(ordinary[rng.randrange(len(ordinary))]) for _ in range(options["prompt_len"])]}
               for _ in range(options["num_seqs"])]
    del ordinary
    params = SamplingParams(temperature=0, max_tokens=options["output_len"], ignore_eos=True)
    stages.append(("prompts built", _rss()))

    started: set[str] = set()
    state = {"steps": 0, "steady": 0.0, "blocks": 0}
    real_step = engine.step

    def step():
        outputs = real_step()
        state["steps"] += 1
        state["steady"] = max(state["steady"], _rss())
        state["blocks"] = max(state["blocks"], engine.block_manager.num_blocks - engine.block_manager.num_free_blocks)
        fresh = {o.request_id for o in outputs if o.outputs and o.outputs[0].token_ids} - started
        if fresh:
            started.update(fresh)
            if len(started) == options["num_seqs"]:
                stages.append(("after prefill", _rss()))
        return outputs

    engine.step = step
    start = time.perf_counter()
    sampler = _Sampler(options["sample_ms"]) if options["sample_ms"] > 0 else None
    outputs = llm.generate(prompts, params, use_tqdm=False)
    if sampler is not None:
        sampler.stop()
    generate_s = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == options["output_len"] for o in outputs)
    stages.append(("after generate", _rss()))
    model = engine.runner.model
    tensors = {t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    kv = engine.runner.kv_cache
    detail = {
        "start": stages[0][1], "weights": sum(tensors.values()) / _MIB,
        "kv_written": state["blocks"] * kv.block_bytes / _MIB, "kv_tokens": state["blocks"] * kv.block_size,
        "kv_dtype": str(kv.dtype).removeprefix("torch."), "peak_at": sampler.high_at if sampler else None,
        "steps": state["steps"], "generate_s": generate_s, **_smaps(),
    }
    return {"engine": "tokenmill", "stages": stages, "peak": _peak(), "steady_peak": state["steady"],
            "detail": detail}


def _child_llama_cpp(options: dict[str, Any]) -> dict[str, Any]:
    import random

    stages = [("start", _rss())]
    from llama_cpp import Llama

    stages.append(("import llama_cpp", _rss()))
    llm = Llama(model_path=options["model"], n_ctx=options["n_ctx"], n_threads=options["threads"], verbose=False)
    stages.append(("model loaded", _rss()))
    rng = random.Random(options["seed"])
    prompt = [rng.randrange(256, llm.n_vocab()) for _ in range(options["prompt_len"])]
    produced, steady = 0, 0.0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        produced += 1
        if produced == 1:
            stages.append(("after prefill", _rss()))
        steady = max(steady, _rss())
        if produced == options["output_len"]:
            break
    stages.append(("after generate", _rss()))
    return {"engine": "llama.cpp", "stages": stages, "peak": _peak(), "steady_peak": steady, "detail": _smaps()}


def child(engine: str, options: str) -> None:
    """Run one engine on the workload in this (fresh) process and print its report as one JSON line."""
    run = _child_tokenmill if engine == "tokenmill" else _child_llama_cpp
    print(json.dumps(run(json.loads(options))))
