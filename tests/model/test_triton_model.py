"""The whole model on the Triton backend equals the model on the reference backend: logits, decoding and
one training step's gradients (CPU: the tiny model in Triton's interpreter; GPU: the 2.8B shape)."""

import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig
from blackmamba.kernels import use_backend, use_settings
from blackmamba.layers import moe as moe_layer
from blackmamba.routing import top1_sigmoid

from ..helpers import DEVICE, assert_close, randomize, rel_err, tiny_model

pytest.importorskip("triton")


@pytest.fixture
def small_chunks():
    """Chunks of 8 positions in the interpreter, so that tiny sequences cross several."""
    with use_settings(scan_chunk=8 if DEVICE.type == "cpu" else 64):
        yield


class RoutingReplay:
    """Top-1 routing (train mode) recorded on one run and replayed on the next: the second run takes the first
    run's expert for every token and computes the gate from its own logits. A token whose router logits lie
    within rounding of a tie may pick the other expert on another backend; its output then differs entirely,
    and through the Mamba states so does every later position of its sequence. Replaying compares the
    numerics alone; ``flips`` keeps, per MoE call, the tokens whose own choice differed and their gap
    between the two largest logits (in the recording run)."""

    def __init__(self, monkeypatch):
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.flips: list[torch.Tensor] = []
        self.replaying = False
        self.calls = 0
        monkeypatch.setattr(moe_layer, "top1_sigmoid", self)

    def __call__(self, logits_TE):
        expert_T, gate_T = top1_sigmoid(logits_TE)
        if not self.replaying:
            top2 = logits_TE.topk(2, dim=-1).values
            self.recorded.append((expert_T, top2[:, 0] - top2[:, 1]))
            return expert_T, gate_T
        recorded, gap_T = self.recorded[self.calls]
        self.calls += 1
        self.flips.append(gap_T[expert_T != recorded])
        return recorded, torch.sigmoid(logits_TE.gather(1, recorded[:, None])[:, 0])


def logits_and_grads(model, ids, backend):
    model.zero_grad(set_to_none=True)
    with use_backend(backend):
        out = model(ids)
        target = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(3)).to(out.logits)
        (out.logits.float() * target.float()).mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def compare(model, ids, logits_tol, grads_tol, replay=None, max_flip_gap=1e-4):
    """Logits and every parameter's gradient within the named entries of the tolerance table. With a
    :class:`RoutingReplay` the Triton run takes the reference run's experts; a token that would have picked
    another expert must then have been within ``max_flip_gap`` of a tie (in router logits)."""
    logits_ref, grads_ref = logits_and_grads(model, ids, "ref")
    if replay is not None:
        replay.replaying = True
    logits, grads = logits_and_grads(model, ids, "triton")
    if replay is not None:
        assert replay.calls == len(replay.recorded) > 0
        gaps = torch.cat(replay.flips)
        assert gaps.numel() == 0 or gaps.max().item() <= max_flip_gap, f"routing flips far from a tie: {gaps}"
    assert_close("logits", logits_ref, logits, logits_tol)
    assert grads.keys() == grads_ref.keys()
    worst = max(grads, key=lambda k: rel_err(grads[k], grads_ref[k]))
    assert_close(worst, grads_ref[worst], grads[worst], grads_tol)


@pytest.mark.slow  # 30 s in the interpreter: .ci/run runs it; the kernels' own tests stay in make test
def test_tiny_model_triton_equals_reference(small_chunks):
    model = tiny_model().to(DEVICE).train()
    model.config.train_routing = "top1"  # the same routing on both backends
    ids = torch.randint(0, model.config.vocab_size, (2, 13)).to(DEVICE)
    compare(model, ids, torch.float32, "fp32_model_grad")


def test_routing_replay_takes_the_recorded_experts(monkeypatch):
    """The replay returns the recorded experts (and the gate of its own logits at them), and reports a token
    whose own choice differs with its recorded gap."""
    replay = RoutingReplay(monkeypatch)
    first = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 0.4]])
    expert, _ = moe_layer.top1_sigmoid(first)
    assert expert.tolist() == [0, 1]
    replay.replaying = True
    second = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.4, 0.5]])  # token 1 now prefers expert 2
    expert, gate = moe_layer.top1_sigmoid(second)
    assert expert.tolist() == [0, 1]
    assert torch.allclose(gate, torch.sigmoid(torch.tensor([2.0, 0.4])))
    assert len(replay.flips) == 1 and torch.allclose(replay.flips[0], torch.tensor([0.1]))


