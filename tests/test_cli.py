"""The CLI prints only completions, streams chat, is reproducible with a seed, and fails in one line."""

import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace
import urllib.request

import pytest

from tokenmill.cli import _fitting_chat, main
from tokenmill.errors import InvalidRequestError


def _run(*args: str, stdin: str | None = None, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=300, env={**os.environ, **(env_extra or {})},
    )


def test_serve_started_with_stdin_and_stdout_closed_stops_cleanly(smollm2_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # As `tokenmill serve <&- >&-` or a launcher that closes fds 0-2: uvloop aborted at every shutdown (exit -6);
    # with stdout closed, uvicorn's log formatter failed on sys.stdout (None) once the model had loaded.
    server = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--model", str(smollm2_path),
                               "--port", str(port), "--max-model-len", "256"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=lambda: (os.close(0), os.close(1)))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.25)
        server.send_signal(signal.SIGINT)
        _, errors = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 0, errors.decode()[-500:]


def test_serve_on_a_taken_port_fails_in_one_line_before_loading_any_model(monkeypatch, capsys):
    from tokenmill.server import app

    # The model loaded first (minutes for a large one), "serving ... at" was logged, and then the bind failed.
    monkeypatch.setattr(app, "load_app", lambda *_, **__: pytest.fail("loaded the model before binding the port"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--model", "smollm2-135m"]) == 1
    assert f"tokenmill: error: cannot listen on 127.0.0.1:{port}: " in capsys.readouterr().err


def test_serve_listens_on_every_address_its_host_resolves_to(monkeypatch):
    from tokenmill.config import ServerConfig
    from tokenmill.server.app import _listen

    # One socket of the first family dropped ::1 for `--host localhost` where the hosts file names both, as
    # uvicorn (asyncio) binds them; clients trying ::1 first were refused.
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: real("127.0.0.1", port, **kw) +
                        real("::1", port, **kw) if host == "localhost" else real(host, port, **kw))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bound = _listen(ServerConfig(host="localhost", port=port))
    try:
        assert sorted(s.getsockname()[0] for s in bound) == ["127.0.0.1", "::1"]
    finally:
        for listening in bound:
            listening.close()


def test_serve_on_port_0_listens_on_one_free_port_and_logs_it(monkeypatch, caplog):
    import logging

    from tokenmill.server import app

    # It logged "at http://127.0.0.1:0/v1" (uvicorn, given sockets, logs no address), and 127.0.0.1 and ::1 got
    # two different ports.
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: real("127.0.0.1", port, **kw) +
                        real("::1", port, **kw) if host == "localhost" else real(host, port, **kw))
    engine = SimpleNamespace(source=SimpleNamespace(name="m", sampling_defaults={}),
                             runner=SimpleNamespace(num_blocks=4), max_model_len=64)
    model = SimpleNamespace(engine=SimpleNamespace(engine=engine, join=lambda timeout: None))
    monkeypatch.setattr(app, "load_app", lambda *_, **__: SimpleNamespace(
        state=SimpleNamespace(tokenmill=SimpleNamespace(models={"m": model}), embedders={})))
    bound: list[socket.socket] = []
    monkeypatch.setattr(app, "_Server", lambda *_: SimpleNamespace(run=lambda sockets: bound.extend(sockets)))
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    with caplog.at_level(logging.INFO, logger="tokenmill"):
        assert main(["serve", "--host", "localhost", "--port", "0"]) == 0
    ports = {listening.getsockname()[1] for listening in bound}
    for listening in bound:
        listening.close()
    assert len(bound) == 2 and len(ports) == 1 and f"at http://localhost:{ports.pop()}/v1" in caplog.text


def test_serve_skips_an_address_its_host_names_that_the_machine_lacks(monkeypatch):
    from tokenmill.config import ServerConfig
    from tokenmill.server.app import _listen

    # A hosts file naming ::1 where IPv6 is off (Docker's default): binding it failed, and with it the whole serve.
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: real("127.0.0.1", port, **kw) +
                        real("2001:db8::1", port, **kw) if host == "localhost" else real(host, port, **kw))
    bound = _listen(ServerConfig(host="localhost", port=0))
    try:
        assert [s.getsockname()[0] for s in bound] == ["127.0.0.1"]
    finally:
        for listening in bound:
            listening.close()


