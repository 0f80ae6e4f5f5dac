"""A tiny model, a token array and a training loop that mirrors the trainer's step (AdamW, warmup + cosine,
clipping), run in one process or on every rank of a process group; used by the distributed tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blackmamba import BlackMamba, BlackMambaConfig
from blackmamba.training import dcp
from blackmamba.training.data import TokenData
from blackmamba.training.distributed import all_reduce_mean, clip_grad_norm_, rank_window_starts
from blackmamba.training.optim import build_optimizer, lr_at

STEPS, BATCH, SEQ_LEN, SEED = 20, 4, 16, 0
LR, MIN_LR, WARMUP, WEIGHT_DECAY, CLIP = 3e-3, 3e-4, 4, 0.1, 1.0
# (name, expert-parallel degree, FSDP) on 2 ranks.
SCENARIOS = (("fsdp", 1, True), ("ep2", 2, False), ("fsdp_ep2", 2, True))
SAVE_AT = 10


def config() -> BlackMambaConfig:
    """The tiny preset with the released 8 experts and both router losses on (they must stay global)."""
    return BlackMambaConfig.from_preset(
        "tiny", n_experts=8, d_model=32, d_ff=48, load_balance_weight=0.01, z_loss_weight=1e-3, initializer_range=0.1
    )


def build_model(seed: int = SEED) -> BlackMamba:
    torch.manual_seed(seed)
    return BlackMamba(config()).train()


class ArrayTokens(TokenData):
    """TokenData over an in-memory array (same windows and batches as the memory-mapped shards)."""

    def __init__(self, tokens: np.ndarray, vocab_size: int) -> None:
        self.tokens = tokens
        self.vocab_size = vocab_size


def token_data(n: int = 4096, seed: int = 1) -> ArrayTokens:
    """Tokens with structure to learn: most tokens follow a fixed successor."""
    vocab = config().vocab_size
    rng = np.random.default_rng(seed)
    succ = rng.permutation(vocab)
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    for i in range(1, n):
        out[i] = succ[out[i - 1]] if rng.random() < 0.8 else rng.integers(vocab)
    return ArrayTokens(out, vocab)


def expert_grads(model: BlackMamba) -> dict[str, torch.Tensor]:
    """The full gradients of every MoE's stacked expert weights (gathered from their shards)."""
    grads = {}
    for name, p in model.named_parameters():
        if name.endswith(("mixer.w1", "mixer.w2")):
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return grads


def train(
    model: BlackMamba,
    optimizer: torch.optim.Optimizer,
    data: ArrayTokens,
    start: int,
    stop: int,
    rank: int = 0,
    world: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Steps [start, stop) as the trainer runs them; returns the global loss per step and the expert
    gradients of the first step. One process uses torch's clipping, a group the mesh-aware one."""
    losses, grads = [], {}
    params = [p for p in model.parameters()]
    for step in range(start, stop):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, STEPS, LR, MIN_LR, WARMUP)
        starts = rank_window_starts(data, SEED, step, BATCH, SEQ_LEN, rank, world)
        x, y = data.batch(starts, SEQ_LEN)
        x, y = x.to(model.embedding.weight.device), y.to(model.embedding.weight.device)
        out = model(x)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
        objective = loss if out.aux_loss is None else loss + out.aux_loss
        objective.backward()
        if step == start:
            grads = expert_grads(model)
        if world == 1 and not torch.distributed.is_initialized():
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], CLIP)
        else:
            clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(all_reduce_mean(loss.detach()))
        if on_step is not None:
            on_step(step + 1)
    return losses, grads


def reference(run_dir: Path) -> dict:
    """One plain process: 20 steps, a checkpoint after step 10 (written without a process group)."""
    model = build_model()
    optimizer = build_optimizer(model, LR, WEIGHT_DECAY)

    def save(step: int) -> None:
        if step == SAVE_AT:
            dcp.save(run_dir / "single" / f"step-{step}", model, optimizer, {"step": step})

    losses, grads = train(model, optimizer, token_data(), 0, STEPS, on_step=save)
    return {"losses": losses, "grads": grads, "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )  # fmt: skip
