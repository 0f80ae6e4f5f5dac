"""Serving under load: throughput and latency of `blackmamba serve`, in the manner of vLLM's `bench serve`.

The server runs as its own process (`python -m blackmamba serve`, on a random-weight model of the chosen
preset saved to a temporary folder, or on --model DIR); this process is the load generator and talks to it
over loopback with streamed /v1/completions requests (token-id prompts of --input-len random ids,
--output-len new tokens, greedy, EOS ignored).

  load     at each --concurrency C (1, 16, 64, 256 by default) --num-prompts requests, at most C in flight,
           arriving all at once or as a Poisson process at --request-rate; reports request/s, output
           tokens/s and the p50/p99 of time to first token (TTFT), inter-token latency (ITL, the gaps
           between streamed chunks) and end-to-end latency (E2E)
  offline  the same work through `blackmamba.generate` at batch 64 in this process (the peer of the
           concurrency-64 throughput; target: the server reaches 85% of it)
  prefix   TTFT of a --prefix-len-token prompt whose first --cached tokens were sent before (the prompt
           cache) against one that shares nothing (target: at least 3x lower)

    python -m benchmarks.serve [--preset blackmamba-2.8b] [--concurrency 1 16 64 256]   (on the GPU machine)
    python -m benchmarks.serve --preset tiny --device cpu --concurrency 1 4 --num-prompts 8 --quick  (smoke)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from blackmamba import BlackMambaConfig, generate, load_pretrained, save_pretrained
from blackmamba.devices import resolve_device, resolve_dtype
from blackmamba.tokenizer import train_bpe

from .harness import (
    RESULTS_DIR,
    Row,
    argument_parser,
    build_model,
    fmt,
    log,
    markdown_table,
    meta_line,
    run_meta,
    text_table,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
PROMPT_VOCAB = 250  # token ids the prompts draw from (all within the small tokenizer saved with the model)


@dataclass
class Sample:
    """One request as the client saw it (seconds on this process's clock)."""

    start: float
    first: float | None = None
    end: float | None = None
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_random_model(preset: str, device: torch.device, folder: Path) -> Path:
    """A random-weight model of ``preset`` (bf16 on a GPU) with a small BPE (the prompts are token ids; the
    tokenizer only turns the output into text)."""
    words = [f"w{i}" for i in range(300)]
    rng = random.Random(0)
    tokenizer = train_bpe([" ".join(rng.choice(words) for _ in range(30)) for _ in range(400)], 512)
    size = tokenizer.get_vocab_size()
    vocab = max(BlackMambaConfig.from_preset(preset).vocab_size, size)  # the tiny preset's 256 is too small
    config = BlackMambaConfig.from_preset(preset, vocab_size=vocab, tokenizer_vocab_size=size)
    model = build_model(config, device, torch.bfloat16 if device.type == "cuda" else None)
    return save_pretrained(model, folder / preset, tokenizer=tokenizer)


def start_server(model_dir: Path, args, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "blackmamba", "serve", "--model", str(model_dir), "--port", str(port),
           "--device", args.device, "--dtype", args.dtype, "--max-batch", str(max_batch),
           "--max-model-len", str(max(args.input_len, args.prefix_len) + args.output_len + 8),
           "--prompt-cache-interval", str(args.cache_interval), "--log-level", "warning"]  # fmt: skip
    for flag in ("max_num_batched_tokens", "max_prefill_batch"):
        if getattr(args, flag) is not None:
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become healthy in 900 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> Sample:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sample = Sample(time.perf_counter())
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return sample
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    sample.error = chunk["error"]["message"]
                elif chunk.get("usage"):
                    sample.tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    sample.first = sample.first or now
                    sample.chunks.append(now)
    except httpx.HTTPError as e:
        sample.error = f"{type(e).__name__}: {e}"
    sample.end = time.perf_counter()
    return sample


async def run_load(url: str, prompts: list[list[int]], max_tokens: int, concurrency: int, rate: float,
                   seed: int) -> tuple[list[Sample], float]:  # fmt: skip
    """All ``prompts``, at most ``concurrency`` in flight, arriving at Poisson ``rate`` (inf: at once)."""
    gate = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:

        async def gated(prompt: list[int]) -> Sample:
            async with gate:
                return await one_request(client, url, prompt, max_tokens)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(gated(prompt)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        samples = await asyncio.gather(*tasks)
    return samples, time.perf_counter() - start


def summarise(samples: list[Sample], duration: float) -> dict[str, float]:
    ok = [s for s in samples if s.error is None and s.first is not None]
    errors = [s.error for s in samples if s.error is not None]
    if errors:
        log(f"{len(errors)} requests failed, e.g. {errors[0]}")
    itl = [b - a for s in ok for a, b in zip(s.chunks, s.chunks[1:], strict=False)]
    ttft = [s.first - s.start for s in ok]
    e2e = [s.end - s.start for s in ok]
    return {
        "requests": len(ok),
        "failed": len(errors),
        "duration_s": duration,
        "request_per_s": len(ok) / duration,
        "output_tok_per_s": sum(s.tokens for s in ok) / duration,
        **{f"ttft_p{q}_ms": 1e3 * percentile(ttft, q) for q in (50, 99)},
        **{f"itl_p{q}_ms": 1e3 * percentile(itl, q) for q in (50, 99)},
        **{f"e2e_p{q}_ms": 1e3 * percentile(e2e, q) for q in (50, 99)},
    }


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, PROMPT_VOCAB, (n, length), generator=g).tolist()


def offline_rate(model_dir: Path, args, batch: int) -> float:
    """Output tokens/s of offline batched generation of the same work (prefill included), best of two."""
    device = resolve_device(args.device)
    model = load_pretrained(model_dir, device=device, dtype=resolve_dtype(args.dtype, device))
    prompts = random_prompts(batch, args.input_len, seed=99)
    best = 0.0
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, prompts, args.output_len)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, sum(len(o) for o in out) / (time.perf_counter() - start))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return best