def test_generate_names_paris(smollm2_path):
    result = _run("generate", "--model", str(smollm2_path), "--temperature", "0", "--max-tokens", "16",
                  "The capital of France is")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" Paris")


def test_seeded_sampling_is_reproducible_run_to_run(smollm2_path):
    args = ("generate", "--model", str(smollm2_path), "--temperature", "1.0", "--seed", "1234",
            "--max-tokens", "24", "Write a short poem about the sea.")
    first, second = _run(*args), _run(*args)
    assert first.returncode == 0 and second.returncode == 0
    assert first.stdout == second.stdout
    other = _run(*args[:-3], "99", *args[-3:])
    assert other.stdout != first.stdout  # the seed actually drives the sampling


def test_chat_answers_a_simple_question(smollm2_path):
    result = _run("chat", "--model", str(smollm2_path), "--temperature", "0", "--max-tokens", "40",
                  stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_outgrowing_the_context_drops_its_oldest_turns_and_goes_on(smollm2_path):
    questions = ["Tell me about the ocean.", "Tell me about the mountains.", "Tell me about the forests.",
                 "word " * 300, "What is the capital of France?"]
    result = _run("chat", "--model", str(smollm2_path), "--temperature", "0", "--max-tokens", "32",
                  "--max-model-len", "128", stdin="\n".join(questions) + "\n")
    assert result.returncode == 0, result.stderr
    assert "the earliest turn was dropped to fit the context" in result.stderr
    assert "this message alone does not fit the context of 128 tokens" in result.stderr
    assert "Paris" in result.stdout  # the session went on after both


def test_chat_drops_whole_exchanges_and_never_for_a_message_too_long_alone():
    # One token per character of content, a context of 10 and 2 tokens to generate.
    engine = SimpleNamespace(max_model_len=10, tokenizer=SimpleNamespace(
        encode_chat=lambda messages: [0] * sum(len(m["content"]) for m in messages)))
    history = [{"role": "system", "content": "ab"}, {"role": "user", "content": "cd"},
               {"role": "assistant", "content": "ef"}]
    messages = [*history, {"role": "user", "content": "x" * 7}]
    assert _fitting_chat(engine, messages, max_tokens=2) is None and messages == [*history, messages[-1]]
    messages = [*history, {"role": "user", "content": "xyz"}]
    assert len(_fitting_chat(engine, messages, max_tokens=2)) == 5 and messages == [history[0], messages[-1]]


@pytest.mark.parametrize(
    "args, message",
    [
        (("generate", "--model", "no-such-model", "hi"), "unknown model 'no-such-model'; known models"),
        (("generate", "--model", "/no/such/file.gguf", "hi"), "no such file"),
        (("generate", "--temperature", "-2", "hi"), "temperature=-2.0 must be >= 0"),
        (("generate", "--num-threads", "100000000", "hi"), "num_threads=100000000 must be in [1, 1024]"),  # SIGSEGV
        (("generate", "--kv-cache-memory", "1e300", "hi"), "kv_cache_memory=1e+300 GiB"),  # its bytes overflowed
        # NaN passed `< 0`, and a NaN watchdog failed every request that met a step.
        (("serve", "--watchdog-timeout", "nan"), "watchdog_timeout=nan must be >= 0"),
        (("serve", "--shutdown-timeout", "nan"), "shutdown_timeout=nan must be >= 0"),
        (("pull", "nope"), "unknown model 'nope'"),
        # It said "unknown model ... (or pass a path to a .gguf file ...)" to someone who had passed one.
        (("pull", "/x/model.gguf"), "a file or folder such as '/x/model.gguf' needs no pull: pass it to --model"),
        # A mistake in a later --model was found after the earlier ones loaded (and, in calibrate, answered its set).
        (("serve", "--model", "smollm2-135m", "--model", "no-such-model"), "unknown model 'no-such-model'"),
        (("router", "calibrate", "--model", "smollm2-135m", "--model", "/no/such.gguf"), "no such file"),
        (("env", "--model", "/no/such/file.gguf"), "no such file"),
        (("generate", "--speculative-config", '{"method": "eagle"}', "hi"), "speculative method 'eagle'"),
        (("generate", "--speculative-config", "{method", "hi"), "speculative config is not valid JSON"),
        (("generate", "--speculative-config", '{"k": 4}', "hi"), "unknown speculative config keys ['k']"),
        (("bench", "serve", "--base-url", "http://127.0.0.1:9", "--max-concurrency", "-3"), "--max-concurrency >= 1"),
        # Python reads argv bytes that are not UTF-8 (`tokenmill generate $'caf\xe9'`) as lone surrogates.
        (("generate", "--max-model-len", "64", "caf\udce9"), "bytes that are not UTF-8"),
    ],
)
def test_user_mistakes_exit_nonzero_with_one_line(args, message, capsys):
    # In process (a subprocess costs 3.7 s of imports each): any exception but the one main() turns into its
    # line fails the test. The process boundary itself is the next two tests'.
    assert main(list(args)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenmill: error: ")
    assert message in lines[0]


class _ChatEngine:
    """As much of LLMEngine as `tokenmill chat` uses: each reply is "Par"; the first fails partway if told to."""

    fail_first = False

    def __init__(self, config) -> None:
        self.max_model_len, self.prompts, self.pending, self.failures = 1000, [], [], {}
        self.tokenizer = SimpleNamespace(encode_chat=lambda messages: [len(self.prompts)] * len(messages))
        self.source = SimpleNamespace(sampling_defaults={})
        _ChatEngine.last = self

    def add_request(self, request_id, prompt, params) -> None:
        self.prompts.append(prompt)
        self.pending.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.pending)

    def step(self) -> list:
        request_id = self.pending.pop()
        if self.fail_first and len(self.prompts) == 1:
            self.failures[request_id] = RuntimeError("injected fault")
        return [SimpleNamespace(outputs=[SimpleNamespace(text="Par")])]

    def take_failures(self) -> dict:
        failures, self.failures = self.failures, {}
        return failures


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale's stdin; the C locale's
def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(monkeypatch, capsys, errors):
    import io

    from tokenmill.engine import llm_engine

    monkeypatch.setattr(llm_engine, "LLMEngine", _ChatEngine)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9?\nhello\n"), encoding="utf-8",
                                                       errors=errors))
    assert main(["chat"]) == 0
    assert len(_ChatEngine.last.prompts) == 1  # hello's, read with the bad line
    assert "tokenmill: that line is not UTF-8 text; skipped" in capsys.readouterr().err


