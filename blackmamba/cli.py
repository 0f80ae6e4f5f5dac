"""Command line: thin wrappers over the Python API.

    blackmamba generate --model DIR --prompt TEXT [...]   text generation (greedy by default)
    blackmamba info DIR                                    parameters, layer pattern, dtype, size on disk
    blackmamba convert SRC DST [--to ours|released]        between the released layout and ours
    blackmamba data prepare --source NAME_OR_PATH... --out DIR [--tokenizer neox|bpe:VOCAB]
    blackmamba train (--preset NAME | --config FILE) --data DIR --out RUN [...]
    blackmamba plot RUN                                    PNG plots of a training run
    blackmamba flops (--preset NAME | --config FILE)       FLOPs per token vs dense Mamba / transformer
    blackmamba eval --model DIR (--tasks paper | --perplexity SOURCE)   lm-eval tasks offline, perplexity
    blackmamba demo                                        prepare Shakespeare, train, evaluate, generate

Errors in the input (missing model, corrupt checkpoint, bad option) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

from .checkpoint import CheckpointError, checkpoint_size, convert, detect_layout, load_config
from .config import ConfigError
from .devices import DTYPES, resolve_device, resolve_dtype
from .model import BlackMamba
from .tokenizer import TokenizerError
from .training.data import DataError
from .training.trainer import TrainingError


class CliError(Exception):
    """A user error reported without a traceback."""


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
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise CliError(f"--device: {e}") from None
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
        cuda_graphs=False if args.no_cuda_graphs else None,
        prefill_chunk_size=args.prefill_chunk_size,
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
    with torch.device("meta"):  # counts from the shapes alone, no memory
        skeleton = BlackMamba(config)
    total, active = skeleton.num_parameters(), skeleton.num_parameters(active=True)
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

    run_demo(
        out_dir=args.out,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        minutes=args.minutes,
    )


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from .training.data import prepare

    manifest = prepare(args.source, args.out, args.tokenizer, args.val_fraction, args.dtype)
    for split, info in manifest["splits"].items():
        print(f"{split:<6} {len(info['documents']):>6} documents {info['tokens']:>12,} tokens")
    print(
        f"vocabulary {manifest['vocab_size']:,} ({manifest['tokenizer']}), stored as {manifest['dtype']} in {args.out}"
    )


def cmd_train(args: argparse.Namespace) -> None:
    from .training.trainer import TrainArgs, train

    fields = TrainArgs.__dataclass_fields__
    summary = train(TrainArgs(**{k: v for k, v in vars(args).items() if k in fields}))
    print(json.dumps(summary, indent=1))


def cmd_plot(args: argparse.Namespace) -> None:
    from .training.plots import plot_run

    for path in plot_run(args.run):
        print(f"wrote {path}")


def cmd_flops(args: argparse.Namespace) -> None:
    from .config import BlackMambaConfig
    from .training.flops import comparison

    if bool(args.preset) == bool(args.config):
        raise CliError("give exactly one of --preset or --config")
    config = BlackMambaConfig.from_preset(args.preset) if args.preset else BlackMambaConfig.from_json(args.config)
    print(f"FLOPs per token at sequence length {args.seq_len} (see blackmamba/training/flops.py for the formulas)")
    print(f"{'model':<48} {'active params':>15} {'forward':>12} {'train':>12}")
    for row in comparison(config, args.seq_len):
        forward, train = row["forward"] / 1e9, row["train"] / 1e9
        print(f"{row['model']:<48} {row['active_params']:>15,} {forward:>10.3f} G {train:>10.3f} G")


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
    g.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, run the decode step eagerly")
    g.add_argument("--prefill-chunk-size", type=int, default=None, help="prompt positions per prefill forward")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("model", help="checkpoint directory")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert between the released layout and ours")
    c.add_argument("src", help="source checkpoint directory")
    c.add_argument("dst", help="destination directory (replaced atomically)")
    c.add_argument("--to", choices=["ours", "released"], default=None, help="target layout (default: the other one)")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("demo", help="prepare Shakespeare, train the small preset, evaluate, generate")
    d.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    d.add_argument("--prompt", default="ROMEO:", help="prompt for the sample")
    d.add_argument("--max-new-tokens", type=int, default=300)
    d.add_argument("--minutes", type=float, default=9.0, help="training time budget (default 9)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="training data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="tokenize text into memory-mapped shards")
    prep.add_argument(
        "--source", nargs="+", required=True, help="shakespeare, pystdlib, or .txt/.md/.jsonl files or folders"
    )
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--tokenizer", default="neox", help="neox (GPT-NeoX-20B) or bpe:VOCAB (trained here)")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out")
    prep.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"], help="token storage type")
    prep.set_defaults(func=cmd_data_prepare)

    t = sub.add_parser("train", help="train a model")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--preset", help="model preset (tiny, small, blackmamba-1.5b, blackmamba-2.8b)")
    src.add_argument("--config", help="model config JSON")
    t.add_argument("--data", required=True, help="directory from `blackmamba data prepare`")
    t.add_argument("--out", required=True, help="run directory (metrics, checkpoints, plots)")
    t.add_argument("--max-steps", type=int, help="optimizer steps")
    t.add_argument("--max-minutes", type=float, help="time budget; the schedule is fitted to it")
    t.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    t.add_argument("--min-lr", type=float, default=2e-4, help="final learning rate of the cosine decay")
    t.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    t.add_argument(
        "--weight-decay", type=float, default=0.1, help="AdamW weight decay (not on A_log, D, norms, biases, embedding)"
    )
    t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0 = off)")
    t.add_argument("--eval-every", type=int, default=100, help="validation every N steps")
    t.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens per evaluation")
    t.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    t.add_argument("--keep-last", type=int, default=2, help="checkpoints to keep")
    t.add_argument("--log-every", type=int, default=10, help="metrics row every N steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda")
    t.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: bf16 autocast on GPU, fp32 on CPU",
    )
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    t.add_argument("--init-from", help="start from this checkpoint (released layout or ours)")
    t.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default 784 on GPU)")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser("plot", help="write PNG plots of a training run")
    pl.add_argument("run", help="run directory")
    pl.set_defaults(func=cmd_plot)

    fl = sub.add_parser("flops", help="FLOPs per token next to dense Mamba and dense transformer")
    fsrc = fl.add_mutually_exclusive_group()
    fsrc.add_argument("--preset")
    fsrc.add_argument("--config")
    fl.add_argument("--seq-len", type=int, default=2048)
    fl.set_defaults(func=cmd_flops)

    from .eval.cli import add_eval_arguments, cmd_eval

    ev = sub.add_parser("eval", help="lm-eval tasks offline (--tasks paper) and perplexity / expert load")
    add_eval_arguments(ev)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 0) < 0:
        print("error: --max-new-tokens must be >= 0", file=sys.stderr)
        return 1
    try:
        args.func(args)
    except (
        CliError,
        CheckpointError,
        ConfigError,
        TokenizerError,
        DataError,
        TrainingError,
        ValueError,
        FileNotFoundError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
