"""The attention mixer of the transformer baselines: SDPA equals the plain softmax reference, rotary positions
are relative, and decoding continues the forward (prefill part, step the rest: logits equal the full
forward) through the slot pool, left padding, snapshots and a full KV cache."""

import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig, ConfigError, load_pretrained, save_pretrained
from blackmamba.config import parameter_count
from blackmamba.generation import generate
from blackmamba.layers import AttentionMixer, KVCacheFullError
from blackmamba.layers.attention import attend, attention_ref, rotary

from ..conftest import TOL, randomize

PATTERNS = {"transformer": ["attention", "mlp"] * 2, "transformer-moe": ["attention", "moe"] * 2}


def attention_model(kind: str = "transformer", seed: int = 0, **overrides) -> BlackMamba:
    fields = dict(vocab_size=256, d_model=32, layer_pattern=PATTERNS[kind], n_experts=4, d_ff=40, n_heads=3)
    fields.update(head_dim=10, max_seq_len=64)
    fields.update(overrides)
    torch.manual_seed(seed)
    return randomize(BlackMamba(BlackMambaConfig(**fields)), seed).eval()


def ids_of(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length, keys", [(1, 1), (7, 7), (33, 33), (5, 19)])
def test_sdpa_equals_the_reference(dtype, length, keys):
    g = torch.Generator().manual_seed(length * 100 + keys)
    q = torch.randn(2, 3, length, 10, generator=g).to(dtype)
    k, v = (torch.randn(2, 3, keys, 10, generator=g).to(dtype) for _ in range(2))
    allowed = torch.rand(2, 1, length, keys, generator=g) < 0.6
    allowed[..., 0] = True  # every query sees a key
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(attend(q, k, v, allowed), attention_ref(q, k, v, allowed), rtol=rtol, atol=atol)
    if length == keys:
        torch.testing.assert_close(attend(q, k, v), attention_ref(q, k, v), rtol=rtol, atol=atol)


def test_rotary_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=g)
    pos = torch.tensor([3.0, 11.0])

    def score(shift: float) -> torch.Tensor:
        return (rotary(q, pos[0] + shift, 500.0) * rotary(k, pos[1] + shift, 500.0)).sum()

    torch.testing.assert_close(score(0.0), score(40.0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(0.0), (q * k).sum(), atol=1e-3)  # the positions do matter
    torch.testing.assert_close(rotary(q, torch.tensor(0.0), 500.0), q)
    torch.testing.assert_close(rotary(q, pos[1], 500.0).norm(), q.norm())


@pytest.mark.parametrize("kind", list(PATTERNS))
@pytest.mark.parametrize("prefill", [1, 6, 23])
def test_prefill_then_decode_equals_the_forward(kind, prefill):
    model = attention_model(kind)
    ids = ids_of(2, 24, prefill)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2)
        part = model(ids[:, :prefill], cache=cache).logits
        steps = [model.step(ids[:, t], cache) for t in range(prefill, 24)]
    torch.testing.assert_close(torch.cat([part, torch.stack(steps, 1)], 1), full, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_equals_the_forward():
    model = attention_model()
    ids = ids_of(2, 30)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.allocate_cache(2)
        pieces = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 1), (1, 13), (13, 30))]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.layers[0].length.tolist() == [30, 30]


