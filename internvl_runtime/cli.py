"""The ``internvl`` command: serve, chat, generate, download, bench.

Examples::

    internvl serve --demo                                   # no weights? a random-weight checkpoint, labelled
    internvl serve pretrained/InternVL2-1B --port 8000 --api-key secret
    internvl chat pretrained/InternVL2-1B --image examples/image1.jpg
    internvl generate pretrained/InternVL2-1B --image examples/image1.jpg --prompt "Describe the image."
    internvl generate OpenGVLab/InternVL2-1B --prompt "Hello"      # a hub id: fetched into the hub's cache
    internvl download OpenGVLab/InternVL2-1B --local-dir pretrained/InternVL2-1B
    internvl bench

``serve``'s flags are built from :class:`~internvl_runtime.serving.config.ServerConfig`'s fields and their
help, so the CLI, the Python API and ``--help`` agree. Errors a user can cause (a missing
folder, no network for ``download``, a bad flag) print one clear line and exit with status 1, never a
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import logging.config
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hub import is_hub_id
from .testing.checkpoints import DEMO_LABEL

if TYPE_CHECKING:     # the commands import the engine and the server when they run (a fast --help)
    from typing import TextIO

    from .engine.async_engine import AsyncEngine
    from .engine.engine import LLMEngine
    from .engine.sampling_params import SamplingParams
    from .processing.inputs import Message, PreparedRequest

DEMO_VARIANT = "1B"

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def cache_dir() -> Path:
    """``$INTERNVL_CACHE``, else ``$XDG_CACHE_HOME/internvl_runtime``, else ``~/.cache/internvl_runtime``."""
    if os.environ.get("INTERNVL_CACHE"):
        return Path(os.environ["INTERNVL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "internvl_runtime"


def demo_checkpoint() -> Path:
    """A tiny random-weight InternVL2-1B checkpoint in the official layout (built once, then reused)."""
    from .testing.checkpoints import write_checkpoint

    folder = cache_dir() / f"demo-{DEMO_VARIANT}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    write_checkpoint(staging, DEMO_VARIANT)
    try:
        os.replace(staging, folder)
    except OSError:          # another process built it first
        import shutil
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[demo] built a random-weight InternVL2-{DEMO_VARIANT} checkpoint at {folder}", file=sys.stderr)
    return folder


def _model_path(args: argparse.Namespace) -> Path | str:
    """The checkpoint the command loads: the demo's, a folder, or a Hugging Face Hub id (fetched into the hub's
    cache when the engine loads: ``hub.resolve_checkpoint``); a folder wins over a same-named id."""
    if args.demo:
        if args.path:
            raise CLIError("--demo builds its own random-weight checkpoint: give either PATH or --demo, not both")
        folder = demo_checkpoint()
        print(f"[demo] answers come from RANDOM weights ({folder}); they are noise and labelled as such",
              file=sys.stderr)
        return folder
    if not args.path:
        raise CLIError("give a checkpoint folder or a Hugging Face Hub id such as OpenGVLab/InternVL2-1B, or --demo "
                       "to try a random-weight model")
    folder = Path(args.path).expanduser()
    if folder.is_dir():
        return folder
    if not folder.exists() and is_hub_id(args.path):
        return str(args.path)
    raise CLIError(f"checkpoint folder {str(folder)!r} does not exist (give a folder or a Hugging Face Hub id such "
                   f"as OpenGVLab/InternVL2-1B; download one with `internvl download OpenGVLab/InternVL2-1B "
                   f"--local-dir {folder}`, or try --demo)")


def _flag_type(annotation: str) -> type[int | float | str]:
    base = annotation.replace(" | None", "").replace("Optional[", "").rstrip("]").strip()
    return {"int": int, "float": float, "str": str}.get(base, str)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _add_config_flags(parser: argparse.ArgumentParser, config_class: Any) -> None:
    """One ``--flag`` per dataclass field, typed, with the field's help and default. A ``list[str]`` field
    takes comma-separated values and may be repeated (``--allowed-hosts a,b --allowed-hosts c``)."""
    group = parser.add_argument_group(config_class.__name__, (config_class.__doc__ or "").strip().splitlines()[0])
    for f in config_class.cli_fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=help_text)
            continue
        if f.type == "list[str]":
            # nargs "+": values taken whole, space-separated (keys and names may hold commas); else comma-separated
            whole = f.metadata.get("nargs") == "+"
            group.add_argument(flag, dest=f.name, action="extend", nargs="+" if whole else None,
                               type=str if whole else _comma_list, default=f.default_factory(),
                               metavar=f.name.upper(), help=help_text if "(default" in help_text
                               else f"{help_text} (default: none)")
            continue
        default = f.default
        if "(default" not in help_text:
            help_text = f"{help_text} (default: {'none' if default is None else default})"
        group.add_argument(flag, dest=f.name, type=_flag_type(str(f.type)), default=default,
                           choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices") else
                           f.name.upper(), help=help_text)


def _hub_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None,
                        help="for a Hugging Face Hub id: the branch, tag or commit (default: main)")


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens to generate at most (default: 512)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 is greedy, as the official chat (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (default: none)")
    parser.add_argument("--max-dynamic-patch", type=int, default=None,
                        help="tiles per image at most (default: the checkpoint's)")
    parser.add_argument("--system", default=None, help="system message replacing the model's default")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype (default: auto, the config's)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--quantization", default=None, metavar="MODE", type=_quantization,
                        help="weight-only quantization of the language model as it loads: int8, int4 or int4:gN "
                        "(group size N: 32, 64, 128 or 256) (default: none)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--no-mmap", action="store_true",
                        help="read every weight into memory instead of viewing the ones stored in their compute "
                        "format from the checkpoint's read-only memory map")
    parser.add_argument("--pack-bf16", action="store_true",
                        help="keep the language model's bf16 weights losslessly packed (~12 bits a weight, every "
                        "value kept): faster decode on the CPU (bf16 CPU models only)")


def _quantization(text: str) -> str:
    """``--quantization``'s value, checked by the one parser (``QuantizationConfig.parse``)."""
    from .errors import InternVLError
    from .quantization import QuantizationConfig

    try:
        QuantizationConfig.parse(text)
    except InternVLError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", metavar="PATH", help="checkpoint folder (official InternVL2 layout), or a "
                        "Hugging Face Hub id such as OpenGVLab/InternVL2-1B (fetched into the hub's cache; "
                        "HF_HUB_OFFLINE=1 uses only the cache)")
    parser.add_argument("--demo", action="store_true",
                        help="no weights? build and use a tiny RANDOM-weight checkpoint (answers are labelled)")


