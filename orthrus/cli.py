"""`orthrus generate` and `orthrus train`: thin argument parsing over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import OrthrusError


def _generate(args) -> int:
    from .default_model import default_model_path
    from .loader import load

    prompt = _prompt_ids(args.prompt) if args.ids else args.prompt
    model = load(args.model or default_model_path(), device=args.device, dtype=args.dtype)
    if args.chat:
        if model.tokenizer is None:
            raise OrthrusError(f"--chat needs a tokenizer, and {model.path} has no tokenizer.json")
        prompt = [{"role": "user", "content": args.prompt}]
    elif model.tokenizer is None and not args.ids:
        raise OrthrusError(f"{model.path} has no tokenizer.json, so a text prompt cannot be encoded; "
                           "give token ids as the prompt with --ids (e.g. `orthrus generate --ids '1 2 3'`)")

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = model.generate(prompt, max_new_tokens=args.max_new_tokens, mode=args.mode,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            stop=args.stop, stream=None if args.json else stream,
                            enable_thinking=False if args.no_thinking else None)
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "stats": result.stats}))
        return 0
    if result.text is None:  # no tokenizer: the ids are the output
        print(" ".join(map(str, result.tokens)))
    else:
        sys.stdout.write("\n")
    stats = result.stats
    print(f"[{stats['mode']}] {stats['generated_tokens']} tokens, {stats['iterations']} iterations, "
          f"{stats['tokens_per_iteration']:.2f} tokens/iteration, {stats['tokens_per_second']:.1f} tok/s, "
          f"prefill {stats['prefill_seconds'] * 1e3:.1f} ms, decode {stats['decode_seconds'] * 1e3:.1f} ms",
          file=sys.stderr)
    return 0


def _prompt_ids(text: str) -> list[int]:
    words = text.replace(",", " ").split()
    if not all(word.isdigit() for word in words):
        raise OrthrusError(f"prompt: with --ids it must be token ids separated by spaces or commas, got {text!r}")
    return [int(word) for word in words]


def _one_line(message) -> str:
    # Messages may quote multi-line text (hub errors, template errors); the report stays a single line.
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


class _ArgumentParser(argparse.ArgumentParser):
    """Argument errors are reported like every other error: one line on stderr, no usage block."""

    def error(self, message):
        self.exit(2, f"orthrus: error: {_one_line(message)} (see `{self.prog} --help`)\n")


def _train(args) -> int:
    from .train import main as train_main

    return train_main(args.train_args)


def _dtype(name: str):
    import torch

    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in choices:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
    return choices[name]


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="orthrus", description="Exact multi-token decoding for Qwen3.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text from a prompt")
    generate.add_argument("prompt", help="prompt text (or the user message with --chat)")
    generate.add_argument("--model", help="checkpoint directory or hub id (default: the embedded model)")
    generate.add_argument("--mode", default="orthrus", choices=("orthrus", "ar", "ngram"))
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    prompt_kind = generate.add_mutually_exclusive_group()
    prompt_kind.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    generate.add_argument("--no-thinking", action="store_true",
                          help="with --chat: render the template with enable_thinking=False (Qwen3)")
    prompt_kind.add_argument("--ids", action="store_true",
                             help="the prompt is token ids separated by spaces or commas (no tokenizer needed)")
    generate.add_argument("--json", action="store_true", help="print one JSON object {text, tokens, stats}")
    generate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    generate.add_argument("--dtype", type=_dtype, default=None, help="float32, float16 or bfloat16")
    generate.set_defaults(run=_generate)

    train = commands.add_parser("train", help="train the diffusion view of a Qwen3 checkpoint",
                                add_help=False)
    train.add_argument("train_args", nargs=argparse.REMAINDER)
    train.set_defaults(run=_train)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # argparse.REMAINDER cannot start with an option (`train --base ...`): train's arguments bypass it.
    is_train = argv[:1] == ["train"]
    args = build_parser().parse_args(argv[:1] if is_train else argv)
    if is_train:
        args.train_args = argv[1:]
    try:
        return args.run(args)
    except OrthrusError as error:
        print(f"orthrus: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orthrus: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a one-line report for users; ORTHRUS_DEBUG=1 keeps the traceback
        if os.environ.get("ORTHRUS_DEBUG"):
            raise
        print(f"orthrus: error: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
        return 1
