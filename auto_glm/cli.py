"""The ``autoglm`` command line: one small function per subcommand, registered in ``COMMANDS``."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from auto_glm.build_info import version_line

__all__ = ["COMMANDS", "Command", "build_parser", "command", "main"]


@dataclass(frozen=True)
class Command:
    """A subcommand: ``configure`` adds its arguments, ``run`` returns the exit status."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(help=help, configure=configure, run=run)
        return run

    return register


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model/--device/--dtype, shared by every command that loads a model."""
    parser.add_argument(
        "--model",
        default=None,
        help="model directory or Hugging Face Hub id (default: the built-in demo model)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16 or float16 (default: bfloat16; float16 on GPUs without bf16)",
    )
    parser.add_argument(
        "--compute-dtype",
        default=None,
        help="arithmetic precision (default: as --dtype, but float32 on CPUs without native "
        "bfloat16, where it is several times faster and exact for bfloat16 weights)",
    )
    parser.add_argument(
        "--quantization",
        choices=("none", "int8", "w8a8"),
        default="none",
        help="linear weights at load: none, int8 (INT8 weights) or w8a8 (INT8 weights and "
        "activations, on CPUs with AVX512-VNNI or AMX and CUDA GPUs of compute capability "
        "7.5+) (default: none)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "int8", "fp8_e4m3"),
        default="auto",
        help="KV cache precision: auto (the compute dtype), int8 or fp8_e4m3 (about twice "
        "the tokens in the same memory) (default: auto)",
    )
    parser.add_argument(
        "--kv-cache-scales",
        choices=("dynamic", "calibrate", "checkpoint"),
        default="dynamic",
        help="Where a quantized KV cache's scales come from: dynamic (per token), calibrate "
        "(per layer and KV head, measured at load: exactly twice the tokens of bf16), "
        "checkpoint (its kv_cache_scheme's) (default: dynamic)",
    )
    parser.add_argument(
        "--attention-backend",
        choices=("auto", "torch", "cpu", "triton", "flashinfer"),
        default="auto",
        help="attention kernels: auto (native kernels on the CPU; on a CUDA GPU FlashInfer's "
        "where it is installed, else Triton), torch, cpu, triton or flashinfer (default: auto)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay decode steps from CUDA graphs captured at start, on a CUDA GPU with the "
        "Triton backend (default: on; the CPU runs eagerly either way)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickle weights (pytorch_model.bin); they can run code, so only if trusted",
    )


def _configure_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="text to continue")
    add_model_options(parser)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: 128")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="0 means greedy (default: 1.0)"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0, off)"
    )
    parser.add_argument("--top-k", type=int, default=0, help="default: 0 (off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument(
        "--stop", action="append", default=None, help="stop at this string (repeatable)"
    )
    parser.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print text as it is generated (default: on)",
    )


# the sampling fields generate's flags set, as the checks of SamplingParams name them
_GENERATE_FLAGS = {
    "max_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "seed": "--seed",
    "stop": "--stop",
}


@command("generate", "generate a completion for a prompt", _configure_generate)
def _generate(args: argparse.Namespace) -> int:
    from auto_glm.api import AutoGLM
    from auto_glm.sampling_params import SamplingParams

    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "stop": args.stop,
        "seed": args.seed,
    }
    try:  # checked before the model loads, naming the flag
        SamplingParams(
            max_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            stop=args.stop or [],
            seed=args.seed,
        )
    except ValueError as exc:
        message = str(exc)
        for field, flag in _GENERATE_FLAGS.items():
            message = re.sub(rf"^{field}=", f"{flag} ", message)
        print(f"autoglm generate: {message}", file=sys.stderr)
        return 2
    llm = AutoGLM(
        model_name=args.model,
        device=args.device,
        dtype=args.dtype,
        compute_dtype=args.compute_dtype,
        quantization=args.quantization,
        allow_pickle=args.allow_pickle,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_scales=args.kv_cache_scales,
        attention_backend=args.attention_backend,
        cuda_graphs=args.cuda_graphs,
    )
    try:
        if args.stream:
            for piece in llm.stream(args.prompt, **options):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(llm.generate(args.prompt, **options))
    finally:
        llm.close()
    return 0


@command(
    "demo-model",
    "print the built-in demo model's directory (building it if needed)",
    lambda parser: None,
)
def _demo_model(args: argparse.Namespace) -> int:
    from auto_glm.checkpoints import demo_model_path

    print(demo_model_path())
    return 0


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    from auto_glm.serving.cli import configure_serve

    configure_serve(parser)


@command("serve", "serve a model over an OpenAI-compatible HTTP API", _configure_serve)
def _serve(args: argparse.Namespace) -> int:
    from auto_glm.serving.cli import serve_command

    return serve_command(args)


def _configure_bench(parser: argparse.ArgumentParser) -> None:
    from auto_glm.bench.cli import configure_bench

    configure_bench(parser)


@command(
    "bench",
    "measure our engine's output tokens/s against transformers on the same model",
    _configure_bench,
)
def _bench(args: argparse.Namespace) -> int:
    from auto_glm.bench.cli import run_bench

    return run_bench(args)


def _tenancy_options(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def configure(parser: argparse.ArgumentParser) -> None:
        from auto_glm.tenants.cli import configure as configure_tenancy

        configure_tenancy(name, parser)

    return configure


def _run_tenancy(args: argparse.Namespace) -> int:
    from auto_glm.tenants.cli import run

    return run(args)


command("tenants", "manage tenants and their limits", _tenancy_options("tenants"))(_run_tenancy)
command("keys", "manage tenants' API keys", _tenancy_options("keys"))(_run_tenancy)
command("usage", "show usage per tenant, model and day", _tenancy_options("usage"))(_run_tenancy)


def _configure_models(parser: argparse.ArgumentParser) -> None:
    from auto_glm.registry.cli import configure
    from auto_glm.registry.commands import add_command
    from auto_glm.serving.traffic_cli import configure_traffic, run_traffic

    commands = configure(parser)
    configure_traffic(
        add_command(
            commands,
            "traffic",
            "split a served model's traffic between versions (hot swap, canary)",
            run_traffic,
            registry_options=False,
        )
    )


@command(
    "models",
    "register model versions, check their files and signatures, move traffic",
    _configure_models,
)
def _models(args: argparse.Namespace) -> int:
    from auto_glm.registry.cli import run

    return run(args)


def build_parser(only: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The command line, with the arguments of the subcommands in ``only`` (default: all).
    Each subcommand imports its own modules to build its arguments (the store's, the
    registry's, the server's), so a command that builds only its own starts without
    importing the others'."""
    parser = argparse.ArgumentParser(
        prog="autoglm",
        description="Open-AutoGLM: serve and run GLM, GLM-4, Llama, Qwen2 and Qwen3 models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # --version on one line
    )
    parser.add_argument(
        "--version",
        action="version",
        version=version_line(),
        help="print the version of autoglm, Python and its main libraries, and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, cmd in COMMANDS.items():
        subparser = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if only is None or name in only:
            cmd.configure(subparser)
    return parser


def _named_command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` runs: its first word, when that names one (the top level's
    own options, ``--help`` and ``--version``, take no value)."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in COMMANDS else None


def _subcommand_parser(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.ArgumentParser:
    """The deepest (sub)command parser that ``argv``'s words name, e.g. ``autoglm models
    add``'s for ``["models", "add", ...]``."""
    for word in argv:
        choices = next(
            (a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
            {},
        )
        if word in choices:
            parser = choices[word]
    return parser


def _unrecognized(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """argparse's "unrecognized arguments" message, with the nearest option the command
    has for each unknown one: ``did you mean --max-new-tokens for --max-tokens?``."""
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    hints = []
    for word in extras:
        option = word.split("=", 1)[0]
        if option.startswith("--"):
            near = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
            hints += [f"{near[0]} for {option}"] if near else []
    message = f"unrecognized arguments: {' '.join(extras)}"
    if hints:
        message += f" (did you mean {', '.join(hints)}?)"
    return f"{message}; see {parser.prog} --help"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    named = _named_command(argv)
    parser = build_parser([] if named is None else [named])
    args, extras = parser.parse_known_args(argv)
    if extras:  # said by the command that has the options, not by the top level
        sub = _subcommand_parser(parser, argv)
        sub.error(_unrecognized(sub, extras))
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except BrokenPipeError:
        # the reader left (`autoglm models list | head -1`): no error message, and none from
        # the interpreter's flush at exit either; the status a killed writer would have
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (ValueError, OSError) as exc:
        # Bad input, every model-loading problem, an unwritable cache: the message
        # already says what to change, so a traceback would only bury it.
        print(f"autoglm: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        # The engine's own failures (a request it failed, a dead loop) carry their fix in
        # the message; any other RuntimeError is a bug and keeps its traceback.
        if not type(exc).__module__.startswith("auto_glm."):
            raise
        print(f"autoglm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
