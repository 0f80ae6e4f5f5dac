"""Training throughput of blackmamba against Hugging Face transformers' ``JambaForCausalLM``.

Both models are built in one process with random weights and the same shapes (the peer's config comes
from ``benchmarks/cpu.py``: one Jamba layer = Mamba mixer + MoE FFN with 8 experts, top-1, no attention
layer, tied embeddings). One training step, identical for both:

    logits = model(ids)                              ids: (batch, seq_len) random token ids in [1, vocab)
    loss = cross_entropy(logits[:, :-1], ids[:, 1:])
    loss.backward(); AdamW.step(); zero_grad()

Each model runs in train mode: ours routes with Sinkhorn (the preset's default, the paper's training
routing) and, in a second row, with plain top-1 (``train_routing="top1"``). Two warm-up steps, then the
median of ``--repeats`` (5) timed steps; tokens/s = batch * seq_len / median step time. The peer gets one
warm-up and three timed steps by default (``--peer-warmup``, ``--peer-repeats``): on CPU its pure-PyTorch
Mamba path takes about 100 s per 8 x 256 step (its backward through a per-position Python loop over the
sequence), so five would add ten minutes for no information.

``max err`` checks that our fast path computes the right gradients: one step's gradients on a short
batch (``--err-batch`` x ``--err-len``) with the default backend against ``use_backend("ref")`` (the plain
sequential scan and expert loop), max over parameters of max |g_fast - g_ref| / max |g_ref|. The two
losses are printed and stored in the JSON.

On CUDA (``--device cuda --preset blackmamba-1.5b``) the rows also carry MFU = 6 * active parameters *
tokens/s / peak (784 TFLOP/s by default, ``--peak-tflops``); on CPU MFU is left out.

The table is printed last on stdout and written to ``benchmarks/results/train_<device>.json`` and
``.md`` (``train_cpu.*`` on CPU); progress goes to stderr.

    .venv/bin/python benchmarks/train_cpu.py                       # small preset, 8 x 256, with the peer
    .venv/bin/python benchmarks/train_cpu.py --batch 4 --seq-len 512 --skip-peer --profile
    .venv/bin/python benchmarks/train_cpu.py --device cuda --preset blackmamba-1.5b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmark this checkout of the package

from common import cpu_model, fmt, markdown_table, text_table  # noqa: E402

sys.path.insert(1, str(HERE))  # benchmarks/cpu.py, for the peer's config

from blackmamba import BlackMamba, BlackMambaConfig  # noqa: E402
from blackmamba.kernels import use_backend  # noqa: E402

RESULTS_DIR = HERE / "results"
PEER_NAME = "transformers JambaForCausalLM"
TARGET_SPEEDUP = 3.0  # ours tokens/s over the peer's, small preset on CPU
DEFAULT_PEAK_TFLOPS = 784.0
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- results


@dataclass
class Row:
    benchmark: str
    shape: str
    unit: str
    ours: float
    peer_value: float | None
    max_err: float | None = None
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return None if self.peer_value is None else self.ours / self.peer_value

    def met(self) -> bool | None:
        if not self.target or self.speedup is None:
            return None
        return self.speedup >= TARGET_SPEEDUP

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "shape": self.shape,
            "unit": self.unit,
            "ours": self.ours,
            "peer": PEER_NAME,
            "peer_value": self.peer_value,
            "floor": None,
            "fraction_of_floor": None,
            "speedup": self.speedup,
            "max_err": self.max_err,
            "target": self.target or None,
            "meets_target": self.met(),
            **self.extra,
        }


# ----------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_ids(batch: int, length: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    """Random token ids in [1, vocab) (never the all-zeros input), shape (batch, length)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=gen).to(device)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_ours(cfg: BlackMambaConfig, device: torch.device, seed: int = 0) -> BlackMamba:
    torch.manual_seed(seed)
    return BlackMamba(cfg).to(device).train()


