"""CPU benchmark of blackmamba against Hugging Face transformers' ``JambaForCausalLM``.

Everything runs in one process with random weights built from configs (nothing is downloaded), with
``torch`` using as many threads as the machine has cores, under ``torch.inference_mode``:

* ``forward``: wall time of one full forward of a 1x2048 sequence of random token ids (never zeros),
  logits for every position in both models. Warm-up call, then the median of a few repeats (the peer
  at the 1.5B shape warms up on a short sequence and is timed once: one forward takes minutes).
* ``decode``: greedy decoding after a 16-token random prompt, batch 1. tokens/s = new tokens / wall
  time of the whole generation (its 16-token prefill included, for both models; prefill is also timed
  alone and reported in the JSON). Ours is ``blackmamba.generate``. The peer is a greedy loop over
  ``JambaForCausalLM.forward`` with its own cache: transformers' ``generate`` cannot run a Jamba without
  an attention layer (it asks the cache for a sequence length only attention layers hold), and a bare
  loop has less overhead than ``generate``, so this only favours the peer.
* ``floor``: the matrix-product floor of our forward. Matmul FLOPs are counted from the layer shapes
  (per Mamba block in_proj, x_proj, dt_proj, out_proj; per MoE block the router and, per token, one
  expert's fc1 d->2F and fc2 F->d; the tied head d->vocab) and divided by the best fp32
  ``torch.matmul`` rate measured in this run on GEMMs of the model's own shapes (median of repeats per
  shape, best shape). ``fraction of floor`` = floor / our time: 1.0 would mean purely matmul bound.
* ``max err``: our default (fast) path against the plain reference backend (``use_backend("ref")``):
  max |fast - ref| / max |ref| over the logits. Forward rows: a 1x64 forward. Decode rows: prefill of
  the prompt plus 16 teacher-forced ``step`` calls through the cache, logits of every step.

The peer gets our shapes: one Jamba layer is a Mamba mixer plus an MoE FFN, so it has as many layers as
we have Mamba blocks, each with 8 experts and top-1 routing, no attention layer, tied embeddings. On
CPU it runs its pure-PyTorch path (no mamba_ssm / causal_conv1d kernels). Differences that remain:
Jamba's extra RMSNorms on dt, B and C, and SiLU experts where ours use GELU.

The table is printed last on stdout and written to ``benchmarks/results/cpu.json`` and ``cpu.md``;
progress goes to stderr. ``--profile`` adds a torch.profiler summary of our forward to stderr.

    .venv/bin/python benchmarks/cpu.py                 # everything (about 15-20 minutes on 2 cores)
    .venv/bin/python benchmarks/cpu.py --only small    # the small preset only
    .venv/bin/python benchmarks/cpu.py --skip-1.5b --skip-peer
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmark this checkout of the package

from common import cpu_busy, cpu_model, fmt, markdown_table, text_table  # noqa: E402

from blackmamba import BlackMamba, BlackMambaConfig, generate  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PEER_NAME = "transformers JambaForCausalLM"
FORWARD_LEN = 2048
ERR_LEN = 64
ERR_STEPS = 16
PROMPT_LEN = 16
TARGET_FORWARD_SPEEDUP = 5.0  # small forward, vs the peer
TARGET_DECODE_SPEEDUP = 4.0  # decode tokens/s, vs the peer
TARGET_FLOOR_RATIO = 1.5  # 1.5B forward time / matmul floor
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- plan and results


@dataclass(frozen=True)
class Plan:
    """One model shape and how much to measure it."""

    key: str  # name in the table
    preset: str  # BlackMambaConfig preset
    ours_repeats: int
    peer_repeats: int
    peer_warmup_len: int  # length of the peer's warm-up forward
    ours_new_tokens: int
    peer_new_tokens: int
    decode_repeats: int
    peer_decode_repeats: int


PLANS = {
    "small": Plan("small", "small", 5, 3, FORWARD_LEN, 128, 128, 3, 3),
    "1.5b": Plan("1.5b", "blackmamba-1.5b", 3, 1, 128, 64, 32, 3, 1),
}


@dataclass
class Measured:
    """One model's measurements at one shape."""

    params: int
    forward_s: float
    forward_all_s: list[float]
    prefill_s: float
    decode_tps: float
    decode_tokens: int


