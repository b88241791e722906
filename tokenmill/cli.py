"""Command line: tokenmill models, pull, env, generate, chat, serve, run-batch, router, eval, plan and bench."""

import argparse
import dataclasses
import importlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenmill import run_batch
from tokenmill.bench import compare, early_exit, offline, overload
from tokenmill.bench import embed as bench_embed
from tokenmill.bench import gpu as bench_gpu
from tokenmill.bench import memory as bench_memory
from tokenmill.bench import profile as bench_profile
from tokenmill.bench import scale as bench_scale
from tokenmill.bench import serve as bench_serve
from tokenmill.bench import soak as bench_soak
from tokenmill.bench import speculative, structured
from tokenmill.config import ServerConfig
from tokenmill.cost import planner
from tokenmill.embeddings.batcher import BatchPolicy
from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.flags import add_engine_flags, engine_config, engine_options
from tokenmill.router import calibrate
from tokenmill.router.policies import fits
from tokenmill.scale.flags import add_scale_flags, scale_config
from tokenmill.sampling import SamplingParams

if TYPE_CHECKING:  # the engine imports torch, which only commands that build one need
    from tokenmill.engine.llm_engine import LLMEngine

# serve's API key, from tokenmill's variable, else vLLM's or llama-server's.
_API_KEY_VARIABLES = ("TOKENMILL_API_KEY", "VLLM_API_KEY", "LLAMA_API_KEY")
# vLLM's and llama-server's flags that a user moving here passes, with what does that here: argparse's bare
# "unrecognized arguments" named none of them.
_FOREIGN_FLAGS = {
    "--served-model-name": "use --model NAME=MODEL", "--alias": "use --model NAME=MODEL", "-m": "use --model",
    "--gpu-memory-utilization": "use --kv-cache-fraction (the share of the memory left after loading that the KV "
                                "pool takes) or --kv-cache-memory GiB",
    "--enable-prefix-caching": "not needed, prefix caching is on unless --no-prefix-caching",
    "--no-enable-prefix-caching": "use --no-prefix-caching",
    "-c": "use --max-model-len", "--ctx-size": "use --max-model-len", "-np": "use --max-num-seqs",
    "--parallel": "use --max-num-seqs", "-t": "use --num-threads", "--threads": "use --num-threads",
    "-ngl": "use --device cuda", "--n-gpu-layers": "use --device cuda",
    "--tensor-parallel-size": "not supported, a model runs on one device",
    "-tp": "not supported, a model runs on one device",
    "--enable-auto-tool-choice": "not needed, tool calls are always parsed",
    "--tool-call-parser": "not needed, tool calls are always parsed",
    "--jinja": "not needed, the model's own chat template is always used",
    "--chat-template": "not supported, the model's own chat template is used",
    "--generation-config": "not needed, the model's recommended sampling settings apply where a request sets none",
    "--trust-remote-code": "not needed, no model code is fetched or run",
    "--disable-log-requests": "not needed, requests are not logged",
    "--metrics": "not needed, /metrics is always served",
    "--enable-prompt-tokens-details": "not needed, usage always has prompt_tokens_details",
    "--seed": "set per request (seed)", "--temp": "set per request (temperature)",
    "--top-k": "set per request (top_k)", "--top-p": "set per request (top_p)",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hints = [f"{flag}: {_FOREIGN_FLAGS[flag]}" for flag in (a.split("=", 1)[0] for a in unknown)
                 if flag in _FOREIGN_FLAGS]
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except TokenmillError as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`| head`): quiet, as a tool killed by SIGPIPE
        # Python flushes stdout at exit: into the closed pipe that would print an error after all.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # the machine's, not the code's: a folder not writable, a full disk, a file gone
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference with latency and cost measured.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine start-up details")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    _command(commands, "models", "list the named models and whether they are pulled", _models)
    pull = _command(commands, "pull", "download a named model into $TOKENMILL_HOME", _pull)
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="download again even if present")
    add_engine_flags(_command(commands, "env", "CPU features, the kernel each op runs, and what auto picks and why",
                              _env))

    generate = _command(commands, "generate", "complete one prompt and print only the completion", _generate)
    generate.add_argument("prompt")
    _sampling_flags(generate, max_tokens=64)
    chat = _command(commands, "chat", "interactive chat that streams tokens", _chat)
    chat.add_argument("--system", help="system prompt")
    _sampling_flags(chat, max_tokens=None, shown=f"{_CHAT_REPLY_TOKENS}, or half a smaller context")

    serve = _command(commands, "serve", "OpenAI-compatible HTTP server (pulls the model first if needed)", _serve)
    serve.add_argument("model_tag", nargs="?", metavar="MODEL",
                       help="the model, given as `vllm serve MODEL` takes it: served first, before any --model")
    serve.add_argument("--host", default=ServerConfig.host,
                       help="address to listen on (default: %(default)s, this machine only; vLLM's is every "
                            "interface: 0.0.0.0)")
    serve.add_argument("--port", type=int, default=ServerConfig.port)
    # A deployment moved from vLLM or llama-server keeps its key's variable: it ran open, unsaid.
    serve.add_argument("--api-key", default=next((os.environ[v] for v in _API_KEY_VARIABLES if v in os.environ),
                                                 None),
                       help="require `Authorization: Bearer KEY` (or x-api-key) on every API path: /v1, /v2, "
                            "vLLM's, llama.cpp's and Ollama's (/api) and the dashboard's data; not /health or /metrics "
                            "(default: $TOKENMILL_API_KEY, else vLLM's $VLLM_API_KEY or llama-server's "
                            "$LLAMA_API_KEY, else none)")
    serve.add_argument("--allowed-origins", nargs="*", default=list(ServerConfig.allowed_origins), metavar="ORIGIN",
                       help="origins whose browser pages may call the API (CORS), or vLLM's JSON list of them; none "
                            "given: same-origin pages only (default: any, as vLLM)")
    serve.add_argument("--max-waiting", type=int, default=ServerConfig.max_waiting,
                       help="answer 429 when this many requests already wait")
    serve.add_argument("--max-waiting-tokens", type=int, default=ServerConfig.max_waiting_tokens,
                       help="answer 429 when this many prompt tokens already wait (default: no bound)")
    serve.add_argument("--max-body-bytes", type=int, default=ServerConfig.max_body_bytes,
                       help="answer 413 to larger request bodies")
    serve.add_argument("--shutdown-timeout", type=float, default=ServerConfig.shutdown_timeout,
                       help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    serve.add_argument("--watchdog-timeout", type=float, default=ServerConfig.watchdog_timeout,
                       help="seconds an engine step may run before its requests fail and /health answers 503 "
                            "until it returns; 0: never (default: %(default)s)")
    serve.add_argument("--router", choices=("cheapest", "cascade"), default=ServerConfig.router,
                       help="how `model: auto` picks among the --model values, given cheap to strong: the first "
                            "whose context fits (cheapest), or that one re-run on the next when unsure (cascade, "
                            "non-streamed requests only)")
    serve.add_argument("--cascade-threshold", type=float, default=ServerConfig.cascade_threshold,
                       help="under --router cascade, escalate when the answer's mean token logprob is below this")
    _embedding_flags(serve)
    _reasoning_flag(serve)
    add_scale_flags(serve)
    add_engine_flags(serve, repeat_model=True)

    batch = _command(commands, "run-batch", "answer an OpenAI Batch API file (JSONL) offline, as `serve` would "
                     "answer each line, into an output file of the Batch API's shape", run_batch.main)
    run_batch.add_arguments(batch)
    _embedding_flags(batch)
    _reasoning_flag(batch)
    add_engine_flags(batch, repeat_model=True)

    router = commands.add_parser("router", help="tune `model: auto` for the models `serve` would route among")
    router_actions = router.add_subparsers(required=True, metavar="ACTION")
    calibrate.add_arguments(_command(router_actions, "calibrate", "run the models on a labeled set; print and plot "
                                     "the quality-cost curve of each policy and threshold", calibrate.main))

    evaluate = commands.add_parser("eval", help="measure accuracy")
    metrics = evaluate.add_subparsers(required=True, metavar="METRIC")
    ppl = _command(metrics, "perplexity", "perplexity of a text file through the engine", _perplexity)
    ppl.add_argument("--file", required=True, type=Path, help="UTF-8 text to score")
    ppl.add_argument("--context", type=int, default=512, help="tokens per window")
    ppl.add_argument("--stride", type=int, help="tokens between window starts (default: half the context)")
    ppl.add_argument("--peer", choices=["llama.cpp"],
                     help="also score the same windows with llama.cpp on the same GGUF file, and give the ratio")
    add_engine_flags(ppl)
    early_exit.add_arguments(_command(metrics, "early-exit", "acceptance and decode speed of early-exit drafting at "
                                      "each exit layer, to choose one", early_exit.main))

    planner.add_arguments(_command(commands, "plan", "the request rate one replica sustains within latency "
                                   "targets, replicas and monthly bill, simulated from `bench profile` JSON",
                                   planner.main))

    bench = commands.add_parser("bench", help="measure latency, throughput and cost against peers")
    kinds = bench.add_subparsers(required=True, metavar="KIND")
    bench_serve.add_arguments(_command(kinds, "serve", "streaming load against an OpenAI-compatible server",
                                       bench_serve.main))
    overload.add_arguments(_command(kinds, "overload", "at 10x the sustainable rate: admitted requests' TTFT "
                                    "against unloaded, and how fast the rest get 429", overload.main))
    offline.add_arguments(_command(kinds, "offline", "engine throughput without HTTP, single-stream speeds, memory",
                                   offline.main))
    compare.add_arguments(_command(kinds, "compare", "the same workloads on tokenmill and a peer, with ratios",
                                   compare.main))
    bench_profile.add_arguments(_command(kinds, "profile", "this machine's engine step time by batch composition, "
                                         "for `tokenmill plan`", bench_profile.main))
    speculative.add_arguments(_command(kinds, "spec", "decode speed with speculative decoding against without, "
                                       "on input-grounded and open prompts", speculative.main))
    structured.add_arguments(_command(kinds, "structured", "decode speed with a JSON schema enforced against "
                                      "without, at 1 and 16 concurrent requests", structured.main))
    bench_embed.add_arguments(_command(kinds, "embed", "embedding throughput offline and over HTTP, against "
                                       "transformers with the same pooling", bench_embed.main))
    bench_soak.add_arguments(_command(kinds, "soak", "mixed traffic with cancels, disconnects and timeouts for a "
                                      "set time; then every request ended, no KV block leaked, RSS stayed flat",
                                      bench_soak.main))
    bench_memory.add_arguments(_command(kinds, "memory", "peak RSS of many loaded sequences in one generate, against "
                                        "llama.cpp for the same total context, one fresh process each",
                                        bench_memory.main))
    bench_scale.add_arguments(_command(kinds, "scale", "replicas on Ray Serve: prefix-aware against default routing, "
                                       "or autoscaling up, down, to zero and back (needs tokenmill[ray])",
                                       bench_scale.main))
    bench_gpu.add_arguments(_command(kinds, "gpu", "decode step time against the memory bound, CUDA graphs on and off, "
                                     "offline throughput against transformers, on a random 1B Llama", bench_gpu.main))
    return parser


def _embedding_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embedding-max-wait-ms", type=float, default=BatchPolicy.max_wait_ms,
                        help="an embedding input waits at most this long for others to share its forward pass")
    parser.add_argument("--embedding-max-batch-tokens", type=int, default=BatchPolicy.max_batch_tokens,
                        help="padded tokens per embedding forward pass; a queue holding this many runs at once")
    parser.add_argument("--embedding-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="embedding models' linear layers: auto is bfloat16 where oneDNN runs it natively "
                             "(AVX-512 bf16, AMX), else float32")