def build_peer(cfg: BlackMambaConfig, device: torch.device, seed: int = 0) -> torch.nn.Module:
    try:
        from cpu import jamba_config
    except ImportError as e:
        raise SystemExit(f"error: cannot import jamba_config from benchmarks/cpu.py ({e})") from None
    from transformers import JambaForCausalLM

    jcfg = jamba_config(cfg)
    if "attention" in jcfg.layers_block_type:
        raise RuntimeError(f"the peer config has attention layers: {jcfg.layers_block_type}")
    torch.manual_seed(seed)
    model = JambaForCausalLM(jcfg)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the peer's head is not tied to its embedding")
    return model.to(device).train()


def ours_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def peer_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def make_step(
    model: torch.nn.Module, logits_fn: Callable, ids: torch.Tensor, autocast: Callable
) -> Callable[[], float]:
    """One training step (forward, next-token loss, backward, AdamW step, zero_grad); returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> float:
        with autocast():
            loss = next_token_loss(logits_fn(model, ids), ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def time_steps(
    step: Callable[[], float], device: torch.device, warmup: int, repeats: int, name: str = ""
) -> tuple[list[float], float]:
    """Wall times of ``repeats`` training steps after ``warmup`` untimed ones, and the last loss."""
    loss = float("nan")
    for i in range(warmup):
        start = time.perf_counter()
        loss = step()
        sync(device)
        if name:
            log(f"{name}: warm-up step {i + 1}/{warmup} {time.perf_counter() - start:.3f} s")
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        loss = step()  # float() of the loss already waits for the forward; sync covers the update
        sync(device)
        times.append(time.perf_counter() - start)
        if name:
            log(f"{name}: step {i + 1}/{repeats} {times[-1]:.3f} s, loss {loss:.4f}")
    return times, loss


def grad_error(cfg: BlackMambaConfig, device: torch.device, batch: int, length: int) -> dict[str, Any]:
    """One step's gradients and loss on the default (fast) backend and on the reference backend."""
    model = build_ours(cfg, device)
    ids = random_ids(batch, length, cfg.vocab_size, seed=7, device=device)
    results = {}
    for name, ctx in (("fast", nullcontext), ("ref", lambda: use_backend("ref"))):
        model.zero_grad(set_to_none=True)
        with ctx():
            out = model(ids)
            loss = next_token_loss(out.logits, ids)
            loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (float(loss), grads, out.expert_counts.detach().cpu().tolist())
    (loss_fast, g_fast, counts_fast), (loss_ref, g_ref, counts_ref) = results["fast"], results["ref"]
    if set(g_fast) != set(g_ref):
        raise RuntimeError(f"the backends give gradients for different parameters: {set(g_fast) ^ set(g_ref)}")
    worst, worst_name = 0.0, ""
    for n in g_ref:
        a, b = g_fast[n].double(), g_ref[n].double()
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.abs().max() > 0 else float(a.abs().max())
        if err > worst:
            worst, worst_name = err, n
    return {
        "grad_max_rel_err": worst,
        "grad_worst_param": worst_name,
        "loss_fast": loss_fast,
        "loss_ref": loss_ref,
        "same_routing": counts_fast == counts_ref,
        "err_shape": f"{batch}x{length}",
    }


# ----------------------------------------------------------------------------- profile