# ---------------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serving.app import create_app, load_async_engine, uvicorn_config
        from .serving.config import ServerConfig
    except ImportError as exc:
        raise CLIError(f"serving needs FastAPI and uvicorn ({exc}); install them with "
                       "`pip install 'internvl-runtime[serve]'`") from None
    from .errors import InternVLError

    folder = _model_path(args)
    values = {f.name: getattr(args, f.name) for f in ServerConfig.cli_fields()}
    try:
        config = ServerConfig(model=str(folder), demo=args.demo, **values)
    except InternVLError as exc:
        raise CLIError(str(exc)) from None
    # The process's logging, once the flags are known good (a refused command leaves it as it was).
    log_config = logging_config(config.log_level)
    logging.config.dictConfig(log_config)
    server: uvicorn.Server | None = None
    failed: list[BaseException] = []
    loader: Callable[[], AsyncEngine] = lambda: load_async_engine(config, progress=True)  # noqa: E731
    if config.tensor_parallel_size > 1:     # torchrun: every rank joins; rank 0 serves, workers follow it
        from .distributed.launch import serve_tensor_parallel

        try:
            tp_loader = serve_tensor_parallel(config)
        except InternVLError as exc:
            raise CLIError(str(exc)) from None
        if tp_loader is None:               # a worker rank: rank 0 stopped it
            return 0
        loader = tp_loader

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(loader, config, on_fatal=on_fatal)
    server = uvicorn.Server(uvicorn_config(app, config, log_config=log_config))
    shown_host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"internvl: serving {config.model_name!r} on http://{shown_host}:{config.port}  (web chat at /, "
          f"OpenAI API at /v1; loading weights...)", file=sys.stderr)
    if not _is_loopback(config.host) and not config.allowed_hosts:
        print("internvl: clients must address this server by IP address or localhost; to use a host name, "
              "list it with --allowed-hosts NAME", file=sys.stderr)
    if config.api_key:
        print("internvl: an API key is required (Authorization: Bearer KEY)", file=sys.stderr)
    log_start(config)
    with contextlib.suppress(KeyboardInterrupt):     # uvicorn re-raises the Ctrl-C it handled: the shutdown was clean
        server.run()
    if failed:
        from .errors import EngineDead

        if isinstance(failed[0], EngineDead):
            raise CLIError(f"{failed[0]}; exiting so that a supervisor restarts the server")
        raise CLIError(f"loading the model failed: {failed[0]}")
    return 0


