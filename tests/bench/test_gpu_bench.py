"""`tokenmill bench gpu` runs end to end on a tiny shape (on CPU here; its figures are for a CUDA machine)."""

import re
import subprocess
import sys


def test_bench_gpu_prints_each_figure_with_its_ratio():
    run = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "bench", "gpu", "--device", "cpu", "--dtype", "float32", "--shape",
         "tiny", "--num-prompts", "3", "--input-len", "8", "--output-len", "4", "--decode-steps", "4"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    ratios = {line.split(":")[0]: float(m.group(1)) for line in run.stdout.splitlines()
              if (m := re.search(r"([\d.]+)x", line))}
    assert set(ratios) == {"decode step at batch 1, no graphs off CUDA", "decode step at batch 1, eager",
                           "CUDA graphs against eager", "offline 3 x (8 in, 4 out)"}
    assert all(r > 0 for r in ratios.values())
