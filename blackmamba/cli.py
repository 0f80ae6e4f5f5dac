"""Command line: thin wrappers over the Python API.

    blackmamba generate --model DIR --prompt TEXT [...]   text generation (greedy by default)
    blackmamba info DIR                                    parameters, layer pattern, dtype, size on disk
    blackmamba convert SRC DST [--to ours|released]        between the released layout and ours
    blackmamba demo                                        build, save, reload and generate with a small model

Errors in the input (missing model, corrupt checkpoint, bad option) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from .checkpoint import CheckpointError, checkpoint_size, convert, detect_layout, expected_shapes, load_config
from .config import ConfigError
from .tokenizer import TokenizerError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CliError(Exception):
    """A user error reported without a traceback."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CliError(f"bad --device {name!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise CliError(f"unsupported --device {name!r}: use auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda requested but no CUDA GPU is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string it contains, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def cmd_generate(args: argparse.Namespace) -> None:
    from .checkpoint import load_pretrained
    from .generation import stream_generate
    from .tokenizer import eos_token_id, load_tokenizer

    if not args.prompt:
        raise CliError("--prompt is empty: give some text to continue")
    device = resolve_device(args.device)
    model = load_pretrained(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise CliError("the prompt encodes to no tokens")
    eos = None if args.ignore_eos else eos_token_id(tokenizer)
    new: list[int] = []
    shown = None  # text printed so far when streaming (None: not even the prompt yet)
    start = time.perf_counter()
    for step in stream_generate(
        model,
        [prompt_ids],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=eos,
        seed=args.seed,
    ):
        if args.stream and shown is None:
            print(args.prompt, end="", flush=True)
            shown = ""
        if step[0] is None:
            break
        new.append(step[0])
        text, stopped = cut_at_stop(tokenizer.decode(new), args.stop)
        if stopped:
            break
        if args.stream:
            safe = stream_safe_prefix(text, args.stop)
            print(safe[len(shown) :], end="", flush=True)
            shown = max(shown, safe, key=len)
    elapsed = time.perf_counter() - start
    text, _ = cut_at_stop(tokenizer.decode(new), args.stop)
    if args.stream:
        if shown is None:  # no step ran (max_new_tokens 0): the prompt is still to print
            print(args.prompt, end="")
            shown = ""
        print(text[len(shown) :], flush=True)
    else:
        print(args.prompt + text)
    print(f"[{len(new)} tokens in {elapsed:.2f} s, {len(new) / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)


def stream_safe_prefix(text: str, stops: Sequence[str]) -> str:
    """The part of ``text`` that can be printed now: no trailing partial UTF-8 character, and nothing that
    could be the beginning of a stop string completed by later tokens."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return text[:end]


def cmd_info(args: argparse.Namespace) -> None:
    layout = detect_layout(args.model)
    config = load_config(args.model)
    shapes = expected_shapes(config)
    total = active = 0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        total += n
        active += n // shape[0] if name.endswith(("mixer.w1", "mixer.w2")) else n
    n_mamba = config.layer_pattern.count("mamba")
    rows = [
        ("layout", layout),
        ("total parameters", f"{total:,}"),
        ("active parameters", f"{active:,} (one expert per MoE block, embedding included)"),
        ("blocks", f"{config.n_layers} ({n_mamba} Mamba + {config.n_layers - n_mamba} MoE)"),
        ("layer pattern", _pattern_summary(config.layer_pattern)),
        ("d_model / d_inner / d_state", f"{config.d_model} / {config.d_inner} / {config.d_state}"),
        ("experts / d_ff", f"{config.n_experts} top-1 / {config.d_ff} ({config.moe_activation}-gated)"),
        ("vocab", f"{config.vocab_size}"),
        ("dtype", _stored_dtype(args.model, layout)),
        ("size on disk", f"{checkpoint_size(args.model) / 2**20:,.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _pattern_summary(pattern: Sequence[str]) -> str:
    if len(pattern) % 2 == 0 and list(pattern) == ["mamba", "moe"] * (len(pattern) // 2):
        return f"[mamba, moe] x {len(pattern) // 2}"
    return "[" + ", ".join(pattern) + "]"


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _stored_dtype(path: str, layout: str) -> str:
    """The dtype of the stored embedding (torch's name), read without loading the weights."""
    from pathlib import Path

    if layout == "released":
        state = torch.load(Path(path) / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
        return str(state["model"]["embedding.word_embeddings.weight"].dtype).removeprefix("torch.")
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if "embedding.weight" in f.keys():
                stored = f.get_slice("embedding.weight").get_dtype()
                return _SAFETENSORS_DTYPES.get(stored, stored.lower())
    return "unknown"


def cmd_convert(args: argparse.Namespace) -> None:
    target = convert(args.src, args.dst, to=args.to)
    print(f"wrote {args.dst} ({target} layout)")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(out_dir=args.out, prompt=args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blackmamba", description="BlackMamba language models (Mamba + MoE).")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--model", required=True, help="checkpoint directory (released layout or ours)")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--repetition-penalty", type=float, default=None, help="penalty > 1 discourages repeats")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going after the end-of-text token")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, fp32 on CPU")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("model", help="checkpoint directory")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert between the released layout and ours")
    c.add_argument("src", help="source checkpoint directory")
    c.add_argument("dst", help="destination directory (replaced atomically)")
    c.add_argument("--to", choices=["ours", "released"], default=None, help="target layout (default: the other one)")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("demo", help="build a small model, save it, reload it and generate")
    d.add_argument("--out", default="runs/demo", help="where to write the model (default runs/demo)")
    d.add_argument("--prompt", default="ROMEO:", help="prompt for the sample")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 0) < 0:
        print("error: --max-new-tokens must be >= 0", file=sys.stderr)
        return 1
    try:
        args.func(args)
    except (CliError, CheckpointError, ConfigError, TokenizerError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
