"""`tokenmill run-batch`: OpenAI Batch API files answered as the server answers each line, in input order."""

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tokenmill import cli
from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.errors import InvalidRequestError
from tokenmill.run_batch import BatchRequest, read_requests, run


def _line(custom_id: str, url: str, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


LINES = [
    # The longest first: the lines after it finish before it does, and must still be written after it.
    _line("story", "/v1/completions", model="smollm2-135m", prompt="Once upon a time", max_tokens=40,
          temperature=0),
    _line("capital", "/v1/chat/completions", model="smollm2-135m", max_tokens=8, temperature=0,
          messages=[{"role": "user", "content": "What is the capital of France?"}]),
    _line("bad", "/v1/completions", model="smollm2-135m", prompt="hi", max_tokens=-3),
    "",  # blank lines are skipped, as OpenAI's validator skips them
    _line("unknown", "/v1/chat/completions", model="nope", messages=[{"role": "user", "content": "hi"}]),
    _line("count", "/v1/completions", model="smollm2-135m", prompt="1, 2, 3,", max_tokens=6, temperature=0),
    _line("response", "/v1/responses", model="smollm2-135m", max_output_tokens=8, temperature=0,
          input="What is the capital of France?"),
]


def _run_batch(tmp_path: Path, smollm2_path: Path, *flags: str) -> list[dict]:
    source, out = tmp_path / "in.jsonl", tmp_path / f"out{len(flags)}.jsonl"
    source.write_text("\n".join(LINES) + "\n")
    code = cli.main(["run-batch", "-i", str(source), "-o", str(out), "--model", f"smollm2-135m={smollm2_path}",
                     *flags])
    assert code == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_each_line_is_answered_as_the_server_would_in_input_order_and_batching_changes_no_token(
        tmp_path, smollm2_path, capsys):
    batched = _run_batch(tmp_path, smollm2_path)
    summary = capsys.readouterr().err
    assert [line["custom_id"] for line in batched] == ["story", "capital", "bad", "unknown", "count", "response"]
    assert [line["response"]["status_code"] for line in batched] == [200, 200, 400, 404, 200, 200]
    assert all(line["error"] is None and line["id"].startswith("batch_req_") for line in batched)
    bodies = [line["response"]["body"] for line in batched]
    assert "Paris" in bodies[1]["choices"][0]["message"]["content"]
    assert bodies[2]["error"]["param"] == "max_tokens"  # the server's own 400, in OpenAI's error shape
    assert bodies[0]["usage"]["completion_tokens"] == 40 and bodies[0]["usage"]["cost"] > 0
    assert batched[1]["response"]["request_id"] == bodies[1]["id"]
    # The Responses API's answer to the chat line's question, as chat answered it.
    assert bodies[5]["output"][0]["content"][0]["text"] == bodies[1]["choices"][0]["message"]["content"]
    cost = sum(body["usage"]["cost"] for body in bodies if "usage" in body)
    completion = sum(body["usage"].get("completion_tokens", body["usage"].get("output_tokens", 0))
                     for body in bodies if "usage" in body)
    assert completion == 40 + 8 + 6 + 8  # the responses line's output tokens counted too
    assert "6 requests" in summary and "4 answered, 2 failed (1 x 400, 1 x 404" in summary
    assert f"cost ${cost:.6f}" in summary and f" + {completion} completion tokens" in summary

    alone = _run_batch(tmp_path, smollm2_path, "--max-concurrency", "1")
    assert [b["response"]["body"].get("choices") for b in alone] == [b.get("choices") for b in bodies]


@pytest.mark.parametrize("line, message", [
    ("{not json", "in.jsonl:1: not JSON"),
    ("[1, 2]", "in.jsonl:1: a line must be a JSON object"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), "custom_id must be a non-empty string"),
    (json.dumps({"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {}}),
     "method must be \"POST\", not 'GET'"),
    (json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/moderations", "body": {}}),
     "url '/v1/moderations' is not one of /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings"),
    (json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": "hi"}),
     "body must be a JSON object"),
    (json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"stream": True}}),
     "cannot stream"),
    (_line("x", "/v1/completions", prompt="a") + "\n" + _line("x", "/v1/completions", prompt="b"),
     "in.jsonl:2: custom_id 'x' is also on line 1"),
    ("\n\n", "holds no requests"),
    # Python's json takes these, and the run then failed with a traceback, its finished lines lost.
    (_line("x", "/v1/completions", prompt="a").replace('"a"', '"a", "temperature": NaN'), "NaN is Python's"),
    # 1e999 read as infinity, which the request could not then be sent with: a traceback after the models loaded.
    (_line("x", "/v1/completions", prompt="a").replace('"a"', '"a", "max_tokens": 1e999'), "1e999 is past"),
    ("[" * 100_000 + "]" * 100_000, "in.jsonl:1: not JSON"),  # a RecursionError traceback
])
def test_a_file_with_a_malformed_line_is_refused_naming_it_before_anything_runs(tmp_path, line, message, capsys):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(line + "\n")
    with pytest.raises(InvalidRequestError) as refused:
        read_requests(source)
    assert message in str(refused.value)
    # From the command line: one line, a non-zero exit, and no model loaded nor output file written.
    assert cli.main(["run-batch", "-i", str(source), "-o", str(out), "--model", "no-such-model.gguf"]) == 1
    assert message in capsys.readouterr().err and not out.exists()