def prefix_ttft(url: str, args) -> tuple[float, float]:
    """Median TTFT (ms) of --prefix-len-token prompts, uncached and with the first --cached tokens sent before."""

    async def run() -> tuple[list[float], list[float]]:
        async with httpx.AsyncClient(timeout=600) as client:
            cold, warm = [], []
            for i in range(args.prefix_trials):
                fresh = random_prompts(1, args.prefix_len, seed=1000 + i)[0]
                s = await one_request(client, url, fresh, 1)
                cold.append(s.first - s.start)
                shared = random_prompts(1, args.prefix_len, seed=2000 + i)[0]
                await one_request(client, url, shared[: args.cached], 1)  # the earlier conversation
                s = await one_request(client, url, shared, 1)
                warm.append(s.first - s.start)
            return cold, warm

    cold, warm = asyncio.run(run())
    return 1e3 * statistics.median(cold), 1e3 * statistics.median(warm)


def main(argv: list[str] | None = None) -> None:
    p = argument_parser(__spec__, __doc__)
    p.add_argument("--preset", default="blackmamba-2.8b", help="random-weight model shape (default 2.8B)")
    p.add_argument("--model", help="serve this checkpoint instead of a random-weight preset")
    p.add_argument("--device", default="auto", help="the server's device (auto, cpu, cuda)")
    p.add_argument("--dtype", default="auto", help="the server's dtype (auto: bf16 on GPU)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256], help="concurrency levels")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per level (default 4 x C, >= 16)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="new tokens per request")
    p.add_argument("--prefix-len", type=int, default=1000, help="prompt tokens of the cached-prefix TTFT test")
    p.add_argument("--cached", type=int, default=900, help="of those, tokens shared with an earlier prompt")
    p.add_argument("--prefix-trials", type=int, default=5, help="repeats of the cached-prefix TTFT test")
    p.add_argument("--cache-interval", type=int, default=256, help="the server's --prompt-cache-interval")
    p.add_argument("--offline-batch", type=int, default=64, help="batch of the offline peer (0: skip it)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="the server's token budget per step")
    p.add_argument("--max-prefill-batch", type=int, default=None, help="the server's prompts per prefill forward")
    p.add_argument("--quick", action="store_true", help="short run: no results file unless --out is given")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default results/serve.json)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    meta = run_meta(device, preset=args.model or args.preset, input_len=args.input_len, output_len=args.output_len,
                    request_rate=args.request_rate, max_num_batched_tokens=args.max_num_batched_tokens,
                    max_prefill_batch=args.max_prefill_batch)  # fmt: skip
    rows: list[Row] = []
    table: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            log(f"saving a random {args.preset} model")
            model_dir = save_random_model(args.preset, device, Path(tmp))
        offline = None
        if args.offline_batch:
            log(f"offline generate at batch {args.offline_batch}")
            offline = offline_rate(model_dir, args, args.offline_batch)
        proc, url = start_server(model_dir, args, max(args.concurrency))
        try:
            for c in args.concurrency:
                n = args.num_prompts or max(16, 4 * c)
                asyncio.run(run_load(url, random_prompts(min(c, 4), 16, seed=7), 4, c, float("inf"), 0))  # warm-up
                samples, duration = asyncio.run(
                    run_load(url, random_prompts(n, args.input_len, seed=c), args.output_len, c, args.request_rate, c)
                )
                s = summarise(samples, duration)
                log(f"concurrency {c}: {s['output_tok_per_s']:.0f} output tok/s, TTFT p50 {s['ttft_p50_ms']:.1f} ms")
                shape = f"c={c} in={args.input_len} out={args.output_len}"
                peer = offline if c == args.offline_batch else None
                rows.append(Row("serve output tokens/s", shape, "tok/s", s["output_tok_per_s"],
                                None if peer is None else f"offline generate b{c}", peer, extra=s))  # fmt: skip
                for name in ("ttft", "itl", "e2e"):
                    rows.append(Row(f"serve {name} p50", shape, "ms", s[f"{name}_p50_ms"],
                                    extra={"p99_ms": s[f"{name}_p99_ms"]}))  # fmt: skip
                table.append([str(c), fmt(s["request_per_s"]), fmt(s["output_tok_per_s"]), fmt(peer),
                              *(f"{fmt(s[f'{m}_p50_ms'])} / {fmt(s[f'{m}_p99_ms'])}" for m in ("ttft", "itl", "e2e")),
                              str(s["failed"])])  # fmt: skip
            cold, warm = prefix_ttft(url, args)
            rows.append(Row("serve TTFT with cached prefix", f"{args.prefix_len} tokens, {args.cached} cached", "ms",
                            warm, "uncached", cold))  # fmt: skip
        finally:
            stop_server(proc)
    header = ["C", "req/s", "out tok/s", "offline tok/s", "TTFT p50/p99 ms", "ITL p50/p99 ms", "E2E p50/p99 ms",
              "failed"]  # fmt: skip
    print(meta_line(meta))
    print(text_table(header, table))
    print(f"TTFT of a {args.prefix_len}-token prompt: {cold:.1f} ms uncached, {warm:.1f} ms with {args.cached} "
          f"tokens cached ({cold / warm:.2f}x)")  # fmt: skip
    out = args.out or (None if args.quick else RESULTS_DIR / "serve.json")
    if out is not None:
        markdown = markdown_table(header, table)
        write_results(out, meta, rows, markdown)
        log(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