@pytest.mark.slow  # the interpreter, as test_tiny_model_triton_equals_reference
def test_tiny_model_triton_equals_reference_with_replayed_routing(small_chunks, monkeypatch):
    model = tiny_model().to(DEVICE).train()
    model.config.train_routing = "top1"
    ids = torch.randint(0, model.config.vocab_size, (2, 13)).to(DEVICE)
    replay = RoutingReplay(monkeypatch)
    compare(model, ids, torch.float32, "fp32_model_grad", replay=replay)
    assert len(replay.recorded) == sum(kind == "moe" for kind in model.config.layer_pattern)


@pytest.mark.slow  # 11 s in the interpreter: .ci/run runs it
def test_tiny_model_triton_decode_equals_forward(small_chunks):
    model = tiny_model().to(DEVICE)
    ids = torch.randint(0, model.config.vocab_size, (3, 9)).to(DEVICE)
    with torch.no_grad(), use_backend("triton"):
        full = model(ids).logits
        cache = model.allocate_cache(3)
        prefix = model(ids[:, :4], cache=cache).logits
        steps = [model.step(ids[:, t], cache) for t in range(4, 9)]
    assert_close("prefill then steps", full, torch.cat([prefix, torch.stack(steps, 1)], 1), "fp32_model")


@pytest.mark.gpu
def test_2p8b_shape_triton_equals_reference(monkeypatch):
    # fp32, and the reference run's routing replayed: the two backends round differently, and a token near a
    # routing tie then picks another expert and its sequence diverges from there (0.2% of tokens per layer in
    # bf16). Without the replay this test failed once on the H200 in fp32 (logits rel err 0.061). Per-block
    # residual streams then showed the cause: the reference backend with autograd on differs from itself with
    # it off exactly as the Triton runs do (within 3e-6 up to MoE block 3, 0.53 once its output is added), so
    # block 3 routes a token differently; with the replay the test passes (2026-12-03).
    torch.manual_seed(0)
    config = BlackMambaConfig.from_preset("blackmamba-2.8b")
    with torch.device("cuda"):
        model = BlackMamba(config)
    randomize(model, scale=0.02)
    model.train().config.train_routing = "top1"
    ids = torch.randint(0, config.vocab_size, (2, 256), device="cuda")
    compare(model, ids, "fp32_model", "fp32_2p8b_grad", replay=RoutingReplay(monkeypatch))


def test_tiny_model_triton_steps_any_slots(small_chunks):
    """Prefill into two slots of a pool and step them (in another order) on the Triton backend: the logits
    equal the reference backend's."""
    model = tiny_model().to(DEVICE)
    ids = torch.randint(0, model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    logits = {}
    with torch.no_grad():
        for backend in ("ref", "triton"):
            with use_backend(backend):
                pool = model.allocate_cache(4)
                model(ids[:, :2], cache=pool, slots=torch.tensor([2, 0], device=DEVICE))
                logits[backend] = model.step(ids.flip(0)[:, 2], pool, torch.tensor([0, 2], device=DEVICE))
    assert_close("logits", logits["ref"], logits["triton"], "fp32_model")


def test_model_step_routes_inside_the_norm(monkeypatch):
    """The decode step's MoE blocks route in the norm kernel; logits equal the unfused step's."""
    import blackmamba.kernels.norm as norm_module

    model = tiny_model().to(DEVICE)
    tokens = torch.randint(0, model.config.vocab_size, (3,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    calls = []
    real = norm_module.add_rms_norm_route_triton
    monkeypatch.setattr(norm_module, "add_rms_norm_route_triton", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad(), use_backend("triton"):
        fused = model.step(tokens, model.allocate_cache(3))
        assert len(calls) == model.config.layer_pattern.count("moe")
        with use_settings(fuse_router=False):
            unfused = model.step(tokens, model.allocate_cache(3))
    assert len(calls) == model.config.layer_pattern.count("moe")
    assert_close("logits", unfused, fused, torch.float32)