def test_left_padded_rows_compute_what_they_would_alone():
    model = attention_model("transformer-moe")
    prompts = [ids_of(1, 9, 1)[0].tolist(), ids_of(1, 3, 2)[0].tolist(), ids_of(1, 6, 3)[0].tolist()]
    batch = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, p in enumerate(prompts):
        batch[i, 9 - len(p) :] = torch.tensor(p)
        mask[i, 9 - len(p) :] = True
    with torch.no_grad():
        padded = model(batch, mask=mask).logits
        cache = model.allocate_cache(3)
        prefilled = model(batch, cache=cache, mask=mask).logits
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p])).logits[0]
            torch.testing.assert_close(padded[i, 9 - len(p) :], alone, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(prefilled[i, 9 - len(p) :], alone, rtol=1e-4, atol=1e-4)
        assert torch.isfinite(padded).all() and torch.isfinite(prefilled).all()
    assert cache.layers[0].length.tolist() == [9, 3, 6]
    # Generation pads the same way: each prompt of a batch decodes the tokens it decodes alone.
    together = generate(model, prompts, 7)
    assert together == [generate(model, [p], 7)[0] for p in prompts]


def greedy_by_full_forwards(model: BlackMamba, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens recomputing the whole sequence at every token: no cache at all."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids], device=model.device)).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("pattern", [["attention", "mlp"], ["attention", "moe"], ["mamba", "mlp"], ["mamba", "moe"]])
def test_generate_works_for_all_four_kinds(pattern):
    model = attention_model(layer_pattern=pattern * 2, d_state=8)
    prompt = ids_of(1, 5, 7)[0].tolist()
    assert generate(model, [prompt], 12) == [greedy_by_full_forwards(model, prompt, 12)]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(PATTERNS))
def test_cuda_graph_steps_equal_eager_steps(kind):
    """Inside a CUDA graph a step attends over the whole static cache under a mask; eagerly it reads the
    filled positions only: the same tokens, and the same logits to rounding."""
    model = attention_model(kind).cuda()
    prompts = [ids_of(1, 5, 1)[0].tolist(), ids_of(1, 9, 2)[0].tolist(), ids_of(1, 2, 3)[0].tolist()]
    assert generate(model, prompts, 40, cuda_graphs=True) == generate(model, prompts, 40, cuda_graphs=False)
    assert generate(model, prompts[:1], 40, cuda_graphs=True) == [greedy_by_full_forwards(model, prompts[0], 40)]


@torch.no_grad()
def test_slots_joining_and_leaving_decode_as_if_alone():
    model = attention_model()
    prompts = [ids_of(1, n, n)[0].tolist() for n in (5, 2, 9, 4)]
    alone = [greedy_by_full_forwards(model, p, 6) for p in prompts]
    pool = model.allocate_cache(5)
    pool.acquire()  # slot 0 stays taken and unused
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    live: dict[int, tuple[int, torch.Tensor]] = {}
    for t in range(6 + len(prompts)):
        if t < len(prompts):  # sequence t joins: prefilled in a cache of its own, then written into a free slot
            own = model.allocate_cache(1)
            logits = model(torch.tensor([prompts[t]]), cache=own).logits[0, -1]
            slot = pool.acquire()
            pool.write(slot, own)
            live[t] = (slot, logits)
        if not live:
            break
        order = sorted(live, key=lambda i: -live[i][0])
        tokens = torch.stack([live[i][1].argmax() for i in order])
        for i, token in zip(order, tokens.tolist(), strict=True):
            got[i].append(token)
        logits = model.step(tokens, pool, torch.tensor([live[i][0] for i in order]))
        for row, i in enumerate(order):
            live[i] = (live[i][0], logits[row])
            if len(got[i]) == 6:
                pool.release(live.pop(i)[0])
    assert [got[i] for i in range(len(prompts))] == alone
    assert pool.layers[0].length.tolist() == [0] * 5  # released slots are empty again


@torch.no_grad()
def test_snapshot_restore_and_steps_on_some_slots():
    model = attention_model("transformer-moe")
    pool = model.allocate_cache(4)
    model(ids_of(4, 6), cache=pool)
    before = [t.clone() for t in pool.tensors()]
    model.step(torch.tensor([3, 4]), pool, torch.tensor([2, 0]))
    for old, new in zip(before, pool.tensors(), strict=True):
        assert torch.equal(old[[1, 3]], new[[1, 3]])
        assert not torch.equal(old[[0, 2]], new[[0, 2]])
    snap = pool.snapshot(2)
    first = model.step(torch.tensor([7]), pool, torch.tensor([2]))
    model.step(torch.tensor([9]), pool, torch.tensor([2]))
    pool.restore(1, snap)  # into another slot
    again = model.step(torch.tensor([7]), pool, torch.tensor([1]))
    assert torch.equal(first, again)


@torch.no_grad()
def test_a_full_kv_cache_is_refused():
    model = attention_model(max_seq_len=8)
    cache = model.allocate_cache(1)
    model(ids_of(1, 6), cache=cache)
    model.step(torch.tensor([5]), cache)
    model.step(torch.tensor([6]), cache)
    with pytest.raises(KVCacheFullError, match="holds 8"):
        model.step(torch.tensor([7]), cache)
    with pytest.raises(KVCacheFullError, match="reaches 9 positions"):
        model(ids_of(1, 9), cache=model.allocate_cache(1))
    model(ids_of(1, 40))  # without a cache there is no limit


def test_block_step_is_the_mixers_step():
    block = attention_model().layers[0]
    assert isinstance(block.mixer, AttentionMixer)
    residual, delta = torch.randn(3, 1, 32), torch.randn(3, 1, 32)
    with torch.no_grad():
        r_full, out_full, _ = block(residual, delta, block.mixer.allocate_cache(3))
        r_step, out_step = block.step(residual[:, 0], delta[:, 0], block.mixer.allocate_cache(3))
    torch.testing.assert_close(r_step, r_full[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out_step, out_full[:, 0], rtol=1e-5, atol=1e-5)


def test_forward_and_backward_under_bf16_autocast():
    model = attention_model("transformer-moe").train()
    ids = ids_of(2, 17)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layers[0].mixer.qkv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ config and files


def test_config_of_the_new_kinds():
    base = dict(vocab_size=64, d_model=16, d_ff=24)
    config = BlackMambaConfig(**base, layer_pattern=["attention", "mlp"], n_heads=2, head_dim=8)
    assert BlackMambaConfig.from_json(config.to_json()) == config
    with torch.device("meta"):
        assert parameter_count(config) == BlackMamba(config).num_parameters()
    for fields, fragment in [
        (dict(layer_pattern=["attention"]), "'n_heads' must be an integer from 1"),
        (dict(layer_pattern=["attention"], n_heads=2, head_dim=7), "'head_dim' must be even"),
        (dict(layer_pattern=["attention"], n_heads=2, head_dim=0), "'head_dim' must be an integer from 1"),
        (dict(layer_pattern=["attention"], n_heads="2"), "'n_heads'"),
        (dict(layer_pattern=["mlp"], d_ff=0), "'d_ff' must be an integer from 1"),
        (dict(layer_pattern=["mamba"], rope_theta=0.5), "'rope_theta'"),
        (dict(layer_pattern=["mamba"], n_heads=-1), "'n_heads'"),
        (dict(layer_pattern=["attention", "lstm"], n_heads=2), "unknown block kinds"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            BlackMambaConfig(**{**base, **fields})
    assert BlackMambaConfig(**base, layer_pattern=["mamba", "mlp"], n_experts=0).n_heads == 0  # unused: 0 is fine
    with pytest.raises(ConfigError, match="released layout holds Mamba and MoE blocks only"):
        config.to_released()


def test_checkpoint_round_trip(tmp_path):
    model = attention_model("transformer-moe")
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    ids = ids_of(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.config == model.config