def _reasoning_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reasoning-parser", choices=("qwen3", "deepseek_r1"), default=None,
                        help="split a reasoning model's <think>...</think> from chat answers into reasoning_content, "
                             "as vLLM's flag: qwen3 (the model opens its thinking) or deepseek_r1 (the chat template "
                             "opens it); default: the thinking stays in the content")


def _command(commands: argparse._SubParsersAction, name: str, help: str, func: Callable) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help, description=help)
    sub.set_defaults(func=func)
    return sub


# Reply tokens `tokenmill chat` allows by default.
_CHAT_REPLY_TOKENS = 256
# generate's and chat's sampling where neither a flag nor the model's recommended settings say otherwise.
_CLI_SAMPLING = {"temperature": 0.7, "top_p": 1.0, "top_k": -1}


def _sampling_flags(parser: argparse.ArgumentParser, max_tokens: int | None, shown: str | None = None) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"default: {shown or max_tokens}")
    # Unset, the model's recommended settings apply (as in llama.cpp), else these.
    for flag, kind, name in (("--temperature", float, "temperature"), ("--top-p", float, "top_p"),
                             ("--top-k", int, "top_k")):
        parser.add_argument(flag, type=kind, help=f"default: the model's recommended, else {_CLI_SAMPLING[name]}")
    parser.add_argument("--seed", type=int, default=None)
    add_engine_flags(parser)


