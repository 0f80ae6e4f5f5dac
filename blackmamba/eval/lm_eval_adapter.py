"""lm-evaluation-harness model ``blackmamba``: ``lm_eval --model blackmamba --model_args pretrained=DIR``.

Importing this module registers the model (lm-eval finds models only through its registry). Requests are
scored in batches sorted longest first, left-padded with a mask (exact for this model), and returned in
their original order; every request is scored the same way whatever the batch size.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..checkpoint import load_pretrained
from ..devices import resolve_device, resolve_dtype
from ..generation import stream_generate
from ..model import BlackMamba
from ..tokenizer import eos_token_id, load_tokenizer
from .perplexity import DEFAULT_CHUNK, document_logprob, encode_pair
from .progress import PROGRESS_EVERY_S, Progress


def pick_device(name: str | torch.device | None) -> torch.device:
    """:func:`blackmamba.devices.resolve_device`, but lm-eval's command line asks for cuda by default: on a
    machine without a GPU, warn and use the CPU."""
    return resolve_device(name, cpu_fallback=True)


pick_dtype = resolve_dtype


@register_model("blackmamba")
class BlackMambaLM(LM):
    """A BlackMamba checkpoint as an lm-eval ``LM`` (loglikelihood, rolling loglikelihood, greedy generation).

    While it scores, progress goes to stderr: a bar on a terminal, a line every ``progress_every`` seconds
    otherwise."""

    progress_every: float = PROGRESS_EVERY_S

    def __init__(
        self,
        pretrained: str | None = None,
        batch_size: int | str = 8,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        max_length: int = 2048,
        chunk: int = DEFAULT_CHUNK,
        model: BlackMamba | None = None,
        tokenizer=None,
        **_ignored,
    ) -> None:
        super().__init__()
        unknown = sorted(set(_ignored) - {"max_batch_size"})
        if unknown:
            warnings.warn(f"blackmamba: ignoring unknown model_args {unknown}", stacklevel=2)
        if model is None:
            if pretrained is None:
                raise ValueError("blackmamba: give pretrained=DIR in --model_args")
            dev = pick_device(device)
            model = load_pretrained(pretrained, device=dev, dtype=pick_dtype(dtype, dev))
        if tokenizer is None:
            if pretrained is None:
                raise ValueError("blackmamba: a model given as an object needs its tokenizer too")
            tokenizer = load_tokenizer(pretrained, model.config.vocab_size)
        if tokenizer.get_vocab_size() > model.config.vocab_size:
            raise ValueError(
                f"blackmamba: the tokenizer has {tokenizer.get_vocab_size()} ids but the model's vocabulary only "
                f"{model.config.vocab_size}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        eos = eos_token_id(tokenizer)
        self.eot_token_id = 0 if eos is None else eos
        self.eot_text = tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        bs = str(batch_size)
        if bs.startswith("auto"):
            bs = "8"  # no memory probing: a fixed, reproducible batch size
        self.batch_size = max(int(bs), 1)
        self.max_length = int(max_length)
        self.chunk = int(chunk)

    # ------------------------------------------------------------------ tokens

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def tokenizer_name(self) -> str:
        return "blackmamba"

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def _score_batch(self, items: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of continuation log-probs, continuation is greedy)."""
        inputs = []
        clipped = []
        for ctx, cont in items:
            whole = (ctx + cont)[-(self.max_length + 1) :]
            inputs.append(whole[:-1])
            clipped.append((ctx, cont[-len(whole) + 1 :]))  # a continuation longer than max_length: its tail
        items = clipped
        length = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), length), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), length), dtype=torch.bool)
        for i, x in enumerate(inputs):
            ids[i, length - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask[i, length - len(x) :] = True
        device = self.model.device
        ids = ids.to(device)
        n_last = max(len(cont) for _, cont in items)
        out = self.model(ids, mask=None if bool(mask.all()) else mask.to(device), num_last_tokens=n_last)
        logp = F.log_softmax(out.logits.float(), dim=-1)
        results = []
        for i, (_, cont) in enumerate(items):
            row = logp[i, n_last - len(cont) :]
            target = torch.tensor(cont, dtype=torch.long, device=device)
            value = row.gather(-1, target[:, None]).double().sum().item()
            results.append((value, bool((row.argmax(-1) == target).all())))
        return results

    def _loglikelihood_tokens(
        self, items: list[tuple[list[int], list[int]]], desc: str = "loglikelihood", disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        # Longest first (ties broken by the tokens themselves), so the order never depends on the input order.
        order = sorted(range(len(items)), key=lambda i: (-len(items[i][0]) - len(items[i][1]), items[i], i))
        results: list[tuple[float, bool] | None] = [None] * len(items)
        with Progress(len(items), desc, every=self.progress_every, enabled=not disable_tqdm) as progress:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for i, r in zip(batch, self._score_batch([items[i] for i in batch]), strict=True):
                    results[i] = r
                progress.update(len(batch), tokens=sum(len(items[i][0]) + len(items[i][1]) for i in batch))
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        items = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, cont = encode_pair(self.tok_encode, context, continuation, self.eot_token_id)
            if not cont:
                raise ValueError(f"blackmamba: the continuation {continuation!r} encodes to no tokens")
            items.append((ctx, cont))
        results = self._loglikelihood_tokens(items, disable_tqdm=disable_tqdm)
        for req, r in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Exact log-likelihood of each whole document (from the end-of-text token), computed with the
        recurrent cache in chunks; no windows are needed for a state-space model."""
        results = []
        with Progress(
            len(requests), "loglikelihood_rolling", every=self.progress_every, enabled=not disable_tqdm
        ) as progress:
            for req in requests:
                tokens = self.tok_encode(req.args[0])
                value = document_logprob(
                    self.model, tokens, self.eot_token_id, self.chunk, on_chunk=lambda n: progress.update(0, tokens=n)
                ).logprob
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
                results.append(value)
                progress.update(1)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut before the first stop string."""
        results = []
        progress = Progress(len(requests), "generate_until", every=self.progress_every, enabled=not disable_tqdm)
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.pop("until", None) or [self.eot_text]
            if isinstance(until, str):
                until = [until]
            max_gen = int(kwargs.pop("max_gen_toks", 256))
            ids = self.tok_encode(context) or [self.eot_token_id]
            ids = ids[-max(self.max_length - max_gen, 1) :]
            new: list[int] = []
            text = ""
            for step in stream_generate(self.model, [ids], max_gen, eos_token_id=self.eot_token_id):
                if step[0] is None:
                    break
                new.append(step[0])
                text = self.tok_decode(new)
                if any(s and s in text for s in until):
                    break
            hits = [text.find(s) for s in until if s and s in text]
            if hits:
                text = text[: min(hits)]
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            results.append(text)
            progress.update(1, tokens=len(ids) + len(new))
        progress.close()
        return results
