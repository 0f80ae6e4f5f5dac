"""The demo behind ``make demo`` (until training lands): build the ``small`` preset with a BPE tokenizer
trained on Shakespeare, save it, reload it, check the reloaded logits are identical, and generate.
The model is untrained, so its text is noise; the point is to show each stage working end to end."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .checkpoint import checkpoint_size, load_pretrained, save_pretrained
from .config import BlackMambaConfig
from .corpora import shakespeare_texts
from .generation import stream_generate
from .model import BlackMamba
from .tokenizer import train_bpe


def _step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def run_demo(out_dir: str = "runs/demo", prompt: str = "ROMEO:", max_new_tokens: int = 48, seed: int = 0) -> None:
    torch.manual_seed(seed)
    config = BlackMambaConfig.from_preset("small")

    _step(1, f"training a byte-level BPE tokenizer ({config.vocab_size} tokens) on Shakespeare's plays")
    t0 = time.perf_counter()
    tokenizer = train_bpe(shakespeare_texts(), config.vocab_size)
    print(
        f"    {tokenizer.get_vocab_size()} tokens in {time.perf_counter() - t0:.1f} s; "
        f"{prompt!r} -> {tokenizer.encode(prompt).ids}"
    )

    _step(2, "building the 'small' preset with random weights")
    model = BlackMamba(config).eval()
    pattern = ", ".join(config.layer_pattern)
    print(f"    blocks: [{pattern}]")
    print(f"    parameters: {model.num_parameters():,} total, {model.num_parameters(active=True):,} active per token")

    out = Path(out_dir) / "model"
    _step(3, f"saving to {out} (config.json + model.safetensors + tokenizer.json, written atomically)")
    save_pretrained(model, out, tokenizer=tokenizer)
    for f in sorted(out.iterdir()):
        print(f"    {f.name:<20} {f.stat().st_size:>12,} bytes")
    print(f"    total {checkpoint_size(out) / 2**20:.1f} MiB")

    _step(4, "reloading and comparing logits with the in-memory model")
    reloaded = load_pretrained(out)
    ids = torch.tensor([tokenizer.encode("Now is the winter of our discontent").ids])
    with torch.inference_mode():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    print(f"    max |logit difference| = {diff:.3g} ({'identical' if diff == 0 else 'DIFFERENT'})")
    if diff != 0:
        raise RuntimeError("the reloaded model differs from the saved one")

    _step(5, f"generating {max_new_tokens} tokens after {prompt!r} (untrained model: expect noise)")
    prompt_ids = tokenizer.encode(prompt).ids
    new: list[int] = []
    t0 = time.perf_counter()
    print("    " + prompt, end="", flush=True)
    for step in stream_generate(reloaded, [prompt_ids], max_new_tokens, temperature=0.8, top_k=50, seed=seed):
        if step[0] is None:
            break
        new.append(step[0])
        print(tokenizer.decode([step[0]]), end="", flush=True)
    elapsed = time.perf_counter() - t0
    print(f"\n    {len(new)} tokens in {elapsed:.2f} s ({len(new) / elapsed:.0f} tokens/s, prefill included)")
    print("\nDone. Try: blackmamba generate --model", out, "--prompt 'ROMEO:' --stream")