def _params(args: argparse.Namespace, recommended: dict[str, float] | None = None) -> SamplingParams:
    """The flags' params, the model's `recommended` settings (ModelSource.sampling_defaults) for the ones not given."""
    given = {name: value for name in _CLI_SAMPLING if (value := getattr(args, name)) is not None}
    return SamplingParams(**{**_CLI_SAMPLING, **(recommended or {}), **given}, seed=args.seed,
                          max_tokens=args.max_tokens)


def _models(args: argparse.Namespace) -> int:
    from tokenmill.loader import catalog

    for entry in catalog.CATALOG.values():
        state = f"pulled at {catalog.model_path(entry.name)}" if catalog.is_pulled(entry.name) else "not pulled"
        print(f"{entry.name:16} {entry.description} ({state})")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from tokenmill.loader import catalog

    if args.name not in catalog.CATALOG and ("/" in args.name or args.name.endswith(".gguf")
                                            or Path(args.name).expanduser().exists()):
        raise InvalidRequestError(f"pull takes a catalog name ({', '.join(catalog.CATALOG)}); a file or folder "
                                  f"such as {args.name!r} needs no pull: pass it to --model")
    print(catalog.pull(args.name, force=args.force))
    return 0


def _env(args: argparse.Namespace) -> int:
    from tokenmill import env

    env.main(engine_config(args))
    return 0