def test_chat_leaves_a_failed_reply_out_of_the_conversation(monkeypatch, capsys):
    import io

    from tokenmill.engine import llm_engine

    monkeypatch.setattr(llm_engine, "LLMEngine", _ChatEngine)
    monkeypatch.setattr(_ChatEngine, "fail_first", True)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"first\nsecond\n"), encoding="utf-8"))
    assert main(["chat"]) == 0
    assert "this reply failed partway (injected fault)" in capsys.readouterr().err
    assert _ChatEngine.last.prompts[1] == [1]  # the second prompt holds one message: the failed exchange is gone


def test_generate_whose_request_fails_partway_exits_nonzero(smollm2_path, monkeypatch, capsys):
    from tokenmill.engine.detokenizer import IncrementalDetokenizer

    add, calls = IncrementalDetokenizer.add, []

    def broken(self, token_id, check_stop=True):
        calls.append(token_id)
        if len(calls) >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return add(self, token_id, check_stop)

    monkeypatch.setattr(IncrementalDetokenizer, "add", broken)
    assert main(["generate", "--model", str(smollm2_path), "--temperature", "0", "--max-tokens", "8",
                 "--max-model-len", "64", "The capital of France is"]) == 1
    assert "tokenmill: error: the generation failed partway" in capsys.readouterr().err


