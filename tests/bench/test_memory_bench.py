"""`bench memory`: tokenmill's stages, peaks and their median, each in a fresh process; no llama.cpp is one line."""

import importlib.util
import re

from tokenmill.cli import main


def test_bench_memory_reports_each_stage_the_kv_written_and_the_peak(smollm2_path, capsys, one_thread):
    assert main(["bench", "memory", "--model", str(smollm2_path), "--num-seqs", "2", "--prompt-len", "16",
                 "--output-len", "8", "--peer", "none", "--quantization", "int4", "--rounds", "2",
                 "--num-threads", str(one_thread)]) == 0
    out = capsys.readouterr().out
    stages = dict(re.findall(r"^\| ([a-z ]+) \| ([\d.]+) \| [+-][\d.]+ \|$", out, re.M))
    assert list(stages) == ["start", "import torch", "import tokenmill", "model loaded", "prompts built",
                            "after prefill", "after generate"]
    rss = {name: float(v) for name, v in stages.items()}
    assert rss["import torch"] - rss["start"] > 50  # torch's import is measured in the child, not inherited
    peaks = [float(p) for p in re.findall(r"^\| tokenmill \| ([\d.]+) \|", out, re.M)]
    median = float(re.search(r"^\| tokenmill, median of 2 rounds \| ([\d.]+) \|", out, re.M).group(1))
    # The two rounds' mean: each printed figure is rounded to 0.1, so the two sides differ by up to 0.05 + 0.05.
    assert len(peaks) == 2 and abs(median - sum(peaks) / 2) <= 0.1 + 1e-9
    peak = peaks[0]
    assert peak >= max(rss.values()) - 1  # ru_maxrss in KiB against statm's pages: within rounding
    # Each sequence writes 16 + 8 - 1 tokens (the last one sampled is never fed back): 2 blocks of 16 each.
    assert "(64 tokens at its peak, float16)" in out
    weights = float(re.search(r"weights ([\d.]+) \+ KV", out).group(1))
    assert 80 < weights < 120  # SmolLM2-135M's int4 weights are about 96 MiB


def test_a_missing_llama_cpp_is_one_clear_line(smollm2_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert main(["bench", "memory", "--model", str(smollm2_path), "--num-seqs", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama-cpp-python" in err[0] and "--peer none" in err[0]
