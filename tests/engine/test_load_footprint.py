"""What a model load leaves besides the weights: no file pages, vocabulary strings, sympy or llguidance."""

import json
import subprocess
import sys
from pathlib import Path

# A fresh process: other tests import sympy (transformers) and read the file themselves.
_LOAD = """
import gc, json, sys
from tokenmill import LLM

gc.collect()
blocks = sys.getallocatedblocks()
llm = LLM(sys.argv[1], quantization="int8")
gc.collect()
resident_kib, in_file = 0, False
for line in open("/proc/self/smaps"):
    fields = line.split()
    if "-" in fields[0] and not fields[0].endswith(":"):
        in_file = fields[-1] == sys.argv[1]
    elif in_file and fields[0] == "Rss:":
        resident_kib += int(fields[1])
print(json.dumps({
    "file_resident_kib": resident_kib,
    "sympy": "sympy" in sys.modules,
    "llguidance": "llguidance" in sys.modules,
    "python_objects": sys.getallocatedblocks() - blocks,
    "hello": llm.tokenizer.encode("Hello world"),
}))
"""


def test_loading_smollm2_leaves_no_file_pages_vocabulary_strings_sympy_or_llguidance(smollm2_path: Path):
    out = subprocess.run([sys.executable, "-c", _LOAD, str(smollm2_path)], capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.splitlines()[-1])
    assert found["file_resident_kib"] == 0  # each tensor's pages, and the header's, are given back once read
    assert not found["sympy"]  # torch's meta-device reference ops import it and ~480 other modules
    assert not found["llguidance"]  # 6 MiB with its pydantic, for structured-output requests only
    # About 25,000 (modules the load imports, the model's Python objects); the vocabulary's 49,152 token strings
    # and 48,900 merges, if anything kept them, would be twice that.
    assert found["python_objects"] < 50_000
    assert found["hello"] == [19556, 905]