def test_eval_early_exit_on_text_that_is_not_utf8_exits_nonzero_with_one_line(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 100)
    assert main(["eval", "early-exit", "--file", str(tmp_path / "latin1.txt")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "latin1.txt is not UTF-8 text" in lines[0]


def test_bench_serve_with_every_request_failed_exits_nonzero(capsys):
    # A table of zeros exited 0, so a script took it for a measurement.
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "2", "--warmup", "0",
                 "--input-len", "8", "--output-len", "2"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's
    assert last.startswith("tokenmill: error: all 2 requests failed, the first with: ConnectError")


@pytest.mark.parametrize("price", ["inf", "nan", "-1"])
def test_bench_serve_refuses_a_price_that_is_no_amount_before_the_run(price, capsys):
    # inf and nan made the --out report unwritable JSON after the whole run; -1 billed negative costs.
    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--cost-per-hour", price]) == 1
    assert "--cost-per-hour must be a USD amount >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [("--concurrency", "0"), ("--cancel-fraction", "1.5")])
def test_bench_soak_refuses_a_load_that_sends_nothing_or_cancels_past_all(flags, capsys):
    assert main(["bench", "soak", "--base-url", "http://127.0.0.1:9", "--duration", "1", *flags]) == 2
    assert "--concurrency must be at least 1" in capsys.readouterr().err


def test_a_home_that_cannot_be_a_folder_exits_nonzero_with_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    result = _run("pull", "smollm2-135m", env_extra={"TOKENMILL_HOME": str(tmp_path / "file" / "home")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("tokenmill: error: ") and "Not a directory" in result.stderr


@pytest.mark.parametrize("args", [("bench", "serve", "--out"), ("bench", "serve", "--plot"), ("plan", "--out"),
                                  ("bench", "profile", "--out"), ("bench", "soak", "--out"),
                                  ("bench", "overload", "--out"), ("router", "calibrate", "--json")])
def test_an_output_file_in_no_folder_is_refused_before_the_run(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*args, str(tmp_path / "no" / "report.json"), "--help"])
    assert exited.value.code == 2 and "is not a folder this user can write to" in capsys.readouterr().err


def test_corrupt_model_file_exits_nonzero_with_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    result = _run("generate", "--model", str(bad), "hi")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot read GGUF" in result.stderr


def test_prompt_too_long_exits_nonzero(smollm2_path):
    result = _run("generate", "--model", str(smollm2_path), "--max-tokens", "10", "word " * 9000)
    assert result.returncode == 1
    assert "maximum context length is 8192 tokens" in result.stderr and "Traceback" not in result.stderr


def test_env_names_the_kernel_and_what_auto_picks(smollm2_path):
    from tokenmill import ops

    result = _run("env", "--model", str(smollm2_path))
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines())
    kernels = ops.quantized_matmul_kernels()
    # The fastest, unless TOKENMILL_QUANT_KERNEL names another (as a run of the suite on the AVX2 kernel does).
    used = os.environ.get("TOKENMILL_QUANT_KERNEL", kernels[0])
    assert fields["int8/int4"].startswith(f"{used} kernel (this CPU runs: {', '.join(kernels)};")
    # SmolLM2's GGUF is Q4_1: int4 wherever a vector kernel runs, else float.
    expected = "int4" if ops.fast_quantized_matmul() else "none"
    assert fields["auto"].startswith(f"{smollm2_path}: quantization {expected} (auto: ")


def test_env_reports_for_the_engine_flags_given(smollm2_path):
    result = _run("env", "--model", str(smollm2_path), "--kv-cache-dtype", "int8", "--quantization", "int8",
                  "--num-threads", "1")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert fields["kv"].split() == ["cache", "int8:", "int8", "for", "float32", "on", "cpu"]
    assert ", 1 torch threads" in fields["cpu"]
    assert fields["quantization"].startswith(f"{smollm2_path}: quantization int8 (asked for")
    # dtypes by their flag's name (not torch.bfloat16); the avx512_vnni kernel's avx512dq among the features.
    result = _run("env", "--model", str(smollm2_path), "--dtype", "bfloat16")
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert "torch." not in fields["auto"] and "bfloat16 activations" in fields["auto"]
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    assert ("avx512dq" in fields["features"].split()) == ("avx512dq" in flags)


def test_the_kernel_named_in_the_environment_is_the_one_used():
    from tokenmill import ops

    result = subprocess.run(
        [sys.executable, "-c", "from tokenmill import ops; print(ops.quantized_matmul_kernel())"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TOKENMILL_QUANT_KERNEL": "portable"},
    )
    assert result.stdout.strip() == "portable", result.stderr
    # This process: the fastest, or the one the suite was started with.
    assert ops.quantized_matmul_kernel() == os.environ.get("TOKENMILL_QUANT_KERNEL", ops.quantized_matmul_kernels()[0])
    bad = _run("env", "--model", "/no/such/file.gguf", env_extra={"TOKENMILL_QUANT_KERNEL": "sve9"})
    assert bad.returncode == 1 and "TOKENMILL_QUANT_KERNEL=sve9" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_compare_says_when_the_context_figure_does_not_fit_the_engine(smollm2_path):
    result = _run("bench", "compare", "--model", str(smollm2_path), "--max-model-len", "1024", "--context-len", "1000")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--context-len 1000 and --output-len 128 need 1128 tokens of context; this engine's is 1024" in result.stderr


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0), (["models"], 0), (["pull", "smollm2-135m"], 0), (["bench", "compare", "--help"], 0),
    # A malformed batch file is refused before anything loads (it imported torch first: 1.45 s to say so).
    (["run-batch", "-i", __file__, "-o", "/dev/null"], 1),
])
def test_commands_that_need_no_engine_do_not_import_torch(argv, code, smollm2_path):
    probe = ("import sys\nfrom tokenmill import cli\n"
             f"try:\n    code = cli.main({argv!r})\nexcept SystemExit as exc:\n    code = exc.code\n"
             "print('torch' in sys.modules, code)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[-1] == f"False {code}", result.stderr


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"], ["chat"], ["eval", "perplexity", "--file", "x"],
                                     ["bench", "offline"], ["bench", "compare"], ["env"],
                                     ["run-batch", "-i", "in.jsonl", "-o", "out.jsonl"]])