def profile_step(step: Callable[[], float], top: int) -> tuple[str, list[dict[str, Any]]]:
    """torch.profiler of one training step: the table of the top ops by self CPU time, and the same as rows."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    rows = [
        {
            "op": e.key,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "self_cpu_pct": 100 * e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ]
    return averages.table(sort_by="self_cpu_time_total", row_limit=top), rows


# ----------------------------------------------------------------------------- report


def table_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["benchmark", "shape", "ours", f"peer ({PEER_NAME})", "speedup", "max err", "target", "met"]
    body = []
    for r in rows:
        met = r.met()
        body.append(
            [
                r.benchmark,
                r.shape,
                f"{r.ours:,.0f} {r.unit}",
                "n/a" if r.peer_value is None else f"{r.peer_value:,.0f} {r.unit}",
                "n/a" if r.speedup is None else f"{r.speedup:.2f}x",
                fmt(r.max_err),
                r.target or "-",
                "n/a" if met is None else ("yes" if met else "NO"),
            ]
        )
    return header, body


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import transformers

        tf_version: str | None = transformers.__version__
    except ImportError:
        tf_version = None
    env = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def notes(rows: list[Row], meta: dict[str, Any]) -> list[str]:
    lines = []
    for r in rows:
        e = r.extra
        lines.append(
            f"{r.shape}: loss fast {e['loss_fast']:.6f}, ref {e['loss_ref']:.6f} on {e['err_shape']} "
            f"(same routing: {e['same_routing']}); worst gradient {e['grad_worst_param']}; "
            f"ours steps {[round(t, 3) for t in e['ours_step_s']]} s"
            + ("" if e.get("mfu") is None else f"; MFU {100 * e['mfu']:.1f}%")
        )
    peer_steps = meta.get("peer_step_s")
    if peer_steps:
        lines.append(f"peer steps {[round(t, 3) for t in peer_steps]} s, last loss {meta['peer_loss']:.4f}")
    lines.append(
        f"parameters: ours {meta['params_ours']:,} ({meta['active_params_ours']:,} active per token), "
        f"peer {meta['params_peer'] or 0:,}; peak RSS {meta['peak_rss_mib']:.0f} MiB; "
        f"load average {meta['load_average_start'][0]:.2f} -> {meta['load_average_end'][0]:.2f}; "
        f"run took {meta['wall_s']:.0f} s"
    )
    return lines


def write_results(rows: list[Row], meta: dict[str, Any], out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "results": [r.to_json() for r in rows]}
    tmp = out_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out_dir / f"{name}.json")
    env = meta["machine"]
    md = [
        "# Training throughput: blackmamba vs transformers JambaForCausalLM",
        "",
        f"{meta['date']}, {env['cpu']}, {env['cores']} cores, {env.get('gpu', 'no GPU')}, torch {env['torch']}, "
        f"transformers {env['transformers']}, python {env['python']}, run took {meta['wall_s']:.0f} s.",
        f"Generated by `benchmarks/train_cpu.py`: one step = forward + next-token cross-entropy + backward + "
        f"AdamW step, train mode, median of {meta['repeats']} steps after {meta['warmup']} warm-up steps (peer: "
        f"{meta['peer_repeats']} after {meta['peer_warmup']}: one of its steps takes minutes on CPU); "
        f"tokens/s = batch x seq_len / median step time (higher is better). max err = max relative error of "
        f"one step's gradients, default backend vs `use_backend('ref')`, on {meta['err_shape']}.",
        "",
        markdown_table(*table_cells(rows)),
        "",
        *[f"- {line}" for line in notes(rows, meta)],
        "",
    ]
    tmp = out_dir / f".{name}.md.tmp"
    tmp.write_text("\n".join(md))
    os.replace(tmp, out_dir / f"{name}.md")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="BlackMambaConfig preset (default small)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peer-warmup", type=int, default=1, help="peer warm-up steps (its CPU steps take minutes)")
    p.add_argument("--peer-repeats", type=int, default=3, help="timed peer steps")
    p.add_argument("--err-batch", type=int, default=2)
    p.add_argument("--err-len", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype (cuda)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="MFU denominator (cuda)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-peer", action="store_true", help="do not build or time transformers' Jamba")
    p.add_argument("--skip-top1", action="store_true", help="only the Sinkhorn-routed row")
    p.add_argument("--profile", action="store_true", help="torch.profiler of our training step (stderr + JSON)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    if args.batch < 1 or args.seq_len < 2 or args.repeats < 1 or args.peer_repeats < 1:
        raise SystemExit("error: need --batch >= 1, --seq-len >= 2, --repeats >= 1, --peer-repeats >= 1")
    use_bf16 = device.type == "cuda" and args.dtype == "bfloat16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    tokens = args.batch * args.seq_len
    shape = f"{args.preset}/{args.batch}x{args.seq_len}"
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": environment(device),
        "device": str(device),
        "dtype": args.dtype if device.type == "cuda" else "float32",
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "peer_warmup": args.peer_warmup,
        "peer_repeats": args.peer_repeats,
        "err_shape": f"{args.err_batch}x{args.err_len}",
        "load_average_start": os.getloadavg(),
    }
    log(f"device {device}, threads {torch.get_num_threads()}, {shape}, load average {os.getloadavg()}")

    variants = [("sinkhorn", {})] + ([] if args.skip_top1 else [("top1", {"train_routing": "top1"})])
    rows: list[Row] = []
    profile_rows: list[dict[str, Any]] | None = None
    for routing, overrides in variants:
        cfg = BlackMambaConfig.from_preset(args.preset, **overrides)
        err = grad_error(cfg, device, args.err_batch, args.err_len)
        log(
            f"{routing}: gradient max rel err vs ref {err['grad_max_rel_err']:.3g} ({err['grad_worst_param']}), "
            f"loss fast {err['loss_fast']:.6f} ref {err['loss_ref']:.6f}"
        )
        model = build_ours(cfg, device)
        meta["params_ours"] = model.num_parameters()
        meta["active_params_ours"] = model.num_parameters(active=True)
        ids = random_ids(args.batch, args.seq_len, cfg.vocab_size, seed=1, device=device)
        step = make_step(model, ours_logits, ids, autocast)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, loss = time_steps(step, device, args.warmup, args.repeats, name=routing)
        median = statistics.median(times)
        log(f"{routing}: ours steps {[round(t, 3) for t in times]} s -> {tokens / median:,.0f} tokens/s")
        extra: dict[str, Any] = {
            "routing": routing,
            "ours_step_s": times,
            "ours_loss_last": loss,
            **err,
            "peak_rss_mib_after": peak_rss_mib(),
        }
        if device.type == "cuda":
            extra["mfu"] = 6 * meta["active_params_ours"] * tokens / median / (args.peak_tflops * 1e12)
            extra["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if args.profile and routing == "sinkhorn":
            table, profile_rows = profile_step(step, top=20)
            print(f"torch.profiler, one training step of ours ({shape}, {routing}):\n{table}", file=sys.stderr)
        rows.append(
            Row(
                "train_step",
                f"{shape} {routing}",
                "tokens/s",
                tokens / median,
                None,
                max_err=err["grad_max_rel_err"],
                target=f"speedup >= {TARGET_SPEEDUP:g}x" if args.preset == "small" and device.type == "cpu" else "",
                extra=extra,
            )
        )
        del model, step
        gc.collect()

    meta["params_peer"] = None
    if not args.skip_peer:
        cfg = BlackMambaConfig.from_preset(args.preset)
        peer = build_peer(cfg, device)
        meta["params_peer"] = sum(p.numel() for p in peer.parameters())
        log(f"peer built, {meta['params_peer'] / 1e6:.2f}M parameters")
        ids = random_ids(args.batch, args.seq_len, cfg.vocab_size, seed=1, device=device)
        step = make_step(peer, peer_logits, ids, autocast)
        times, loss = time_steps(step, device, args.peer_warmup, args.peer_repeats, name="peer")
        median = statistics.median(times)
        log(f"peer steps {[round(t, 3) for t in times]} s -> {tokens / median:,.0f} tokens/s")
        meta["peer_step_s"], meta["peer_loss"] = times, loss
        for row in rows:
            row.peer_value = tokens / median
        del peer, step
        gc.collect()

    if profile_rows is not None:
        meta["profile_top_ops"] = profile_rows
    meta["peak_rss_mib"] = peak_rss_mib()
    meta["load_average_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - _START
    name = f"train_{device.type}"
    write_results(rows, meta, args.out, name)
    log(f"wrote {args.out / (name + '.json')} and {args.out / (name + '.md')}")
    print("\n".join(notes(rows, meta)) + "\n")
    print(text_table(*table_cells(rows)))


if __name__ == "__main__":
    main()