@dataclass
class Row:
    benchmark: str
    shape: str
    unit: str
    ours: float
    peer_value: float | None
    higher_is_better: bool
    floor: float | None = None
    max_err: float | None = None
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        if self.peer_value is None:
            return None
        return self.ours / self.peer_value if self.higher_is_better else self.peer_value / self.ours

    @property
    def fraction_of_floor(self) -> float | None:
        return None if self.floor is None else self.floor / self.ours

    def meets_target(self) -> bool | None:
        if self.target.startswith("speedup"):
            goal = TARGET_FORWARD_SPEEDUP if self.benchmark == "forward" else TARGET_DECODE_SPEEDUP
            return None if self.speedup is None else self.speedup >= goal
        if self.target.startswith("time"):
            return None if self.floor is None else self.ours <= TARGET_FLOOR_RATIO * self.floor
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "shape": self.shape,
            "unit": self.unit,
            "ours": self.ours,
            "peer": PEER_NAME,
            "peer_value": self.peer_value,
            "floor": self.floor,
            "fraction_of_floor": self.fraction_of_floor,
            "speedup": self.speedup,
            "max_err": self.max_err,
            "target": self.target,
            "meets_target": self.meets_target(),
            **self.extra,
        }


# ----------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def random_ids(length: int, vocab: int, seed: int) -> torch.Tensor:
    """Random token ids in [1, vocab), shape (1, length)."""
    return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def max_rel_err(fast: torch.Tensor, ref: torch.Tensor) -> float:
    """max |fast - ref| / max |ref|."""
    fast, ref = fast.double(), ref.double()
    return float((fast - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------- models


def build_ours(cfg: BlackMambaConfig, seed: int = 0) -> BlackMamba:
    torch.manual_seed(seed)
    return BlackMamba(cfg).eval()


def jamba_config(cfg: BlackMambaConfig) -> Any:
    """A transformers JambaConfig with our shapes and no attention layer."""
    from transformers import JambaConfig

    n_mamba = cfg.layer_pattern.count("mamba")
    if cfg.layer_pattern.count("moe") != n_mamba:
        raise ValueError("a Jamba layer pairs one Mamba mixer with one MoE: the counts must match")
    heads = max(1, cfg.d_model // 128)  # unused: there is no attention layer
    return JambaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=n_mamba,
        # Layer i is attention iff i % period == offset; with offset n and period n + 1 none is.
        attn_layer_period=n_mamba + 1,
        attn_layer_offset=n_mamba,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        expert_layer_period=1,
        expert_layer_offset=0,
        num_experts=cfg.n_experts,
        num_experts_per_tok=1,
        mamba_d_state=cfg.d_state,
        mamba_d_conv=cfg.d_conv,
        mamba_expand=cfg.expand,
        mamba_dt_rank=math.ceil(cfg.d_model / 16),
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True,
        use_cache=False,
    )


def build_peer(cfg: BlackMambaConfig, seed: int = 0) -> Any:
    from transformers import JambaForCausalLM

    torch.manual_seed(seed)
    jcfg = jamba_config(cfg)
    if "attention" in jcfg.layers_block_type:
        raise RuntimeError(f"the peer config has attention layers: {jcfg.layers_block_type}")
    model = JambaForCausalLM(jcfg).eval()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the peer's head is not tied to its embedding")
    return model


# ----------------------------------------------------------------------------- decoding


def ours_generate(model: BlackMamba, prompt: list[int], new_tokens: int) -> list[int]:
    return generate(model, [prompt], max_new_tokens=new_tokens)[0]


def peer_generate(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding with the peer's own cache, one forward per new token."""
    from transformers import DynamicCache

    # Masks given as a dict skip transformers' mask construction, which needs an attention layer.
    masks = {"full_attention": None, "linear_attention": None}
    cache = DynamicCache(config=model.config)
    pos = torch.arange(len(prompt))[None]
    out = model(
        torch.tensor([prompt]),
        cache=cache,
        use_cache=True,
        attention_mask=masks,
        position_ids=pos,
        logits_to_keep=1,
    )
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    result = [int(token)]
    for step in range(new_tokens - 1):
        pos = torch.tensor([[len(prompt) + step]])
        out = model(token, cache=out.cache, use_cache=True, attention_mask=masks, position_ids=pos)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        result.append(int(token))
    return result


def decode_rate(
    gen: Callable[[list[int], int], list[int]], prompt: list[int], new_tokens: int, repeats: int
) -> tuple[float, int]:
    """(tokens/s, tokens per run) of greedy decoding: median over ``repeats`` after a short warm-up."""
    gen(prompt, min(8, new_tokens))
    produced = [0]

    def run() -> None:
        produced[0] = len(gen(prompt, new_tokens))

    seconds = statistics.median(timed(run, warmup=0, repeats=repeats))
    return produced[0] / seconds, produced[0]


# ----------------------------------------------------------------------------- error vs reference


def use_ref_backend() -> Any | None:
    """The ``use_backend`` context manager factory, or None when the package lacks it."""
    try:
        from blackmamba.kernels import use_backend
    except ImportError:
        # TODO(blackmamba): expose blackmamba.kernels.use_backend so the max-err column can be filled.
        return None
    return use_backend


def forward_error(model: BlackMamba, ids: torch.Tensor) -> float | None:
    use_backend = use_ref_backend()
    if use_backend is None:
        return None
    fast = model(ids).logits
    with use_backend("ref"):
        ref = model(ids).logits
    return max_rel_err(fast, ref)


def step_logits(model: BlackMamba, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the prefill's last position and of ``step`` fed ``tokens`` one by one: (1 + n, V)."""
    cache = model.allocate_cache(1)
    out = [model(prompt, cache=cache, num_last_tokens=1).logits[:, -1]]
    for t in tokens:
        out.append(model.step(t.view(1), cache))
    return torch.cat(out)


def decode_error(model: BlackMamba, prompt: list[int]) -> float | None:
    use_backend = use_ref_backend()
    if use_backend is None:
        return None
    prompt_ids = torch.tensor([prompt])
    tokens = random_ids(ERR_STEPS, model.config.vocab_size, seed=4)[0]
    fast = step_logits(model, prompt_ids, tokens)
    with use_backend("ref"):
        ref = step_logits(model, prompt_ids, tokens)
    return max_rel_err(fast, ref)


# ----------------------------------------------------------------------------- matmul floor


def matmul_shapes(cfg: BlackMambaConfig, tokens: int) -> list[tuple[str, int, int, int, int]]:
    """(name, count, M, K, N) of every matmul of our forward over ``tokens`` tokens (top-1 MoE)."""
    d, d_in, r, n = cfg.d_model, cfg.d_inner, cfg.dt_rank, cfg.d_state
    assert r is not None
    n_mamba, n_moe = cfg.layer_pattern.count("mamba"), cfg.layer_pattern.count("moe")
    return [
        ("mamba.in_proj", n_mamba, tokens, d, 2 * d_in),
        ("mamba.x_proj", n_mamba, tokens, d_in, r + 2 * n),
        ("mamba.dt_proj", n_mamba, tokens, r, d_in),
        ("mamba.out_proj", n_mamba, tokens, d_in, d),
        ("moe.router", n_moe, tokens, d, cfg.n_experts),
        ("moe.fc1", n_moe, tokens, d, 2 * cfg.d_ff),
        ("moe.fc2", n_moe, tokens, cfg.d_ff, d),
        ("head", 1, tokens, d, cfg.vocab_size),
    ]


def matmul_flops(cfg: BlackMambaConfig, tokens: int) -> float:
    return float(sum(2 * count * m * k * n for _, count, m, k, n in matmul_shapes(cfg, tokens)))


def matmul_rates(cfg: BlackMambaConfig, tokens: int, repeats: int = 5) -> dict[str, float]:
    """fp32 torch.matmul FLOP/s on the model's large GEMM shapes plus a square one (median per shape)."""
    d, d_in, f = cfg.d_model, cfg.d_inner, cfg.d_ff
    shapes = [
        (tokens, d, 2 * d_in),
        (tokens, d_in, d),
        (tokens, d, 2 * f),
        (tokens, f, d),
        (2048, 2048, 2048),
    ]
    gen = torch.Generator().manual_seed(0)
    rates: dict[str, float] = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        seconds = statistics.median(timed(lambda a=a, b=b: torch.matmul(a, b), warmup=2, repeats=repeats))
        rates[f"{m}x{k}x{n}"] = 2.0 * m * k * n / seconds
    return rates


# ----------------------------------------------------------------------------- measuring one shape


def measure_ours(plan: Plan, model: BlackMamba, ids: torch.Tensor, prompt: list[int]) -> Measured:
    fwd = timed(lambda: model(ids), warmup=1, repeats=plan.ours_repeats)
    log(f"{plan.key}: ours forward {[round(t, 3) for t in fwd]} s")
    prefill = statistics.median(timed(lambda: model(torch.tensor([prompt])), warmup=1, repeats=3))
    tps, produced = decode_rate(
        lambda p, n: ours_generate(model, p, n), prompt, plan.ours_new_tokens, plan.decode_repeats
    )
    log(f"{plan.key}: ours decode {tps:.1f} tokens/s over {produced} tokens")
    return Measured(n_params(model), statistics.median(fwd), fwd, prefill, tps, produced)


def measure_peer(plan: Plan, cfg: BlackMambaConfig, ids: torch.Tensor, prompt: list[int]) -> Measured:
    model = build_peer(cfg)
    log(f"{plan.key}: peer built, {n_params(model) / 1e6:.2f}M parameters")
    model(ids[:, : plan.peer_warmup_len], use_cache=False)  # warm-up
    fwd = timed(lambda: model(ids, use_cache=False), warmup=0, repeats=plan.peer_repeats)
    log(f"{plan.key}: peer forward {[round(t, 3) for t in fwd]} s")
    prefill = statistics.median(timed(lambda: model(torch.tensor([prompt]), use_cache=False), warmup=1, repeats=3))
    tps, produced = decode_rate(
        lambda p, n: peer_generate(model, p, n), prompt, plan.peer_new_tokens, plan.peer_decode_repeats
    )
    log(f"{plan.key}: peer decode {tps:.1f} tokens/s over {produced} tokens")
    return Measured(n_params(model), statistics.median(fwd), fwd, prefill, tps, produced)


def measure_errors(plan: Plan, model: BlackMamba, prompt: list[int]) -> tuple[float | None, float | None]:
    fwd_err = forward_error(model, random_ids(ERR_LEN, model.config.vocab_size, seed=3))
    dec_err = decode_error(model, prompt)
    log(f"{plan.key}: max rel err vs ref: forward {fwd_err}, decode {dec_err}")
    return fwd_err, dec_err


def bench_plan(plan: Plan, rate: float, skip_peer: bool) -> list[Row]:
    cfg = BlackMambaConfig.from_preset(plan.preset)
    ids = random_ids(FORWARD_LEN, cfg.vocab_size, seed=1)
    prompt = random_ids(PROMPT_LEN, cfg.vocab_size, seed=2)[0].tolist()
    with torch.inference_mode():
        model = build_ours(cfg)
        log(f"{plan.key}: ours built, {n_params(model) / 1e6:.2f}M parameters")
        fwd_err, dec_err = measure_errors(plan, model, prompt)
        ours = measure_ours(plan, model, ids, prompt)
        del model
        gc.collect()
        peer = None if skip_peer else measure_peer(plan, cfg, ids, prompt)
        gc.collect()
    if peer is not None:
        log(
            f"{plan.key}: parameters ours {ours.params:,}, peer {peer.params:,} ({peer.params / ours.params:.3f}x ours)"
        )
    flops = matmul_flops(cfg, FORWARD_LEN)
    common = {"params_ours": ours.params, "params_peer": None if peer is None else peer.params}
    forward = Row(
        "forward",
        f"{plan.key}/1x{FORWARD_LEN}",
        "s",
        ours.forward_s,
        None if peer is None else peer.forward_s,
        higher_is_better=False,
        floor=flops / rate,
        max_err=fwd_err,
        target=f"speedup >= {TARGET_FORWARD_SPEEDUP:g}x"
        if plan.key == "small"
        else f"time <= {TARGET_FLOOR_RATIO:g}x floor",
        extra={
            **common,
            "ours_all_s": ours.forward_all_s,
            "peer_all_s": None if peer is None else peer.forward_all_s,
            "matmul_flops": flops,
            "matmul_rate_flops_per_s": rate,
        },
    )
    decode = Row(
        "decode",
        f"{plan.key}/b1",
        "tokens/s",
        ours.decode_tps,
        None if peer is None else peer.decode_tps,
        higher_is_better=True,
        max_err=dec_err,
        target=f"speedup >= {TARGET_DECODE_SPEEDUP:g}x",
        extra={
            **common,
            "prompt_len": PROMPT_LEN,
            "new_tokens_ours": ours.decode_tokens,
            "new_tokens_peer": None if peer is None else peer.decode_tokens,
            "prefill_s_ours": ours.prefill_s,
            "prefill_s_peer": None if peer is None else peer.prefill_s,
        },
    )
    return [forward, decode]


# ----------------------------------------------------------------------------- profile


def profile_forward(preset: str, top: int = 15) -> str:
    """torch.profiler table of our forward at 1x2048 (top ops by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = BlackMambaConfig.from_preset(preset)
    ids = random_ids(FORWARD_LEN, cfg.vocab_size, seed=1)
    model = build_ours(cfg)
    with torch.inference_mode():
        model(ids)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# ----------------------------------------------------------------------------- report


def table_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = [
        "benchmark",
        "shape",
        "ours",
        f"peer ({PEER_NAME})",
        "speedup",
        "floor",
        "fraction of floor",
        "max err",
        "target",
        "met",
    ]
    body = []
    for r in rows:
        met = r.meets_target()
        body.append(
            [
                r.benchmark,
                r.shape,
                f"{fmt(r.ours)} {r.unit}",
                f"{fmt(r.peer_value)} {r.unit}" if r.peer_value is not None else "n/a",
                f"{fmt(r.speedup)}x" if r.speedup is not None else "n/a",
                f"{fmt(r.floor)} s" if r.floor is not None else "n/a",
                fmt(r.fraction_of_floor),
                fmt(r.max_err),
                r.target,
                "n/a" if met is None else ("yes" if met else "NO"),
            ]
        )
    return header, body


def wait_for_idle(max_wait_s: float, threshold: float = 0.1) -> float:
    """Wait (at most ``max_wait_s``) until other processes leave the CPU idle; returns the busy fraction."""
    deadline = time.perf_counter() + max_wait_s
    busy = cpu_busy()
    while busy > threshold and time.perf_counter() < deadline:
        log(f"CPU {busy:.0%} busy with other work; waiting")
        time.sleep(10)
        busy = cpu_busy()
    return busy


def environment() -> dict[str, Any]:
    try:
        import transformers

        tf_version: str | None = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def summary(rows: list[Row], meta: dict[str, Any]) -> str:
    """Lines printed above the table: parameter counts, matmul rate, load, run time."""
    lines = []
    for r in rows:
        if r.benchmark != "forward":
            continue
        ours, peer = r.extra["params_ours"], r.extra["params_peer"]
        ratio = "" if peer is None else f" ({peer / ours:.4f}x ours)"
        lines.append(f"{r.shape.split('/')[0]}: parameters ours {ours:,}, peer {peer or 0:,}{ratio}")
    best = max(meta["matmul_gflops"].values())
    lines.append(
        f"fp32 matmul rate {best:.1f} GFLOP/s (best shape); load average at start "
        f"{meta['load_average_start'][0]:.2f}, at end {meta['load_average_end'][0]:.2f}; "
        f"run took {meta['wall_s']:.0f} s"
    )
    busy = ", ".join(f"{k} {v:.0%}" for k, v in meta.get("cpu_busy_before", {}).items())
    lines.append(f"CPU busy with other processes just before each shape: {busy}")
    return "\n".join(lines) + "\n"


def write_results(rows: list[Row], meta: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cpu.json").write_text(json.dumps({**meta, "results": [r.to_json() for r in rows]}, indent=2) + "\n")
    env = meta["machine"]
    md = [
        "# CPU benchmark: blackmamba vs transformers JambaForCausalLM",
        "",
        f"{meta['date']}, {env['cpu']}, {env['cores']} cores, torch {env['torch']}, "
        f"transformers {env['transformers']}, python {env['python']}, run took {meta['wall_s']:.0f} s.",
        "Generated by `benchmarks/cpu.py`; forward in seconds (lower is better), decode in tokens/s "
        "(higher is better).",
        "",
        markdown_table(*table_cells(rows)),
        "",
    ]
    (out_dir / "cpu.md").write_text("\n".join(md))


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(PLANS), help="run one shape only")
    p.add_argument("--skip-1.5b", dest="skip_big", action="store_true", help="skip the 1.5B shape")
    p.add_argument("--skip-peer", action="store_true", help="do not build or time transformers' Jamba")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of our 1.5B forward")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each shape, wait up to this long for other processes to leave the CPU idle",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    keys = [args.only] if args.only else [k for k in PLANS if not (args.skip_big and k == "1.5b")]
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": environment(),
        "load_average_start": os.getloadavg(),
    }
    log(f"threads {torch.get_num_threads()}, shapes {keys}, load average {os.getloadavg()}")

    big = BlackMambaConfig.from_preset(PLANS["1.5b"].preset)
    first = matmul_rates(big, FORWARD_LEN)
    log("matmul GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in first.items()))

    rows: list[Row] = []
    meta["cpu_busy_before"] = {}
    for key in keys:
        busy = wait_for_idle(args.wait_idle)
        meta["cpu_busy_before"][key] = busy
        log(f"{key}: CPU {busy:.0%} busy before starting")
        # The floor is a lower bound, so the best rate seen so far is used (rows get it at the end).
        rows += bench_plan(PLANS[key], max(first.values()), args.skip_peer)
    rows.sort(key=lambda r: r.benchmark != "forward")  # stable: keeps the plan order within a benchmark

    second = matmul_rates(big, FORWARD_LEN)
    log("matmul GFLOP/s again: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in second.items()))
    rates = {k: max(first[k], second[k]) for k in first}
    rate = max(rates.values())
    for row in rows:
        if row.floor is not None:
            row.floor = row.extra["matmul_flops"] / rate
            row.extra["matmul_rate_flops_per_s"] = rate
    meta["matmul_gflops"] = {k: v / 1e9 for k, v in rates.items()}

    if args.profile:
        log("profiling our 1.5B forward")
        print(profile_forward(PLANS["1.5b"].preset), file=sys.stderr)

    meta["load_average_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - _START
    write_results(rows, meta, args.out)
    log(f"wrote {args.out / 'cpu.json'} and {args.out / 'cpu.md'}")
    print(summary(rows, meta))
    print(text_table(*table_cells(rows)))


if __name__ == "__main__":
    main()
