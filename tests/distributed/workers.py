"""Entry points of the processes the distributed tests start (torch.multiprocessing.spawn or torchrun)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from blackmamba.training import dcp
from blackmamba.training.distributed import ParallelDims, fail_fast, init_distributed, parallelize
from blackmamba.training.optim import build_optimizer

from . import harness as h


def parity(rank: int, world: int, port: int, run_dir: str) -> None:
    """Every scenario for 20 steps (checkpoint after step 10, export at the end), then a resume of the
    single-process checkpoint on this layout; rank 0 writes the results for the test to compare."""
    run = Path(run_dir)
    h.set_env(rank, world, port)
    with fail_fast():
        init_distributed("cpu", timeout_s=120)
        torch.set_num_threads(1)
        data = h.token_data()
        results: dict = {}
        saver = dist.new_group(backend="gloo")  # async saves talk on a group of their own
        for name, ep, fsdp in h.SCENARIOS:
            model, optimizer = _parallel_model(world, ep, fsdp)
            pending = []

            def save(step: int, model=model, optimizer=optimizer, name=name, pending=pending, ep=ep) -> None:
                if step == h.SAVE_AT:  # asynchronous for EP=2: finished one step later
                    target = run / name / f"step-{step}"
                    pending.append(dcp.save(target, model, optimizer, {"step": step}, async_save=ep > 1, group=saver))
                elif pending:
                    pending.pop().wait()

            losses, grads = h.train(model, optimizer, data, 0, h.STEPS, rank, world, on_step=save)
            results[name] = {"losses": losses, "grads": grads}
            if name == "fsdp_ep2":
                dcp.export_pretrained(model, run / "export")
        model, optimizer = _parallel_model(world, 2, True)
        state = dcp.load(run / "single" / f"step-{h.SAVE_AT}", model, optimizer)
        results["resumed"] = h.train(model, optimizer, data, state["step"], state["step"] + 2, rank, world)[0]
        if rank == 0:
            torch.save(results, run / "results.pt")
        dist.destroy_process_group()


def _parallel_model(world: int, ep: int, fsdp: bool):
    model = h.build_model()
    parallelize(model, ParallelDims(world, ep=ep, fsdp=fsdp).build_meshes("cpu"))
    return model, build_optimizer(model, h.LR, h.WEIGHT_DECAY)


def crash(mode: str, steps: int) -> None:
    """Under torchrun: train FSDP + EP=2; rank 1 dies at step 2 (``kill``: SIGKILL, ``raise``: an error)."""
    with fail_fast():
        env = init_distributed("cpu", timeout_s=30)
        torch.set_num_threads(1)
        model, optimizer = _parallel_model(env.world_size, 2, True)
        data = h.token_data()

        def die(step: int) -> None:
            if env.rank == 1 and step == 2:
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ValueError("injected failure at step 2")

        h.train(model, optimizer, data, 0, steps, env.rank, env.world_size, on_step=die)
        print(f"rank {env.rank} finished at {time.time():.0f}", flush=True)


def gpu_fsdp(out: str) -> None:
    """Under torchrun on GPUs: FSDP with bf16 compute and fp32 master weights against the plain trainer's
    recipe (fp32 weights, bf16 autocast) for 10 steps; rank 0 writes both loss curves and what it saw."""
    with fail_fast():
        env = init_distributed("cuda")
        data = h.token_data()
        plain = h.build_model().to(env.device)
        opt = build_optimizer(plain, h.LR, h.WEIGHT_DECAY)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want, _ = h.train(plain, opt, data, 0, 10, env.rank, env.world_size)
        model = h.build_model().to(env.device)
        parallelize(model, ParallelDims(env.world_size, fsdp=True).build_meshes("cuda"))
        optimizer = build_optimizer(model, h.LR, h.WEIGHT_DECAY)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, _ = h.train(model, optimizer, data, 0, 10, env.rank, env.world_size)
        a_log, w_in = model.layers[0].mixer.A_log, model.layers[0].mixer.in_proj.weight
        seen = {"a_log": f"{type(a_log).__name__} {a_log.dtype}", "in_proj": f"{type(w_in).__name__} {w_in.dtype}"}
        dcp.save(Path(out) / "ck", model, optimizer, {"step": 10})
        dcp.export_pretrained(model, Path(out) / "export")
        if env.rank == 0:
            torch.save({"want": want, "got": got, "seen": seen}, Path(out) / "gpu.pt")


if __name__ == "__main__":
    if sys.argv[1] == "gpu":
        gpu_fsdp(sys.argv[2])
    else:
        crash(sys.argv[1], int(sys.argv[2]))
