"""`cic-gpt2` command line (also `python -m cic_gpt2`): `main()` imports a subcommand's module only when it runs.

What a command module provides and how a `CicError` is reported: docs/architecture.md.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from cic_gpt2 import __version__
from cic_gpt2.errors import CicError
from cic_gpt2.progress import quiet_library_bars

# name -> (module, one-line help). Help text lives here so `--help` imports nothing heavy.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("cic_gpt2.prepare", "CICIoT2023 CSVs -> serialized, tokenized, sharded Arrow splits + manifest"),
    "train": ("cic_gpt2.train", "fine-tune GPT-2 with DeepSpeed ZeRO-2 on prepared splits"),
    "check": ("cic_gpt2.check", "probe every rank (device, all-reduce, ops, shared run dir, quota, data, model) "
                                "before training"),
    "export": ("cic_gpt2.export", "DeepSpeed checkpoint -> Hugging Face model directory"),
    "convert": ("cic_gpt2.convert", "reshard a checkpoint to DeepSpeed's universal format before a resume at "
                                    "another world size"),
    "evaluate": ("cic_gpt2.evaluate", "metrics of an exported model on a prepared split or raw CSVs"),
    "predict": ("cic_gpt2.predict", "classify flows in a CSV with an exported model"),
    "baseline": ("cic_gpt2.baseline", "RandomForest / HistGradientBoosting on the same split"),
    "bench": ("cic_gpt2.bench", "training speed, MFU and memory benchmarks"),
    "demo": ("cic_gpt2.demo", "whole pipeline on the bundled real CICIoT2023 sample (CPU, tiny GPT-2)"),
}

EXIT_USER_ERROR = 2
EXIT_LOST_PEER = 1
# What gloo / NCCL / c10d say when the other end of a collective is gone or frozen.
LOST_PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting",
                     "timed out after", "NCCL communicator was aborted", "NCCL error", "Socket Timeout")


def lost_peer_message(e: BaseException, command: str) -> str | None:
    """One line for a collective that failed because a peer rank died or hung (None for anything else)."""
    import re

    text = str(e)
    if not (type(e).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError")
            or (isinstance(e, RuntimeError) and any(m in text for m in LOST_PEER_MARKERS))):
        return None
    first = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
    first = re.sub(r"^\[[^\]]*\.cc:\d+\]\s*", "", first)  # gloo's source location
    cause = first.split(". This is typically")[0].strip()[:200]
    rank = os.environ.get("RANK", "?")
    hint = (", then rerun the same launch command with --resume auto (it continues from the last complete "
            "checkpoint)") if command == "train" else ", then rerun"
    return (f"cic-gpt2 {command}: error: rank {rank} lost a peer rank in a collective: {cause}. Another "
            f"rank crashed, was killed or hung: read its log{hint}. Full traceback: CIC_GPT2_TRACEBACK=1")


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cic-gpt2",
        description="Distributed GPT-2 fine-tuning for CICIoT2023 network-traffic classification.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items())
        + "\n\nRun `cic-gpt2 COMMAND --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"cic-gpt2 {__version__}")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    return p


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    epilog = getattr(module, "epilog", None)
    parser = argparse.ArgumentParser(
        prog=f"cic-gpt2 {command}", description=getattr(module, "HELP", help_text),
        epilog=epilog() if epilog else None,
        # Raw keeps the epilog's own line breaks (train's config keys); other commands keep argparse's wrapping.
        formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter,
    )
    module.add_arguments(parser)
    parser.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        _top_parser().parse_args(argv or ["--help"])
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        _top_parser().parse_args([command])  # prints the choices and exits 2
    quiet_library_bars()  # before the command imports transformers / datasets
    try:
        args = build_parser(command).parse_args(rest)
        return int(args._main(args) or 0)
    except CicError as e:
        msg = str(e).strip().replace("\n", " ")
        print(f"cic-gpt2 {command}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"cic-gpt2 {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = lost_peer_message(e, command)
        if line is None or os.environ.get("CIC_GPT2_TRACEBACK") == "1":
            raise
        print(line, file=sys.stderr)
        return EXIT_LOST_PEER
    finally:
        sys.stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