def test_every_engine_command_takes_every_engine_option_by_the_same_flag(command):
    from dataclasses import fields

    from tokenmill import cli
    from tokenmill.config import EngineConfig
    from tokenmill.flags import engine_options

    args = cli._parser().parse_args([*command, "--model", "m.gguf", "--num-threads", "3", "--kv-cache-fraction", "0.5",
                                     "--kv-cache-dtype", "int8", "--max-model-len", "256", "--no-prefix-caching"])
    options = engine_options(args)
    assert set(options) == {f.name for f in fields(EngineConfig)}
    assert options == {**{f.name: f.default for f in fields(EngineConfig)}, "model": "m.gguf", "num_threads": 3,
                       "kv_cache_fraction": 0.5, "kv_cache_dtype": "int8", "max_model_len": 256,
                       "enable_prefix_caching": False}


def test_chat_fails_at_once_where_no_message_could_fit_or_stdin_is_closed(monkeypatch, capsys):
    import io

    from tokenmill.engine import llm_engine

    monkeypatch.setattr(llm_engine, "LLMEngine", _ChatEngine)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n"), encoding="utf-8"))
    # Each message was refused as too long, blaming it, and the session ended 0.
    assert main(["chat", "--max-tokens", "1000"]) == 1
    assert "--max-tokens 1000 leave no room for a message" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", None)  # `tokenmill chat <&-`: an AttributeError traceback after the load
    assert main(["chat"]) == 1
    assert "stdin is closed" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["plan"], ["bench", "offline"], ["bench", "serve"], ["bench", "profile"]])
def test_a_negative_workload_seed_is_refused_by_the_flags(command, capsys):
    # numpy's generators take none: `plan --seed -1` ended in a ValueError traceback.
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--seed", "-1"])
    assert exit_.value.code == 2 and "a workload seed is an integer >= 0" in capsys.readouterr().err


def test_chat_s_default_reply_length_fits_a_small_context(monkeypatch):
    # The default 256 reply tokens under --max-model-len 256 refused the session as if --max-tokens were given.
    import io

    from tokenmill.engine import llm_engine

    class SmallContext(_ChatEngine):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.max_model_len, self.params = 256, []

        def add_request(self, request_id, prompt, params) -> None:
            super().add_request(request_id, prompt, params)
            self.params.append(params)

    monkeypatch.setattr(llm_engine, "LLMEngine", SmallContext)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n"), encoding="utf-8"))
    assert main(["chat"]) == 0
    assert [p.max_tokens for p in SmallContext.last.params] == [128]