def _line_editing() -> None:
    """Arrow keys, history and editing for input(), which has them only once readline is imported: else the up
    arrow went to the model as the text "^[[A"."""
    try:
        importlib.import_module("readline")
    except ImportError:  # Windows, or a Python built without it
        pass


def _generate(args: argparse.Namespace) -> int:
    from tokenmill.llm import LLM

    _params(args)  # validate flags before the slow model load
    llm = LLM(**engine_options(args))
    params = _params(args, llm.engine.source.sampling_defaults)
    output = llm.generate([args.prompt], params, use_tqdm=False)[0]
    print(output.outputs[0].text)
    if output.outputs[0].finish_reason == "error":  # the engine's error is logged above; a script must see it
        print("tokenmill: error: the generation failed partway (logged above); the text is cut", file=sys.stderr)
        return 1
    return 0


def _chat(args: argparse.Namespace) -> int:
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.loader.tokenizer import is_text

    _params(args)  # validate flags before the slow model load
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        raise InvalidRequestError("stdin is closed; chat reads its messages from it")
    engine = LLMEngine(engine_config(args))
    params = _params(args, engine.source.sampling_defaults)
    if args.max_tokens is None:  # a default that fills a small context (--max-model-len 256) would refuse every message
        params = dataclasses.replace(params, max_tokens=max(1, min(_CHAT_REPLY_TOKENS, engine.max_model_len // 2)))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    # Flags no message could ever fit with are the flags' fault, once, not each message's.
    if not fits(len(engine.tokenizer.encode_chat([*messages, {"role": "user", "content": "x"}])), params.max_tokens,
                engine.max_model_len):
        raise InvalidRequestError(f"--max-tokens {params.max_tokens}{' and --system' if args.system else ''} leave "
                                  f"no room for a message in the context of {engine.max_model_len} tokens")
    interactive = sys.stdin.isatty()
    if interactive:
        _line_editing()
    # A line that is not UTF-8 then reads as lone surrogates, to be skipped; strictly, its error would lose the
    # lines read with it.
    sys.stdin.reconfigure(errors="surrogateescape")
    for turn in itertools.count():
        try:
            user = input("> " if interactive else "")
        except EOFError:
            if interactive:  # Ctrl-D: the shell's prompt on a line of its own
                print()
            break
        if not user.strip():
            continue
        if not is_text(user):  # bytes that are not UTF-8, read with surrogateescape
            print("tokenmill: that line is not UTF-8 text; skipped", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": user})
        prompt = _fitting_chat(engine, messages, params.max_tokens)
        if prompt is None:
            print(f"tokenmill: this message alone does not fit the context of {engine.max_model_len} tokens with "
                  f"--max-tokens {params.max_tokens}; shorten it", file=sys.stderr)
            messages.pop()
            continue
        engine.add_request(f"chat-{turn}", prompt, params)
        reply = []
        try:
            while engine.has_unfinished():
                for output in engine.step():
                    text = output.outputs[0].text
                    print(text, end="", flush=True)
                    reply.append(text)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session (Ctrl-D ends it)
            engine.abort(f"chat-{turn}")
            print(" [stopped]", end="")
        print()
        if failure := engine.take_failures().get(f"chat-{turn}"):  # logged where it was caught
            print(f"tokenmill: this reply failed partway ({failure}); it is left out of the conversation",
                  file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _fitting_chat(engine: "LLMEngine", messages: list[dict], max_tokens: int | None) -> list[int] | None:
    """The conversation's prompt ids, its oldest exchanges dropped (in place) until it fits the context with
    max_tokens, as llama.cpp and Ollama shift theirs; None, and nothing dropped, when the last message alone does
    not fit."""
    first = 1 if messages[0]["role"] == "system" else 0
    if not fits(len(engine.tokenizer.encode_chat([*messages[:first], messages[-1]])), max_tokens,
                engine.max_model_len):
        return None
    while not fits(len(ids := engine.tokenizer.encode_chat(messages)), max_tokens, engine.max_model_len):
        del messages[first : first + 2]  # the oldest question and its answer
        print("tokenmill: the earliest turn was dropped to fit the context", file=sys.stderr)
    return ids


def _perplexity(args: argparse.Namespace) -> int:
    from tokenmill.llm import LLM
    from tokenmill.perplexity import llama_cpp_perplexity, perplexity

    try:
        text = args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read {args.file}: {exc}") from exc
    llm = LLM(**engine_options(args))
    token_ids = llm.tokenizer.encode(text)
    # Half the context: every token scored once, with at least half a window before it (256 at the default 512;
    # a fixed 256 refused --context 256 and below for a --stride the user never gave).
    stride = args.stride if args.stride is not None else max(args.context // 2, 1)
    result = perplexity(llm, token_ids, args.context, stride)
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.4f}) over {result.num_tokens} tokens "
          f"in {result.num_windows} windows of {args.context} (stride {stride})")
    if args.peer:
        peer = llama_cpp_perplexity(llm.engine.source.path, token_ids, args.context, stride, args.num_threads)
        print(f"llama.cpp perplexity {peer.perplexity:.4f} (mean NLL {peer.nll:.4f}) on the same windows; "
              f"tokenmill / llama.cpp {result.perplexity / peer.perplexity:.4f}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from tokenmill.server.app import serve

    _open_standard_streams()
    logging.getLogger("tokenmill").setLevel(logging.INFO)  # the start-up lines say models, KV capacity and URL
    if args.model_tag is not None:  # `serve MODEL`, as vLLM's: the first model served
        args.models = [args.model_tag, *args.models]
        args.model = args.model_tag
    # An empty key (TOKENMILL_API_KEY="") is none, as vLLM takes it: not one that admits a bare "Bearer".
    config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key or None, max_waiting=args.max_waiting,
                          allowed_origins=_origins(args.allowed_origins),
                          max_waiting_tokens=args.max_waiting_tokens,
                          max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
                          watchdog_timeout=args.watchdog_timeout,
                          router=args.router, cascade_threshold=args.cascade_threshold,
                          reasoning_parser=args.reasoning_parser)
    batching = BatchPolicy(args.embedding_max_batch_tokens, args.embedding_max_wait_ms)
    scale = scale_config(args)  # before any model loads: a missing Ray fails at once
    if scale is not None:
        from tokenmill.scale.deployment import serve_replicas

        serve_replicas(engine_config(args), config, args.models or [args.model], scale, batching, args.embedding_dtype)
        return 0
    serve(engine_config(args), config, args.models or [args.model], batching, args.embedding_dtype)
    return 0


def _origins(given: list[str]) -> tuple[str, ...]:
    """--allowed-origins as origins: vLLM's form is one JSON list ('["*"]'), read here as one origin named so; a
    value that is no origin (a model after the flag, which took it as one) is refused."""
    origins: object = given
    if given and given[0].lstrip().startswith("["):
        try:
            origins = json.loads(given[0]) if len(given) == 1 else None
        except ValueError:
            origins = None
    # "null": the origin browsers send from file:// pages and sandboxed frames.
    if not isinstance(origins, list) or not all(isinstance(o, str) and (o in ("*", "null") or "://" in o)
                                                for o in origins):
        raise InvalidRequestError(f"--allowed-origins {' '.join(given)!r}: give origins (scheme://host[:port] or *), "
                                  'or one JSON list of them as vLLM takes it (\'["https://app.example"]\'); a model '
                                  "given by position goes before the flags")
    return tuple(origins)


def _open_standard_streams() -> None:
    """Open /dev/null on whichever of fds 0-2 a launcher closed: uvloop gives such a free fd to a socket, then
    aborts (SIGABRT, `uv__close: Assertion fd > STDERR_FILENO`) closing it at shutdown."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free fd: this one
        # Python left the stream None for a closed fd, and uvicorn's log formatter calls sys.stdout.isatty().
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


if __name__ == "__main__":
    sys.exit(main())