#: The log line format of ``internvl serve``: time, level, logger, message.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_TRACE = 5            # uvicorn's "trace" level


def logging_config(level: str) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of ``internvl serve``: the package's loggers and uvicorn's at ``level``,
    one format (``LOG_FORMAT``) on stderr; other libraries' loggers at warning."""
    numeric = _TRACE if level == "trace" else level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {name: {"handlers": [], "level": numeric, "propagate": True}
                    for name in ("internvl_runtime", "uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def log_start(config: Any) -> None:
    """The start lines: what is served under which names, how it loads, the limits, the address."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    logger.info("model %s served as %s on http://%s:%d", config.model, ", ".join(map(repr, config.model_names)),
                host, config.port)
    logger.info("loading: dtype %s, device %s, quantization %s, tensor parallel size %d%s", config.dtype,
                config.device, config.quantization or "none", config.tensor_parallel_size,
                " (random-weight demo)" if config.demo else "")
    logger.info("limits: context %s tokens, %s sequences and %d tokens per step, %d requests in the engine, %d "
                "generation requests at once, max_tokens %d by default, n <= %d, %d images and %d video frames per "
                "request, %d bytes per body", config.max_model_len or "the model's",
                config.max_num_seqs or "256 (GPU) or 16 (CPU)",
                config.max_num_batched_tokens, config.max_queue_len, config.max_concurrent_requests,
                config.default_max_tokens, config.max_n, config.max_images_per_request, config.max_video_frames,
                config.max_body_bytes)
    logger.info("API keys: %d; strict protocol: %s; CORS origins: %s", len(config.api_key),
                "on" if config.strict_protocol else "off", ", ".join(config.allowed_origins) or "none")


# ---------------------------------------------------------------------------------------------------
# chat / generate (in-process, no server)
# ---------------------------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> LLMEngine:
    """The engine for chat / generate: ``LLMEngine.from_pretrained`` with a progress bar; no web stack."""
    from .engine.engine import EngineConfig, LLMEngine
    from .errors import InternVLError
    from .hub import HubOptions

    folder = _model_path(args)
    kwargs: dict[str, Any] = {"max_num_seqs": 1}
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    from .serving.config import resolve_device

    try:
        return LLMEngine.from_pretrained(folder, dtype=args.dtype, device=resolve_device(args.device), progress=True,
                                         quantization=args.quantization, config=EngineConfig(**kwargs),
                                         hub=HubOptions(revision=args.revision), mmap=not args.no_mmap,
                                         pack_bf16=args.pack_bf16)
    except InternVLError as exc:
        raise CLIError(f"cannot load {folder}: {exc}") from None


def _params(args: argparse.Namespace) -> SamplingParams:
    from .engine.sampling_params import SamplingParams
    from .errors import InternVLError

    try:
        return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    except InternVLError as exc:
        raise CLIError(str(exc)) from None


def _stream_answer(engine: LLMEngine, prepared: PreparedRequest, params: SamplingParams, demo: bool,
                   out: TextIO | None = None) -> str:
    """Generate and print as the tokens come; Ctrl-C stops the answer. Returns its text."""
    out = out or sys.stdout
    request_id = f"cli-{time.monotonic_ns()}"
    from .errors import ContextLengthExceeded

    try:        # the engine's context rule: --max-tokens, cut to what the conversation leaves
        max_new = engine.max_new_tokens_for(len(prepared.prompt_token_ids), default=params.max_new_tokens)
    except ContextLengthExceeded as exc:
        raise ContextLengthExceeded(f"{exc}; /reset to start over") from None
    params = dataclasses.replace(params, max_new_tokens=max_new, min_new_tokens=min(params.min_new_tokens, max_new))
    engine.add_request(request_id, prepared, params)
    if demo:
        out.write(DEMO_LABEL)
    text = ""
    try:
        while engine.has_unfinished_requests():
            for result in engine.step():
                if result.error is not None:
                    raise result.error
                out.write(result.delta)
                out.flush()
                text = result.text
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    from .errors import InternVLError
    from .processing.inputs import Message

    params = _params(args)
    engine = _load(args)
    messages = [Message("system", args.system)] if args.system else []
    messages.append(Message("user", args.prompt, images=[str(Path(p).expanduser()) for p in args.image]))
    try:
        prepared = engine.processor.prepare(messages, max_num=args.max_dynamic_patch)
        _stream_answer(engine, prepared, params, args.demo)
    except InternVLError as exc:
        raise CLIError(str(exc)) from None
    return 0


CHAT_HELP = """commands:
  /image FILE   attach an image to your next message
  /reset        forget the conversation (and pending images)
  /exit         leave (also Ctrl-D)
Ctrl-C stops an answer."""


def cmd_chat(args: argparse.Namespace) -> int:
    from .errors import InternVLError
    from .processing.inputs import Message

    params = _params(args)
    engine = _load(args)
    history: list[Message] = [Message("system", args.system)] if args.system else []
    pending: list[str] = []
    for image in args.image:
        pending.append(_check_image(image))
    label = " (RANDOM-WEIGHT DEMO)" if args.demo else ""
    print(f"internvl chat{label}: type a message; /image FILE, /reset, /exit.", flush=True)
    if pending:
        print(f"[{len(pending)} image(s) attached to your first message]", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                history = [Message("system", args.system)] if args.system else []
                pending = []
                print("[conversation reset]", flush=True)
            elif command == "/image":
                if not rest.strip():
                    print("usage: /image FILE", flush=True)
                    continue
                try:
                    pending.append(_check_image(rest.strip()))
                except CLIError as exc:
                    print(f"error: {exc}", flush=True)
                    continue
                print(f"[image attached: {rest.strip()}]", flush=True)
            elif command == "/help":
                print(CHAT_HELP, flush=True)
            else:
                print(f"unknown command {command}\n{CHAT_HELP}", flush=True)
            continue
        turn = Message("user", line, images=list(pending))
        try:
            prepared = engine.processor.prepare([*history, turn], max_num=args.max_dynamic_patch)
            print("model> ", end="", flush=True)
            answer = _stream_answer(engine, prepared, params, args.demo)
        except InternVLError as exc:
            print(f"error: {exc}", flush=True)
            continue
        history += [turn, Message("assistant", answer)]
        pending = []


def _check_image(path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise CLIError(f"image file {path!r} does not exist")
    return str(file)


# ---------------------------------------------------------------------------------------------------
# download / bench
# ---------------------------------------------------------------------------------------------------


def cmd_download(args: argparse.Namespace) -> int:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CLIError("download needs huggingface_hub: `pip install 'internvl-runtime[hub]'`") from None
    local_dir = Path(args.local_dir or Path("pretrained") / args.repo_id.split("/")[-1]).expanduser()
    print(f"downloading {args.repo_id} to {local_dir} (interrupted downloads resume)", file=sys.stderr)
    try:
        path = snapshot_download(repo_id=args.repo_id, local_dir=str(local_dir), revision=args.revision)
    except KeyboardInterrupt:
        raise CLIError("download interrupted; run the same command again to resume") from None
    except Exception as exc:  # noqa: BLE001 - every hub/network failure becomes one clear line
        name = type(exc).__name__
        text = str(exc).splitlines()[0] if str(exc) else name
        if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "connect" in str(exc).lower():
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
            raise CLIError(f"cannot reach the Hugging Face Hub to download {args.repo_id}{offline} (offline?). Check "
                           "the network or a proxy (HTTPS_PROXY), or copy the checkpoint folder by hand; try "
                           "`internvl serve --demo` meanwhile.") from None
        if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            raise CLIError(f"{args.repo_id}: {text} (check the name, the revision, or log in with `hf auth "
                           "login` for gated models)") from None
        raise CLIError(f"download of {args.repo_id} failed: {name}: {text}") from None
    print(f"done: {path}", file=sys.stderr)
    return 0


def _bench_roots() -> list[Path]:
    """Where ``bench`` looks for benchmarks/run_all.py: the current folder, then the source checkout."""
    return [Path.cwd(), Path(__file__).resolve().parents[1]]


def _find_benchmarks() -> Path | None:
    for root in _bench_roots():
        script = root / "benchmarks" / "run_all.py"
        if script.is_file():
            return script
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    script = _find_benchmarks()
    if script is None:
        print("internvl bench: no benchmarks are there (looked for benchmarks/run_all.py in the current folder "
              "and in the source checkout)", file=sys.stderr)
        return 1
    print(f"internvl bench: running {script}", file=sys.stderr)
    return subprocess.call([sys.executable, str(script), *args.bench_args], cwd=str(script.parent.parent))


def cmd_info(args: argparse.Namespace) -> int:
    """The host's capabilities and the compute plan a model loaded in ``--dtype`` would get."""
    import torch

    from .compute_plan import choose_plan
    from .hardware import describe_host

    print(f"host: {describe_host()}")
    print(f"cuda: {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "cuda: not available")
    print(choose_plan(getattr(torch, args.dtype), "cpu").describe())
    return 0


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .serving.config import ServerConfig

    parser = argparse.ArgumentParser(prog="internvl", description="InternVL2 runtime: serve an OpenAI-compatible "
                                     "API with a web chat page, chat in the terminal, generate, download, bench.")
    from .version import __version__
    parser.add_argument("--version", action="version", version=f"internvl-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="OpenAI-compatible server with a web chat page at /",
                           description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics "
                           "and a web chat page at /. Weights load in the background; /health says when ready.")
    _model_args(serve)
    _add_config_flags(serve, ServerConfig)
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="interactive chat in the terminal, streaming",
                          description="Chat in the terminal. " + CHAT_HELP.replace("\n", " "))
    _model_args(chat)
    chat.add_argument("--image", action="append", default=[], metavar="FILE",
                      help="image for the first message (repeatable)")
    _sampling_flags(chat)
    _hub_flags(chat)
    chat.set_defaults(func=cmd_chat)

    generate = sub.add_parser("generate", help="one answer to one prompt (with images), streamed",
                              description="Answer one prompt, optionally about images, and exit.")
    _model_args(generate)
    generate.add_argument("--image", action="append", default=[], metavar="FILE", help="image file (repeatable)")
    generate.add_argument("--prompt", required=True, help="the question")
    _sampling_flags(generate)
    _hub_flags(generate)
    generate.set_defaults(func=cmd_generate)

    download = sub.add_parser("download", help="download a checkpoint from the Hugging Face Hub (resumable)",
                              description="Download a checkpoint folder with huggingface_hub (progress bars; "
                              "an interrupted download resumes).")
    download.add_argument("repo_id", metavar="REPO", help="e.g. OpenGVLab/InternVL2-1B")
    download.add_argument("--local-dir", default=None, help="target folder (default: pretrained/<name>)")
    download.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    download.set_defaults(func=cmd_download)

    bench = sub.add_parser("bench", help="run the benchmarks (benchmarks/run_all.py)",
                           description="Run benchmarks/run_all.py; extra arguments are passed on.")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for run_all.py")
    bench.set_defaults(func=cmd_bench)

    info = sub.add_parser("info", help="show the host's CPU features and the compute plan per dtype",
                          description="Print the CPU flags that matter, CUDA devices, and the compute plan "
                          "(16-bit handling, decode kernel) a model loaded in --dtype would use.")
    info.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``internvl`` command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) != "bench":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.bench_args = [*extra, *args.bench_args]     # `internvl bench --quick`: for run_all.py
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"internvl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