def test_serve_checks_every_model_named_before_loading_any(monkeypatch, capsys):
    from tokenmill.server import app

    monkeypatch.setattr(app, "load_engines", lambda *args: pytest.fail("a model loaded before all were checked"))
    assert main(["serve", "--model", "smollm2-135m", "--model", "no-such-model"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_an_empty_api_key_serves_without_one_as_vllm(monkeypatch):
    # TOKENMILL_API_KEY="" turned auth on with the empty key: a bare "Bearer" got in, a request without one did not.
    from tokenmill.server import app

    served = {}
    monkeypatch.setattr(app, "serve", lambda engine, config, *args: served.setdefault("config", config))
    assert main(["serve", "--api-key", ""]) == 0
    assert served["config"].api_key is None


def test_sampling_flags_left_out_take_the_models_recommended_settings_then_the_clis():
    from tokenmill.cli import _params

    # As llama-cli with a GGUF's general.sampling.*: the 0.7 default overrode a model's recommended temperature.
    args = SimpleNamespace(temperature=None, top_p=0.9, top_k=None, seed=None, max_tokens=8)
    params = _params(args, {"temperature": 0.6, "top_p": 0.95, "min_p": 0.05})
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.6, 0.9, -1, 0.05)
    assert (_params(args).temperature, _params(args).top_k) == (0.7, -1)


def test_a_closed_stdout_ends_the_command_quietly():
    # `tokenmill models | head -0`: "tokenmill: error: [Errno 32] Broken pipe" and exit 1, where a tool killed by
    # SIGPIPE says nothing.
    read, write = os.pipe()
    os.close(read)
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "models"], stdout=write, stderr=subprocess.PIPE,
                            timeout=60)
    os.close(write)
    assert result.stderr == b"" and result.returncode == 141


def test_interactive_chat_edits_lines_with_readline(monkeypatch, capsys):
    import builtins
    import io

    from tokenmill.engine import llm_engine

    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    # input() edits lines (arrow keys, history) only once readline is imported: the up arrow went to the model
    # as "^[[A".
    monkeypatch.delitem(sys.modules, "readline", raising=False)
    monkeypatch.setattr(llm_engine, "LLMEngine", _ChatEngine)
    monkeypatch.setattr(sys, "stdin", Terminal(io.BytesIO(b""), encoding="utf-8"))
    monkeypatch.setattr(builtins, "input", lambda prompt: (_ for _ in ()).throw(EOFError))
    assert main(["chat"]) == 0
    assert "readline" in sys.modules
    assert capsys.readouterr().out == "\n"  # Ctrl-D: the shell's prompt starts a line of its own


def test_pull_of_a_catalog_name_pulls_even_beside_a_folder_of_that_name(tmp_path, monkeypatch, capsys, smollm2_path):
    # A folder named smollm2-135m in the working directory made `pull smollm2-135m` say it was a path.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    assert main(["pull", "smollm2-135m"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_path)


def test_serve_reads_what_vllm_and_llama_server_users_pass(monkeypatch, capsys):
    # vLLM's `serve MODEL` was "unrecognized arguments"; its JSON list of origins was one origin named '["*"]' (every
    # browser page refused, unsaid); VLLM_API_KEY was ignored (the server ran open); a foreign flag's error named
    # no equivalent.
    from tokenmill import cli

    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "secret")
    args = cli._parser().parse_args(["serve", "smollm2-135m", "--allowed-origins", '["*", "https://a.example"]'])
    assert args.model_tag == "smollm2-135m" and args.api_key == "secret"
    assert cli._origins(args.allowed_origins) == ("*", "https://a.example")
    assert cli._origins(["https://a.example", "null"]) == ("https://a.example", "null")  # file:// pages send null
    for wrong in (['["*"'], ['["*"]', "smollm2-135m"], ["https://a.example", "smollm2-135m"]):  # a model taken as one
        with pytest.raises(InvalidRequestError, match="JSON list"):
            cli._origins(wrong)
    monkeypatch.setenv("TOKENMILL_API_KEY", "")  # tokenmill's own variable, empty: no key, whatever vLLM's says
    assert cli._parser().parse_args(["serve"]).api_key == ""
    with pytest.raises(SystemExit):
        main(["serve", "--ctx-size", "4096", "--jinja"])
    error = capsys.readouterr().err
    assert "--ctx-size: use --max-model-len" in error and "--jinja: not needed" in error


def test_serve_model_serves_that_model_first(monkeypatch):
    from tokenmill.server import app

    served = {}
    monkeypatch.setattr(app, "serve", lambda engine, server, models, *rest: served.update(
        engine=engine.model, models=models, origins=server.allowed_origins))
    assert main(["serve", "gemma3-270m", "--model", "smollm2-135m", "--allowed-origins", '["*"]']) == 0
    assert served == {"engine": "gemma3-270m", "models": ["gemma3-270m", "smollm2-135m"], "origins": ("*",)}
