"""Generation on one GPU: decode and prefill throughput, latency, memory, against transformers' Jamba.

BlackMamba-2.8B and -1.5B shapes, random bf16 weights, the default backend (Triton kernels, CUDA graphs).
  decode   tokens/s at batch 1, 16, 64, 256 after a prompt of 16 (and 512) tokens, 256 new tokens, greedy;
           p50/p99 of the time per step as the caller sees it (one host read of the tokens per step)
  prefill  tokens/s of the prompt forward at 1x2048, 8x2048, 64x2048 (logits of the last position only),
           replayed from the prefill CUDA graphs (row "prefill", the path generate takes; max err against
           the eager forward of the same ids) and eager (row "prefill-eager"), and the time to first token
           (prefill + first sampled token) at 1x2048, with and without the prefill graphs
  fp8      the same decode and prefill shapes with the model quantized in place to fp8 weight-only (rows
           decode_fp8 and prefill_fp8; their peer is the bf16 row of the same shape; --no-fp8 skips them)
  memory   peak GPU memory after 1K, 8K and 64K new tokens at batch 1 (constant: no KV cache)
  latency  time to generate N tokens for N up to 16K, BlackMamba against a dense transformer of the same
           active size (scaled_dot_product_attention with a KV cache, CUDA graphs per 1K of cache length)
Peer: transformers' JambaForCausalLM with the same shapes and no attention layer, in the same process
(benchmarks/peers.py).
Floors: decode, the bytes one step must read (weights of the blocks, the experts the batch touches, the
states) over the copy bandwidth measured here; prefill, 2 x active parameters FLOPs per token over the
bf16 matmul rate measured here. Max err: logits of our fast path against our reference backend.

    python -m benchmarks.generate [--presets 2.8b 1.5b] [--quick]     (on the GPU machine)
    python -m benchmarks.generate --presets 2.8b --only prefill       (prefill rows only, about a minute)
    python -m benchmarks.generate --presets 2.8b --only decode        (decode rows only, batch 1 to 256)
    python -m benchmarks.generate --presets 2.8b --only fp8           (bf16 and fp8 decode and prefill rows)
    python -m benchmarks.generate --plot benchmarks/results/generate.json  (the PNG, where matplotlib is)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blackmamba import BlackMamba
from blackmamba.generation import stream_generate
from blackmamba.generation.prefill_graphs import prefill_graphs_for
from blackmamba.kernels import use_backend
from blackmamba.layers.quant import quantize_fp8

from .harness import (
    BF16,
    RESULTS_DIR,
    Row,
    argument_parser,
    build_model,
    fmt,
    gpu_ceilings,
    markdown_table,
    max_err,
    meta_line,
    random_ids,
    require_cuda,
    run_meta,
    sync_time,
    text_table,
    write_results,
)
from .peers import PEER_NAME, build_jamba, jamba_greedy, jamba_prefill

DEVICE = "cuda"
VOCAB = 50277  # token ids of the GPT-NeoX tokenizer the released models use
BF16_PEER = "blackmamba bf16 (same run)"  # the reference of the fp8 rows


def row(benchmark: str, shape: str, ours: float, peer_value: float | None, floor: float, err: float, **extra) -> Row:
    """A tokens/s row; the peer is named only where it was measured."""
    peer = PEER_NAME if peer_value is not None else None
    return Row(benchmark, shape, "tokens/s", ours, peer, peer_value, floor, err, extra)


def prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    return random_ids(batch, length, VOCAB, seed).tolist()


def decode_run(model: BlackMamba, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, list[float]]:
    """(decode tokens/s, seconds per step as the caller sees them), prefill excluded."""
    stamps = []
    for _ in stream_generate(model, prompts(batch, prompt_len), new_tokens):
        stamps.append(time.perf_counter())  # the tokens are on the host: the step is done
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return batch * len(steps) / sum(steps), steps


def decode_floor(model: BlackMamba, batch: int, bw: float) -> float:
    """Tokens/s if a step only read what it must: every weight but the experts, the experts the batch
    touches (expected count under uniform routing), each Mamba state read and written once."""
    c = model.config
    expert_bytes, other = 0, 0
    for name, p in model.named_parameters():
        if name.endswith(("mixer.w1", "mixer.w2")):
            expert_bytes += p.numel() * p.element_size() // c.n_experts
        elif name != "embedding.weight":
            other += p.numel() * p.element_size()
    touched = c.n_experts * (1 - (1 - 1 / c.n_experts) ** batch)
    head = model.embedding.weight.numel() * 2
    state = batch * c.layer_pattern.count("mamba") * c.d_inner * (c.d_state * 4 + (c.d_conv - 1) * 2) * 2
    step_bytes = other + head + touched * expert_bytes + state
    return batch * bw / step_bytes


@torch.inference_mode()
def prefill_time(model: BlackMamba, batch: int, length: int) -> tuple[float, torch.Tensor]:
    """(median seconds, last logits) of the eager prompt forward."""
    ids = random_ids(batch, length, VOCAB, seed=1, device=DEVICE)
    cache = model.allocate_cache(batch)
    model(ids, cache=cache, num_last_tokens=1)  # warm-up
    times = []
    for _ in range(3):
        cache = model.allocate_cache(batch)
        t0 = sync_time(DEVICE)
        logits = model(ids, cache=cache, num_last_tokens=1).logits[:, -1]
        times.append(sync_time(DEVICE) - t0)
    return statistics.median(times), logits


@torch.inference_mode()
def prefill_graph_time(model: BlackMamba, batch: int, length: int) -> tuple[float, torch.Tensor]:
    """(median seconds, last logits) of the same prompts through the prefill graphs, as generate runs them
    (ids from the host, the state copied into the caller's cache); the first call captures."""
    ids = random_ids(batch, length, VOCAB, seed=1)
    runner = prefill_graphs_for(model, True)
    runner.run(ids, model.allocate_cache(batch))  # capture
    times = []
    for _ in range(5):
        cache = model.allocate_cache(batch)
        t0 = sync_time(DEVICE)
        logits = runner.run(ids, cache)
        times.append(sync_time(DEVICE) - t0)
    return statistics.median(times), logits


def time_to_first_token(model: BlackMamba, length: int, prefill_graphs: bool = True) -> float:
    ps = prompts(1, length)
    next(iter(stream_generate(model, ps, 1, prefill_graphs=prefill_graphs)))  # warm-up
    t0 = sync_time(DEVICE)
    next(iter(stream_generate(model, ps, 1, prefill_graphs=prefill_graphs)))
    return time.perf_counter() - t0


@torch.inference_mode()
def fast_path_errors(model: BlackMamba) -> tuple[float, float]:
    """(prefill, decode step) max error of the default backend's logits against the reference backend."""
    ids = random_ids(1, 256, VOCAB, seed=2, device=DEVICE)
    out = {}
    for backend in ("auto", "ref"):
        with use_backend(backend):
            cache = model.allocate_cache(1)
            logits = model(ids, cache=cache).logits[:, -1]
            step = model.step(ids[:, -1], cache)
        out[backend] = (logits, step)
    return max_err(out["auto"][0], out["ref"][0]), max_err(out["auto"][1], out["ref"][1])


def memory_and_latency(model: BlackMamba, total: int, marks: list[int]) -> tuple[dict, list[tuple[int, float]]]:
    """Peak memory after each count in ``marks`` and the time to generate N tokens (batch 1)."""
    torch.cuda.reset_peak_memory_stats()
    peaks, curve = {}, []
    t0 = sync_time(DEVICE)
    for n, _ in enumerate(stream_generate(model, prompts(1, 16), total), start=1):
        if n in marks:
            peaks[n] = torch.cuda.max_memory_allocated() / 2**30
        if n & (n - 1) == 0 or n % 1024 == 0:
            curve.append((n, time.perf_counter() - t0))
    return peaks, curve


@torch.inference_mode()
def peer_decode(peer: Any, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Greedy decode tokens/s of the peer with its own cache (prefill excluded)."""
    steps = jamba_greedy(peer, random_ids(batch, prompt_len, VOCAB, seed=0, device=DEVICE), new_tokens + 1)
    next(steps)  # the prefill
    t0 = sync_time(DEVICE)
    for token in steps:
        token.tolist()  # hand the tokens over, as ours does
    return batch * new_tokens / (sync_time(DEVICE) - t0)


@torch.inference_mode()
def peer_prefill(peer: Any, batch: int, length: int) -> float:
    ids = random_ids(batch, length, VOCAB, seed=1, device=DEVICE)
    t0 = sync_time(DEVICE)
    jamba_prefill(peer, ids)
    return sync_time(DEVICE) - t0


def guarded(fn, *args):
    """The peer's figure, or None (with the reason printed) when transformers fails at this shape."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a failing peer must not lose our own figures
        print(f"peer failed: {fn.__name__}{args[1:]}: {type(exc).__name__}: {exc}", flush=True)
        return None


class DenseLM(nn.Module):
    """A pre-norm transformer (SDPA attention, GELU MLP of 4d) with a static KV cache, for the latency line."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.heads, self.max_len = heads, max_len
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "n1": nn.RMSNorm(d),
                    "qkv": nn.Linear(d, 3 * d, bias=False),
                    "o": nn.Linear(d, d, bias=False),
                    "n2": nn.RMSNorm(d),
                    "up": nn.Linear(d, 4 * d, bias=False),
                    "down": nn.Linear(4 * d, d, bias=False),
                }
            )
            for _ in range(layers)
        )
        self.norm = nn.RMSNorm(d)
        shape = (layers, 2, 1, heads, max_len, d // heads)
        self.register_buffer("kv", torch.zeros(shape), persistent=False)

    def step(self, token: torch.Tensor, pos: torch.Tensor, cap: int) -> torch.Tensor:
        """One token at position ``pos`` (a device scalar) attending to the cache up to ``cap`` (masked)."""
        x = self.embed(token)[:, None]
        visible = (torch.arange(cap, device=x.device) <= pos)[None, None, None]
        for i, blk in enumerate(self.blocks):
            q, k, v = blk["qkv"](blk["n1"](x)).view(1, 1, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            self.kv[i, 0].index_copy_(2, pos[None], k)
            self.kv[i, 1].index_copy_(2, pos[None], v)
            att = F.scaled_dot_product_attention(q, self.kv[i, 0, :, :, :cap], self.kv[i, 1, :, :, :cap], visible)
            x = x + blk["o"](att.transpose(1, 2).reshape(1, 1, -1))
            x = x + blk["down"](F.gelu(blk["up"](blk["n2"](x))))
        return F.linear(self.norm(x[:, 0]), self.embed.weight).argmax(-1)


@torch.inference_mode()
def dense_latency(active_params: int, d: int, vocab: int, total: int) -> list[tuple[int, float]]:
    layers = max(1, round((active_params - vocab * d) / (12 * d * d)))
    with torch.device(DEVICE):
        model = DenseLM(vocab, d, layers, d // 64, total).to(BF16).eval()
    token = torch.zeros(1, dtype=torch.long, device=DEVICE)
    pos = torch.zeros((), dtype=torch.long, device=DEVICE)
    graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def graph(cap: int) -> torch.cuda.CUDAGraph:
        if cap not in graphs:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                model.step(token, pos, cap)
            torch.cuda.current_stream().wait_stream(s)
            graphs[cap] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[cap]):
                token.copy_(model.step(token, pos, cap))
        return graphs[cap]

    def cap_for(n: int) -> int:
        return min(total, -(-n // 1024) * 1024)

    for n in range(1, total + 1, 1024):
        graph(cap_for(n))  # capture outside the timed loop
    curve = []
    t0 = sync_time(DEVICE)
    for n in range(1, total + 1):
        pos.fill_(n - 1)
        graph(cap_for(n)).replay()
        token.tolist()
        if n & (n - 1) == 0 or n % 1024 == 0:
            curve.append((n, time.perf_counter() - t0))
    return curve


def decode_batches(args: argparse.Namespace) -> list[int]:
    if args.only == "prefill":
        return []
    return [1, 16] if args.quick else [1, 16, 64, 256]


def prefill_batches(args: argparse.Namespace) -> list[int]:
    if args.only == "decode":
        return []
    return [1, 8] if args.quick or args.only else [1, 8, 64]


def decode_point(
    model: BlackMamba, short: str, batch: int, prompt_len: int, new_tokens: int
) -> tuple[str, float, dict[str, float]]:
    """(shape, tokens/s, p50/p99 ms per step) of one decode run, after a short run that captures the bucket's
    graph."""
    decode_run(model, batch, prompt_len, 8)
    tps, steps = decode_run(model, batch, prompt_len, new_tokens)
    ms = sorted(1e3 * s for s in steps)
    shape = f"{short}/b{batch}" + ("" if prompt_len == 16 else f"/p{prompt_len}")
    return shape, tps, {"p50_ms": ms[len(ms) // 2], "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))]}


def bench_preset(preset: str, args: argparse.Namespace, bw: float, peak: float, rows: list[Row], extras: dict) -> None:
    short = preset.removeprefix("blackmamba-")
    model = build_model(f"blackmamba-{short}", DEVICE, BF16)
    active = model.num_parameters(active=True)
    err_prefill, err_step = fast_path_errors(model)
    peer = None if args.no_peer or args.only else build_jamba(model.config, DEVICE, BF16)
    for batch in decode_batches(args):
        for prompt_len in (16, 512):
            shape, tps, percentiles = decode_point(model, short, batch, prompt_len, args.new_tokens)
            peer_tps = None
            if peer is not None and batch <= 16 and prompt_len == 16:
                peer_tps = guarded(peer_decode, peer, batch, prompt_len, 16 if batch > 1 else 32)
            rows.append(row("decode", shape, tps, peer_tps, decode_floor(model, batch, bw), err_step, **percentiles))
            print(json.dumps(rows[-1].to_json()), flush=True)
    for batch in prefill_batches(args):
        eager_s, eager_logits = prefill_time(model, batch, 2048)
        seconds, logits = prefill_graph_time(model, batch, 2048)
        peer_s = guarded(peer_prefill, peer, batch, 2048) if peer is not None and batch <= 8 else None
        peer_tps = None if peer_s is None else batch * 2048 / peer_s
        extra = {}
        if batch == 1:
            extra["time_to_first_token_ms"] = 1e3 * time_to_first_token(model, 2048)
            extra["time_to_first_token_eager_ms"] = 1e3 * time_to_first_token(model, 2048, prefill_graphs=False)
        shape, floor = f"{short}/{batch}x2048", peak / (2 * active)
        err = max_err(logits, eager_logits)
        rows.append(row("prefill", shape, batch * 2048 / seconds, peer_tps, floor, err, seconds=seconds, **extra))
        print(json.dumps(rows[-1].to_json()), flush=True)
        rows.append(row("prefill-eager", shape, batch * 2048 / eager_s, peer_tps, floor, err_prefill, seconds=eager_s))
        print(json.dumps(rows[-1].to_json()), flush=True)
    del peer
    prefill_graphs_for(model, True).clear()
    torch.cuda.empty_cache()
    if short == "2.8b" and not args.only:
        marks = [1024, 8192, 65536] if not args.quick else [1024, 8192]
        peaks, curve = memory_and_latency(model, marks[-1], marks)
        extras["peak_memory_gib_after_new_tokens"] = peaks
        extras["latency_curve"] = {"blackmamba-2.8b": curve[: sum(1 for n, _ in curve if n <= args.curve_tokens)]}
        extras["latency_curve"]["dense transformer (same active size)"] = dense_latency(
            active, model.config.d_model, model.config.vocab_size, args.curve_tokens
        )
        print(json.dumps(extras), flush=True)
    if args.only == "fp8" or (args.fp8 and not args.only):
        fp8_rows(model, short, args, bw, peak, rows)


def fp8_rows(model: BlackMamba, short: str, args: argparse.Namespace, bw: float, peak: float, rows: list[Row]) -> None:
    """The model quantized in place (fp8 weight-only, layers/quant.py) at the decode and prefill shapes of its
    bf16 rows: rows decode_fp8 and prefill_fp8, whose "peer" is the bf16 row of the same shape (so speedup is
    fp8 over bf16). The floor counts the fp8 bytes; max err is the fp8 model's fast path against its reference."""
    bf16 = {(r.benchmark, r.shape): r.ours for r in rows}
    quantize_fp8(model)
    err_prefill, err_step = fast_path_errors(model)
    for batch in decode_batches(args):
        for prompt_len in (16, 512):
            shape, tps, percentiles = decode_point(model, short, batch, prompt_len, args.new_tokens)
            ref = bf16.get(("decode", shape))
            rows.append(
                Row("decode_fp8", shape, "tokens/s", tps, None if ref is None else BF16_PEER, ref,
                    decode_floor(model, batch, bw), err_step, percentiles)
            )  # fmt: skip
            print(json.dumps(rows[-1].to_json()), flush=True)
    for batch in prefill_batches(args):
        eager_s, _ = prefill_time(model, batch, 2048)
        seconds, _ = prefill_graph_time(model, batch, 2048)
        shape = f"{short}/{batch}x2048"
        ref = bf16.get(("prefill", shape))
        extra = {"seconds": seconds, "seconds_eager": eager_s}
        if batch == 1:
            extra["time_to_first_token_ms"] = 1e3 * time_to_first_token(model, 2048)
        rows.append(
            Row("prefill_fp8", shape, "tokens/s", batch * 2048 / seconds, None if ref is None else BF16_PEER, ref,
                peak / (2 * model.num_parameters(active=True)), err_prefill, extra)
        )  # fmt: skip
        print(json.dumps(rows[-1].to_json()), flush=True)
    prefill_graphs_for(model, True).clear()
    torch.cuda.empty_cache()


def readme_table(paths: list[Path], benchmarks: list[str] | None = None) -> str:
    """The rows of results files as the README's markdown table (numbers with thousands separators, the
    floor fraction in percent), in file order; only the rows of ``benchmarks`` when given."""
    header = ["benchmark", "shape", "ours (tokens/s)", "transformers Jamba", "speedup", "floor", "of floor",
              "p50 ms/step", "p99 ms/step", "max err"]  # fmt: skip

    def num(value: float | None) -> str:
        return "n/a" if value is None else format(value, ",.0f" if abs(value) >= 100 else ".1f")

    def ms(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    body = []
    for path in paths:
        for r in json.loads(Path(path).read_text())["results"]:
            if benchmarks and r["benchmark"] not in benchmarks:
                continue
            p50, p99 = r.get("p50_ms"), r.get("p99_ms")
            body.append([
                r["benchmark"], r["shape"], num(r["ours"]), num(r["peer_value"]),
                "n/a" if r["speedup"] is None else f"{r['speedup']:.1f}x", num(r["floor"]),
                f"{r['fraction_of_floor']:.0%}", ms(p50), ms(p99), f"{r['max_err']:.3f}",
            ])  # fmt: skip
    return markdown_table(header, body)


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    curves = data["extras"]["latency_curve"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([n for n, _ in points], [s for _, s in points], marker="o", ms=3, label=name)
    ax.set_xlabel("generated tokens (batch 1)")
    ax.set_ylabel("seconds")
    meta = data["meta"]
    ax.set_title(f"Time to generate N tokens, 2.8B shape, {meta['card']}, {meta['date'][:10]}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    out = path.with_name("generate_latency.png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["benchmark", "shape", "ours", "peer", "speedup", "floor", "of floor", "p50 ms", "p99 ms", "max err"]
    body = [
        [r.benchmark, r.shape, fmt(r.ours), fmt(r.peer_value), fmt(r.speedup), fmt(r.floor),
         f"{r.fraction_of_floor:.0%}", fmt(r.extra.get("p50_ms")), fmt(r.extra.get("p99_ms")), fmt(r.max_err)]
        for r in rows
    ]  # fmt: skip
    return header, body


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--presets", nargs="+", default=["2.8b", "1.5b"], help="model shapes (2.8b, 1.5b)")
    parser.add_argument("--new-tokens", type=int, default=256, help="new tokens per decode run")
    parser.add_argument("--curve-tokens", type=int, default=16384, help="length of the latency curve")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument(
        "--only",
        choices=["prefill", "decode", "fp8"],
        help="only these rows (prefill: 1x2048 and 8x2048, graphs and eager; decode: batch 1, 16, 64 and 256; fp8: "
        "decode at those batches and prefill at 1x2048 and 8x2048, bf16 then fp8)",
    )
    parser.add_argument("--no-fp8", dest="fp8", action="store_false", help="skip the fp8 weight-only rows")
    parser.add_argument("--no-peer", action="store_true", help="do not build or time transformers' Jamba")
    default_out = "results/generate.json (with --only: generate_prefill.json, generate_decode.json, generate_fp8.json)"
    parser.add_argument("--out", help=f"results file (and .md beside it); default {default_out}")
    parser.add_argument("--plot", help="draw the latency PNG from a results file and exit")
    parser.add_argument("--readme-table", nargs="+", metavar="FILE", help="print results files as the README table")
    parser.add_argument(
        "--benchmarks", nargs="+", metavar="NAME", help="with --readme-table: only these rows' benchmarks"
    )
    args = parser.parse_args(argv)
    # A partial run must not overwrite the full results file.
    args.out = args.out or str(RESULTS_DIR / (f"generate_{args.only}.json" if args.only else "generate.json"))
    if args.readme_table:
        print(readme_table([Path(p) for p in args.readme_table], args.benchmarks))
        return
    if args.plot:
        print(plot(Path(args.plot)))
        return
    require_cuda(parser)
    bw, peak = gpu_ceilings(DEVICE)
    rows: list[Row] = []
    extras: dict = {}
    for preset in args.presets:
        bench_preset(preset, args, bw, peak, rows, extras)
    meta = run_meta(DEVICE, copy_bandwidth_TBps=bw / 1e12, bf16_matmul_TFLOPs=peak / 1e12)
    header, body = table(rows)
    md = f"{meta_line(meta)}\n\nUnit: tokens/s.\n\n{markdown_table(header, body)}\n"
    write_results(Path(args.out), meta, rows, md, extras=extras)
    print(f"\n{meta_line(meta)}\n{text_table(header, body)}")
    print("peak memory after N new tokens (GiB):", extras.get("peak_memory_gib_after_new_tokens"))


if __name__ == "__main__":
    main()
