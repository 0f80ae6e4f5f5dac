"""Command line: thin wrappers over the Python API.

    blackmamba generate --model DIR --prompt TEXT [...]   text generation (greedy by default)
    blackmamba info DIR                                    parameters, layer pattern, dtype, size on disk
    blackmamba convert SRC DST [--to ours|released] [--overwrite]   between the released layout and ours
    blackmamba convert SRC DST --quantize fp8              fp8 weight-only copy (Mamba projections, experts)
    blackmamba data prepare --source NAME_OR_PATH... --out DIR [--tokenizer neox|bpe:VOCAB]
    blackmamba train (--preset NAME | --config FILE) --data DIR --out RUN [...]
    blackmamba plot RUN                                    PNG plots of a training run
    blackmamba flops (--preset NAME | --config FILE)       FLOPs per token vs dense Mamba / transformer
    blackmamba experiment paper --data DIR [...]           the paper's comparisons at equal training FLOPs
    blackmamba eval --model DIR (--tasks paper | --perplexity SOURCE)   lm-eval tasks offline, perplexity
    blackmamba demo                                        prepare Shakespeare, train, evaluate, generate
    blackmamba serve --model DIR [--port 8000] [...]       OpenAI-compatible HTTP server and playground page

Errors in the input (missing model, corrupt checkpoint, bad option) print one ``error:`` line and exit 1; a
malformed command line exits 2 (argparse); Ctrl-C exits 130 after printing what was generated; a closed
stdout (``| head``) ends quietly with 141, as Unix tools killed by SIGPIPE do. ``--threads N`` (before or,
for generate, after the subcommand) sets torch's CPU threads; by default the CPUs idle now are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence

import torch

from .checkpoint import convert, open_checkpoint
from .devices import DTYPES, DeviceError, resolve_device, resolve_dtype
from .errors import BlackMambaError
from .generation.sampling import MAX_NEW_TOKENS, SamplingOptions
from .model import BlackMamba
from .options import OptionsParser, add_options, options_from_namespace


class CliError(BlackMambaError):
    """A user error reported without a traceback."""


THREADS_HELP = (
    "CPU threads for torch (default: the CPUs idle now, at least 1, at most torch's default; "
    "on a busy machine fewer threads decode faster)"
)


def _check_text(value: str, option: str) -> None:
    """Refuse text that arrived as bytes that are not UTF-8: Python hands such argv bytes over as lone
    surrogates (surrogateescape), which the tokenizer cannot encode."""
    bad = _SURROGATE.search(value)
    if bad:
        ch = ord(bad.group())
        what = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"lone surrogate U+{ch:04X}"
        raise CliError(f"{option} is not valid UTF-8 ({what} at character {bad.start()}); give UTF-8 text")


_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|x[0-9a-fA-F]{2}|.|$)", re.DOTALL)
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"'}


def unescape(value: str, option: str) -> str:
    """``value`` with backslash escapes replaced: \\n \\t \\r \\0 \\\\ \\' \\" \\xHH \\uXXXX \\UXXXXXXXX. Shells pass
    ``"\\n"`` as a backslash and an n, so this is how a newline gets into ``--stop``."""

    def one(match: re.Match) -> str:
        code = match.group(1)
        if code in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[code]
        if len(code) > 1:
            point = int(code[1:], 16)
            if point <= 0x10FFFF and not 0xD800 <= point <= 0xDFFF:
                return chr(point)
            raise CliError(f"{option}: \\{code} in {value!r} is not a Unicode character")
        if not code:
            raise CliError(f"{option}: {value!r} ends in a lone backslash (write \\\\ for a backslash)")
        raise CliError(
            f"{option}: unknown escape \\{code} in {value!r} (known: \\n \\t \\r \\0 \\\\ \\xHH \\uXXXX; "
            "write \\\\ for a backslash)"
        )

    return _ESCAPE.sub(one, value)


def _option_error(e: Exception, option: str | None = None) -> CliError:
    """A GenerationError from the Python API, named by its command-line option."""
    name = option or getattr(e, "option", None)
    return CliError(f"--{name.replace('_', '-')}: {e}" if name else str(e))


def _sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """generate's sampling flags as :class:`SamplingOptions` (checked there; an error names the flag)."""
    from .generation import GenerationError

    try:
        return SamplingOptions(args.temperature, args.top_k, args.top_p, args.repetition_penalty, seed=args.seed)
    except GenerationError as e:
        raise _option_error(e) from None