def test_answers_go_into_a_pipe_as_to_dev_stdout(tmp_path, monkeypatch):
    from tokenmill import run_batch
    from tokenmill.server import app

    # `-o /dev/stdout | jq`: emptying the output (truncate) failed on the pipe with "[Errno 22] Invalid argument",
    # after the models had loaded.
    monkeypatch.setattr(app, "load_app", lambda *_, **__: None)

    async def answered(_app, requests, out, concurrency, progress=None) -> run_batch.Summary:
        out.write("line\n")
        return run_batch.Summary()

    monkeypatch.setattr(run_batch, "run", answered)
    (tmp_path / "in.jsonl").write_text(_line("a", "/v1/completions", prompt="x") + "\n")
    read, write = os.pipe()
    try:
        assert cli.main(["run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", f"/dev/fd/{write}"]) == 0
        assert os.read(read, 100) == b"line\n"
    finally:
        os.close(read)
        os.close(write)


def test_a_line_may_hold_any_unicode_and_the_file_a_bom(tmp_path):
    # U+2028 is a line break to str.splitlines, not to JSON; a BOM at the start read as line 1's text.
    source = tmp_path / "in.jsonl"
    source.write_text("\ufeff" + _line("a", "/v1/completions", prompt="x\u2028y\u0085z") + "\r\n", encoding="utf-8")
    (request,) = read_requests(source)
    assert request.custom_id == "a" and request.body["prompt"] == "x\u2028y\u0085z"


def test_lines_of_many_prompts_are_not_refused_for_waiting(tmp_path, smollm2_path):
    # --max-waiting counts prompts; the batch's bound counted lines, so two lines of 200 prompts got a 429.
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(_line(f"l{i}", "/v1/completions", model="m", prompt=["a"] * 200, max_tokens=1)
                                for i in range(2)))
    assert cli.main(["run-batch", "-i", str(source), "-o", str(out), "--model", f"m={smollm2_path}",
                     "--max-concurrency", "2", "--max-model-len", "256"]) == 0
    assert [json.loads(line)["response"]["status_code"] for line in out.read_text().splitlines()] == [200, 200]


def test_ctrl_c_keeps_the_lines_answered_so_far_and_exits_130(tmp_path, smollm2_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(_line(f"r{i}", "/v1/completions", prompt=f"Count to {i}:", max_tokens=16)
                                for i in range(60)))
    batch = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "run-batch", "-i", str(source), "-o", str(out),
                              "--model", str(smollm2_path), "--max-model-len", "256", "--max-concurrency", "4"],
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    batch.send_signal(signal.SIGINT)
    _, errors = batch.communicate(timeout=60)
    # The engine thread outlived the app (its lifespan's shutdown never ran): SIGABRT, "terminate called".
    assert batch.returncode == 130 and "Traceback" not in errors and "terminate" not in errors, errors[-500:]
    written = [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]
    assert 0 < len(written) < 60 and written == [f"r{i}" for i in range(len(written))]


def test_a_run_cancelled_midway_stops_the_engine_threads(smollm2_path):
    from tokenmill.server.app import load_app

    app = load_app(EngineConfig(model=str(smollm2_path), max_model_len=256), ServerConfig(), [str(smollm2_path)])
    requests = [BatchRequest(f"r{i}", "/v1/completions", {"prompt": f"Count to {i}:", "max_tokens": 16})
                for i in range(60)]
    out = io.StringIO()

    async def cancel_midway() -> None:
        task = asyncio.create_task(run(app, requests, out, 4))
        while not out.getvalue():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    # The app's shutdown ran only when its lifespan ended normally: on Ctrl-C the engine thread went on stepping,
    # and the process died by SIGABRT as the interpreter exited under it.
    assert not [t for t in threading.enumerate() if t.name == "tokenmill-engine" and t.is_alive()]
