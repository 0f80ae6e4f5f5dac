"""The trainer under torchrun (2 gloo ranks on the CPU), through the real command line: FSDP and expert
parallelism give the losses of one process; checkpoints move between 1 and 2 ranks and between layouts
with the same next losses; only rank 0 writes the run's files; a failing rank ends the job with its rank
named. Each torchrun launch costs start-up time on a 2-core machine, so the runs are shared (module
fixtures) and short: 6 steps of the tiny preset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blackmamba import cli, load_pretrained
from blackmamba.training.data import TokenData
from blackmamba.training.trainer import TrainArgs, build_model, train

from .helpers import losses, metric_rows

pytestmark = pytest.mark.torchrun

ROOT = Path(__file__).resolve().parents[2]
# fp32 on CPU: the ranks add the same numbers in another order (each rank's share of the batch, gradients
# reduced over ranks), so the losses differ from one process by rounding only. Measured: at most 5e-7.
LOSS_ATOL = 1e-5
# Start-up of three Python processes on a busy 2-core machine, then a failure at step 2.
FAIL_BOUND_S = 150

RUN = dict(
    preset="tiny", max_steps=6, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup=2, eval_every=3,
    eval_tokens=2048, save_every=3, keep_last=3, log_every=1, progress=False, plots=False, device="cpu",
)  # fmt: skip


def _flags(**options) -> list[str]:
    out = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + name.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def _torchrun(*argv: str, module: str = "blackmamba", timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", "-m", module, *argv]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _train_on_two(data_dir: Path, out: Path, *extra: str, **options) -> subprocess.CompletedProcess:
    argv = ["--threads", "1", "train", "--data", str(data_dir), "--out", str(out), *_flags(**{**RUN, **options})]
    done = _torchrun(*argv, *extra)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _curve(run: Path) -> list[tuple[int, str, float]]:
    """(step, kind, value) of every training and validation loss, in file order."""
    return [(r["step"], k, r[k]) for r in metric_rows(run) for k in ("loss", "val_loss") if k in r]


def _assert_same_curve(got: list, want: list) -> None:
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in want]
    torch.testing.assert_close(torch.tensor([v for *_, v in got]), torch.tensor([v for *_, v in want]),
                               rtol=0, atol=LOSS_ATOL)  # fmt: skip


def _cut_after(run: Path, step: int, to: Path) -> Path:
    """A copy of ``run`` as a run interrupted right after its checkpoint at ``step``."""
    shutil.copytree(run, to)
    for ckpt in (to / "checkpoints").iterdir():
        if int(ckpt.name.removeprefix("step-")) > step:
            shutil.rmtree(ckpt)
    return to


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """The reference runs in this process: the shared settings, and with 2 micro-batches per step."""
    root = tmp_path_factory.mktemp("one")
    train(TrainArgs(data=str(data_dir), out=str(root / "plain"), **RUN))
    train(TrainArgs(data=str(data_dir), out=str(root / "accum"), **{**RUN, "grad_accum": 2}))
    return root


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    done = _train_on_two(data_dir, out, fsdp=True)
    return out, done


@pytest.fixture(scope="module")
def ep_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep") / "run"
    _train_on_two(data_dir, out, expert_parallel=2, grad_checkpointing=True, grad_accum=2)
    return out


def test_fsdp_gives_the_losses_of_one_process(one_process, fsdp_run):
    run, done = fsdp_run
    want = _curve(one_process / "plain")
    assert want[-2][2] < want[0][2] - 0.3  # the run learns, so the comparison covers real updates
    _assert_same_curve(_curve(run), want)
    plain, parallel = metric_rows(one_process / "plain"), metric_rows(run)
    for a, b in zip(plain, parallel, strict=True):  # expert load is global (the routing sees every rank)
        if "expert_load" in a:
            torch.testing.assert_close(torch.tensor(b["expert_load"]), torch.tensor(a["expert_load"]))


def test_only_rank_zero_writes_and_prints(fsdp_run):
    run, done = fsdp_run
    steps = [s for s, _ in losses(run)]
    assert steps == list(range(1, 7))  # one row per step: rank 1 wrote none
    summary = json.loads(done.stdout)  # exactly one JSON summary on stdout
    assert summary["step"] == 6 and summary["model"] == str(run / "model")
    assert json.loads((run / "summary.json").read_text())["step"] == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert (run / "checkpoints" / "step-00000006" / "dcp_state.json").is_file()  # a distributed checkpoint


def test_export_is_the_one_process_model(one_process, fsdp_run):
    run, _ = fsdp_run
    want = load_pretrained(one_process / "plain" / "checkpoints" / "step-00000006", dtype=torch.float32)
    got = load_pretrained(run / "model", dtype=torch.float32)
    assert (run / "model" / "tokenizer.json").is_file()
    for (name, a), b in zip(want.state_dict().items(), got.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)


def test_expert_parallel_with_checkpointing_and_accumulation_gives_the_losses_of_one_process(one_process, ep_run):
    _assert_same_curve(_curve(ep_run), _curve(one_process / "accum"))


@pytest.mark.parametrize("which", ["fsdp", "ep"])
def test_two_rank_checkpoint_resumes_in_one_process(fsdp_run, ep_run, tmp_path, which, data_dir):
    run = fsdp_run[0] if which == "fsdp" else ep_run
    extra = {} if which == "fsdp" else {"grad_accum": 2}
    cut = _cut_after(run, 3, tmp_path / "run")
    argv = ["--threads", "1", "train", "--data", str(data_dir), "--out", str(cut), "--resume"]
    assert cli.main(argv + _flags(**{**RUN, **extra})) == 0
    _assert_same_curve(_curve(cut), _curve(run))
    assert (cut / "checkpoints" / "step-00000006" / "trainer_state.pt").is_file()  # one process: its own format


def test_one_process_checkpoint_resumes_on_two_ranks_with_experts_split(one_process, data_dir, tmp_path):
    cut = _cut_after(one_process / "plain", 3, tmp_path / "run")
    _train_on_two(data_dir, cut, "--resume", fsdp=True, expert_parallel=2)
    _assert_same_curve(_curve(cut), _curve(one_process / "plain"))


def test_expert_parallel_checkpoint_resumes_on_another_layout(ep_run, data_dir, tmp_path):
    cut = _cut_after(ep_run, 3, tmp_path / "run")
    _train_on_two(data_dir, cut, "--resume", fsdp=True, grad_accum=2)  # expert-parallel 2 -> 1
    _assert_same_curve(_curve(cut), _curve(ep_run))


def test_init_from_reads_a_distributed_checkpoint(fsdp_run, data_dir, tmp_path):
    run, _ = fsdp_run
    checkpoint = run / "checkpoints" / "step-00000006"
    args = TrainArgs(data=str(data_dir), out=str(tmp_path / "new"), init_from=str(checkpoint), max_steps=1)
    model, _ = build_model(args, TokenData(data_dir, "train").vocab_size)
    want = load_pretrained(run / "model", dtype=torch.float32)
    for (name, a), b in zip(want.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_failing_rank_ends_the_job_naming_itself(data_dir, tmp_path):
    argv = ["2", "--threads", "1", "train", "--data", str(data_dir), "--out", str(tmp_path / "run"), *_flags(**RUN)]
    t0 = time.monotonic()
    done = _torchrun(*argv, module="tests.distributed.cli_fault", timeout=FAIL_BOUND_S + 60)
    assert done.returncode != 0
    assert time.monotonic() - t0 < FAIL_BOUND_S
    assert "error: rank 1 of 2 failed with ValueError: injected failure at step 2" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_rank_zero_refusing_the_folder_stops_every_rank(data_dir, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    argv = ["--threads", "1", "train", "--data", str(data_dir), "--out", str(out), *_flags(**RUN)]
    done = _torchrun(*argv, timeout=FAIL_BOUND_S)
    assert done.returncode != 0
    assert f"error: rank 0 of 2: --out {out} is not empty and is not a training run" in done.stderr, done.stderr[-3000:]
    assert "error: rank 1 of 2: stopping because rank 0 failed" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