def cmd_generate(args: argparse.Namespace) -> None:
    from .checkpoint import load_pretrained
    from .generation import GenerationError, TextStreamer, check_prefill_chunk_size, stream_generate
    from .tokenizer import eos_token_id, load_tokenizer

    _check_text(args.prompt, "--prompt")
    if not args.prompt:
        raise CliError("--prompt is empty: give some text to continue")
    stops = []
    for stop in args.stop:
        _check_text(stop, "--stop")
        stops.append(unescape(stop, "--stop"))
        if not stops[-1]:
            raise CliError("--stop is empty: give the text to stop at")
    options = _sampling_options(args)
    try:
        check_prefill_chunk_size(args.prefill_chunk_size)
        device = resolve_device(args.device)
    except GenerationError as e:
        raise _option_error(e) from None
    except DeviceError as e:
        raise CliError(f"--device: {e}") from None
    model = load_pretrained(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    tokenizer = load_tokenizer(args.model, model.config.vocab_size)
    prompt_ids = tokenizer.encode(args.prompt).ids
    if not prompt_ids:
        raise CliError("the prompt encodes to no tokens")
    if max(prompt_ids) >= model.config.vocab_size:
        raise CliError(f"the tokenizer gives ids beyond the model's vocabulary ({model.config.vocab_size})")
    if not args.ignore_eos:
        options = dataclasses.replace(options, eos_token_id=eos_token_id(tokenizer))
    streamer = TextStreamer(tokenizer, stops)
    pieces: list[str] = []  # without --stream, the text is printed whole at the end

    def emit(piece: str) -> None:
        if args.stream:
            print(piece, end="", flush=True)
        else:
            pieces.append(piece)

    emit(args.prompt)
    start = time.perf_counter()
    steps = stream_generate(
        model, [prompt_ids], args.max_new_tokens, **dataclasses.asdict(options),
        cuda_graphs=False if args.no_cuda_graphs else None, prefill_chunk_size=args.prefill_chunk_size,
    )  # fmt: skip
    interrupted = False
    try:
        for step in steps:
            if step[0] is None:
                break
            emit(streamer.put(step[0]))
            if streamer.stopped:
                break
    except KeyboardInterrupt:  # print what was generated, then main() reports the interruption
        interrupted = True
    emit(streamer.finish() + "\n")
    print("".join(pieces), end="", flush=True)
    if interrupted:
        raise KeyboardInterrupt
    elapsed = time.perf_counter() - start
    n = streamer.n_tokens
    print(f"[{n} tokens in {elapsed:.2f} s, {n / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> None:
    ckpt = open_checkpoint(args.model)  # every check loading makes, on the headers (no weights read)
    config = ckpt.config
    with torch.device("meta"):  # counts from the shapes alone, no memory
        skeleton = BlackMamba(config)
    total, active = skeleton.num_parameters(), skeleton.num_parameters(active=True)
    active_core = skeleton.num_parameters(active=True, embedding=False)
    kinds = {"mamba": "Mamba", "moe": "MoE", "attention": "attention", "mlp": "MLP"}
    counts = " + ".join(
        f"{config.layer_pattern.count(k)} {name}" for k, name in kinds.items() if k in config.layer_pattern
    )
    size = f"{ckpt.size_bytes / 2**20:,.1f} MiB"
    if ckpt.optimizer_bytes:
        size += f" (includes {ckpt.optimizer_bytes / 2**20:,.1f} MiB of optimizer state in trainer_state.pt)"
    rows = [
        ("layout", ckpt.layout),
        ("total parameters", f"{total:,}"),
        ("active parameters", f"{active:,} (one expert per MoE block, embedding included)"),
        ("active, no embedding", f"{active_core:,} (the count `blackmamba flops` compares)"),
        ("blocks", f"{config.n_layers} ({counts})"),
        ("layer pattern", _pattern_summary(config.layer_pattern)),
        ("d_model / d_inner / d_state", f"{config.d_model} / {config.d_inner} / {config.d_state}"),
        ("experts / d_ff", f"{config.n_experts} top-1 / {config.d_ff} ({config.moe_activation}-gated)"),
        ("vocab", f"{config.vocab_size}"),
        ("dtype", str(ckpt.dtype).removeprefix("torch.")),
        ("quantization", _quantization_summary(config.quantization)),
        ("size on disk", size),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _quantization_summary(quantization: str | None) -> str:
    if quantization is None:
        return "none"
    return f"{quantization} weight-only (Mamba projections and experts, per-output-channel scales; inference only)"


def _pattern_summary(pattern: Sequence[str]) -> str:
    if len(pattern) % 2 == 0 and list(pattern) == ["mamba", "moe"] * (len(pattern) // 2):
        return f"[mamba, moe] x {len(pattern) // 2}"
    return "[" + ", ".join(pattern) + "]"


def cmd_convert(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .training.rundir import is_distributed_checkpoint

    if is_distributed_checkpoint(Path(args.src)):  # a checkpoint of a torchrun training run
        from .training.dcp import dcp_to_pretrained

        if args.quantize:
            raise CliError(f"--quantize: convert {args.src} to a single-folder checkpoint first, then quantize that")
        target = args.to or "ours"
        dcp_to_pretrained(args.src, args.dst, overwrite=args.overwrite, to=target)
    else:
        target = convert(args.src, args.dst, to=args.to, overwrite=args.overwrite, quantize=args.quantize)
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
        skipped = f" ({len(info['duplicates'])} duplicates skipped)" if info.get("duplicates") else ""
        print(f"{split:<6} {len(info['documents']):>6} documents {info['tokens']:>12,} tokens{skipped}")
    print(
        f"vocabulary {manifest['vocab_size']:,} ({manifest['tokenizer']}), stored as {manifest['dtype']} in {args.out}"
    )


def cmd_train(args: argparse.Namespace) -> None:
    from .training.trainer import TrainArgs, train

    if "RANK" in os.environ:
        from .training.distributed import fail_fast, launched_by_torchrun

        if launched_by_torchrun():  # one process per rank: a failure on any ends the job, naming the rank
            with fail_fast():
                summary = train(options_from_namespace(TrainArgs, args))
            if os.environ["RANK"] == "0":
                print(json.dumps(summary, indent=1))
            return
    summary = train(options_from_namespace(TrainArgs, args))
    print(json.dumps(summary, indent=1))


def cmd_plot(args: argparse.Namespace) -> None:
    from .training.plots import plot_run

    for path in plot_run(args.run):
        print(f"wrote {path}")


MAX_FLOPS_SEQ_LEN = 2**24


def cmd_flops(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .config import BlackMambaConfig
    from .training.flops import comparison

    if bool(args.preset) == bool(args.config):
        raise CliError("give exactly one of --preset or --config")
    if not 1 <= args.seq_len <= MAX_FLOPS_SEQ_LEN:
        raise CliError(f"--seq-len must be from 1 to {MAX_FLOPS_SEQ_LEN:,}, got {args.seq_len}")
    if args.preset:
        config = BlackMambaConfig.from_preset(args.preset)
    else:  # a config.json, or a checkpoint folder holding one
        path = Path(args.config)
        config = BlackMambaConfig.from_json(path / "config.json" if path.is_dir() else path)
    print(f"FLOPs per token at sequence length {args.seq_len} (see blackmamba/training/flops.py for the formulas)")
    print(f"{'model':<48} {'active params*':>15} {'forward':>12} {'train':>12}")
    for row in comparison(config, args.seq_len):
        forward, train = row["forward"] / 1e9, row["train"] / 1e9
        print(f"{row['model']:<48} {row['active_params']:>15,} {forward:>10.3f} G {train:>10.3f} G")
    print("* parameters one token passes through (one expert per MoE block), embedding excluded")


def cmd_experiment(args: argparse.Namespace) -> None:
    from .experiments.paper import PaperArgs, run_paper, summary_table

    fields = PaperArgs.__dataclass_fields__
    results = run_paper(PaperArgs(**{k: v for k, v in vars(args).items() if k in fields and v is not None}))
    print(summary_table(results))
    for note in results["notes"]:
        print(f"note: {note}")
    print(f"wrote {os.path.join(args.out, 'results.json')} and {', '.join(results['plots'])}")


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval.cli import run_evaluation

    run_evaluation(
        args.model, args.tasks, args.perplexity, limit=args.limit, max_tokens=args.max_tokens,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, out=args.out, plot=args.plot,
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve.options import options_from_args

    options = options_from_args(args)
    try:
        from .serve.server import serve
    except ImportError as e:
        raise CliError(f"serving needs the serve extra ({e}): pip install 'blackmamba-toolkit[serve]'") from None
    serve(options)


def build_parser() -> argparse.ArgumentParser:
    parser = OptionsParser(
        prog="blackmamba",
        description="BlackMamba language models (Mamba + MoE).",
        epilog="exit codes: 0 done, 1 bad input (one error line), 2 bad command line, 130 Ctrl-C, "
        "141 stdout closed (e.g. | head)",
    )
    parser.add_argument("--threads", type=_threads_type, default=argparse.SUPPRESS, help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--model", required=True, help="checkpoint directory (released layout or ours)")
    g.add_argument("--prompt", required=True, help="text to continue (UTF-8)")
    g.add_argument(
        "--max-new-tokens", type=int, default=64, help=f"tokens to generate, 0 to {MAX_NEW_TOKENS:,} (default 64)"
    )
    add_options(g, SamplingOptions, only=("temperature", "top_k", "top_p", "repetition_penalty", "seed"))
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        help=r"stop before this text (repeatable); backslash escapes are read: \n \t \r \0 \\ \xHH \uXXXX, "
        r'so --stop "\n\n" stops at a blank line',
    )
    g.add_argument("--ignore-eos", action="store_true", help="keep going after the end-of-text token")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, run the decode step eagerly")
    g.add_argument("--prefill-chunk-size", type=int, default=None, help="prompt positions per prefill forward")
    g.add_argument("--threads", type=_threads_type, default=argparse.SUPPRESS, help=THREADS_HELP)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe a checkpoint")
    i.add_argument("model", help="checkpoint directory (checked as loading checks it; the weights are not read)")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert between the released layout and ours")
    c.add_argument("src", help="source checkpoint directory")
    c.add_argument("dst", help="destination directory: new, empty or a checkpoint (replaced atomically)")
    c.add_argument("--to", choices=["ours", "released"], default=None, help="target layout (default: the other one)")
    c.add_argument(
        "--quantize",
        choices=["fp8"],
        default=None,
        help="fp8: store the Mamba projections and the experts as e4m3 with per-output-channel scales, for "
        "inference (our layout; the rest is copied as it is)",
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST even if it holds other files (never SRC, a folder holding SRC, or the current folder)",
    )
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("demo", help="prepare Shakespeare, train the small preset, evaluate, generate")
    d.add_argument(
        "--out",
        default="runs/demo",
        help="folder for data/ and run/ (default runs/demo; new, empty or an earlier demo's)",
    )
    d.add_argument("--prompt", default="ROMEO:", help="prompt for the sample")
    d.add_argument("--max-new-tokens", type=int, default=300, help="tokens to sample at the end (default 300)")
    d.add_argument(
        "--minutes", type=float, default=9.0, help="training time budget (default 9; under 3 the model learns little)"
    )
    d.add_argument("--seed", type=int, default=0, help="seed of the data order, initialisation and sampling")
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="training data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="tokenize text into memory-mapped shards")
    prep.add_argument(
        "--source", nargs="+", required=True, help="shakespeare, pystdlib, or .txt/.md/.jsonl files or folders"
    )
    prep.add_argument(
        "--out",
        required=True,
        help="output directory: new, empty, or an earlier prepared dataset (replaced atomically; nothing else is)",
    )
    prep.add_argument("--tokenizer", default="neox", help="neox (GPT-NeoX-20B) or bpe:VOCAB (trained here)")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out")
    prep.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"], help="token storage type")
    prep.set_defaults(func=cmd_data_prepare)

    from .training.trainer import TrainArgs

    t = sub.add_parser("train", help="train a model")
    add_options(t, TrainArgs)
    t.add_options_file(TrainArgs)
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser("plot", help="write PNG plots of a training run")
    pl.add_argument("run", help="run directory")
    pl.set_defaults(func=cmd_plot)

    fl = sub.add_parser("flops", help="FLOPs per token next to dense Mamba and dense transformer")
    fsrc = fl.add_mutually_exclusive_group()
    fsrc.add_argument("--preset", help="model preset (tiny, small, blackmamba-1.5b, blackmamba-2.8b)")
    fsrc.add_argument("--config", help="model config JSON (ours or the released layout), or a checkpoint folder")
    fl.add_argument("--seq-len", type=int, default=2048, help="sequence length for the attention term (default 2048)")
    fl.set_defaults(func=cmd_flops)

    from .experiments.presets import DEFAULT_PRESET, PRESETS

    ex = sub.add_parser("experiment", help="re-run the paper's comparisons in miniature")
    ex_sub = ex.add_subparsers(dest="experiment", required=True)
    pp = ex_sub.add_parser(
        "paper",
        help="BlackMamba vs dense Mamba, transformer and transformer-MoE at equal training FLOPs",
        description="Train the four models of equal active parameters on the same tokens for the same training-FLOP "
        "budget; measure validation loss, the zero-shot suite, generation latency and FLOPs; write results.json "
        "and plots. A rerun with the same options continues an interrupted experiment.",
    )
    pp.add_argument("--data", required=True, help="directory from `blackmamba data prepare` (with a validation split)")
    pp.add_argument(
        "--budget-flops",
        type=float,
        default=None,
        help="training FLOPs per model, e.g. 4.5e12 (default: the preset's; "
        + ", ".join(f"{name} {p.budget_flops:g}" for name, p in PRESETS.items())
        + ")",
    )
    pp.add_argument("--out", default="runs/paper", help="output folder: new, empty or an earlier run of the same plan")
    pp.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help=f"model and measurement sizes (default {DEFAULT_PRESET}; cpu-mini: about 20 minutes on a 2-core CPU)",
    )
    pp.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    pp.add_argument("--limit", type=int, default=None, help="documents per zero-shot task (0 skips; default: preset's)")
    pp.add_argument("--kinds", help="models, comma-separated (default: blackmamba,mamba,transformer,transformer-moe)")
    pp.add_argument("--seed", type=int, default=None, help="seed of the initial weights and batch order (default 0)")
    pp.add_argument("--no-progress", dest="progress", action="store_false", help="no training progress bars or lines")
    pp.set_defaults(func=cmd_experiment)

    from .serve.options import add_serve_arguments

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, prompt cache, metrics)")
    add_serve_arguments(sv)
    sv.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="lm-eval tasks offline (--tasks paper) and perplexity / expert load")
    ev.add_argument("--model", required=True, help="checkpoint directory")
    ev.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, or 'paper' (the seven)")
    ev.add_argument("--perplexity", default=None, metavar="SOURCE", help="a text file, folder or 'shakespeare'")
    ev.add_argument(
        "--limit", type=float, default=None, help="tasks: documents per task (>= 1), or a fraction of each (< 1)"
    )
    ev.add_argument("--max-tokens", type=int, default=None, help="perplexity: stop after this many tokens")
    ev.add_argument("--batch-size", type=int, default=8, help="tasks: requests per forward (default 8)")
    ev.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    ev.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="auto: bf16 on GPU; on CPU the checkpoint's stored dtype",
    )
    ev.add_argument(
        "--out",
        default=None,
        help="JSON report (with both --tasks and --perplexity: OUT.tasks.json, OUT.perplexity.json)",
    )
    ev.add_argument("--plot", default=None, help="perplexity: PNG heatmap of the expert load")
    ev.set_defaults(func=cmd_eval)
    return parser


def _threads_type(text: str) -> int:
    value = int(text)
    limit = max(1024, os.cpu_count() or 1)
    if not 1 <= value <= limit:
        raise argparse.ArgumentTypeError(f"must be from 1 to {limit}, got {value}")
    return value


def _usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, and the cgroup's CPU quota where one is set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _busy_cpus(seconds: float = 0.05) -> float:
    """How many of this process's CPUs other work keeps busy, from /proc/stat over ``seconds`` (0 where it
    cannot be read). Sampled now, not averaged over a minute, so our own previous run does not count."""

    def times() -> dict[str, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name != "cpu":
                    values = [int(v) for v in fields[:8]]
                    out[name] = (sum(values), values[3] + values[4])  # total, idle + iowait
        return out

    try:
        mine = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        before = times()
        time.sleep(seconds)
        after = times()
    except (OSError, ValueError, AttributeError):
        return 0.0
    busy = 0.0
    for name in mine & before.keys() & after.keys():
        total = after[name][0] - before[name][0]
        if total > 0:
            busy += 1 - (after[name][1] - before[name][1]) / total
    return busy


def default_threads() -> int:
    """CPU threads when ``--threads`` is not given: the usable CPUs that are idle now, at least 1 and at most
    torch's own default. On a loaded machine fewer threads are faster (on a busy 2-core machine the 1.5B
    model decoded at 1.2 tokens/s with 2 threads and 6.9 with 1), because threads that wait for a busy core
    stall the others at every barrier."""
    idle = round(_usable_cpus() - _busy_cpus())
    return max(1, min(torch.get_num_threads(), idle))


# Commands that compute on the CPU, and so get default_threads() when --threads is not given.
_COMPUTE_COMMANDS = ("generate", "train", "eval", "demo")


def _report(message: str) -> None:
    print(message, file=sys.stderr)


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush stays quiet (the
    recipe in Python's documentation of SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (captured in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done; 1 bad input or an unusable file (one ``error:`` line); 2 a
    malformed command line (argparse); 130 interrupted by Ctrl-C (what was generated so far is printed);
    141 stdout closed early, e.g. by ``| head`` (quietly, as Unix tools that die of SIGPIPE). Anything
    else is a bug and shows its traceback."""
    from .generation import GenerationError
    from .generation.sampling import check_max_new_tokens

    previous_threads = torch.get_num_threads()
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "max_new_tokens"):
            try:
                check_max_new_tokens(args.max_new_tokens)
            except GenerationError as e:
                raise _option_error(e) from None
        threads = getattr(args, "threads", None)
        if threads is None and args.command in _COMPUTE_COMMANDS:
            threads = default_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        args.func(args)
    except BlackMambaError as e:
        _report(f"error: {e}")
        return 1
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except OSError as e:  # a file system error: one line naming the path
        paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
        _report(f"error: {paths + ': ' if paths else ''}{e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        _report("interrupted")
        return 130
    finally:
        torch.set_num_threads(previous_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
