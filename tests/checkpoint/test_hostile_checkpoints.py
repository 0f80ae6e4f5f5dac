"""Generated hostile checkpoints and configs, thrown at the CLI in-process.

Each generator makes many damaged variants of a valid checkpoint: truncations at many offsets, random bytes,
mutated safetensors headers, damaged and strange released files, pickles carrying code (whose payload would
create a marker file), and every config field of both layouts set to wrong types and out-of-bound values.
For each, `blackmamba info` / `convert` / `flops --config` must exit 1 with exactly one ``error:`` line, no
traceback, nothing written, and the marker never appears. (Random byte flips inside tensor data cannot be
detected; there the command may also succeed, but never with a traceback.)

Every case runs even when an earlier one fails; the test then lists all failing cases.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import struct
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from blackmamba.config import LIMITS

from .common import make_ours, make_released, run_cli, tree

pytestmark = pytest.mark.hostile


# ------------------------------------------------------------------------------------------ harness


class Cases:
    """Runs every case and remembers the failures, so one run reports them all."""

    def __init__(self, root: Path):
        self.root, self.failures, self.count = root, [], 0

    def folder(self, base: dict[str, bytes], name: str) -> Path:
        self.count += 1
        path = self.root / f"case-{self.count:05d}" / name
        path.mkdir(parents=True)
        for file, data in base.items():
            (path / file).write_bytes(data)
        return path

    def refused(self, label: str, *args, may_succeed: bool = False, marker: Path | None = None) -> None:
        workdir = next(a for a in args if isinstance(a, Path)).parent  # the case's own folder
        before = tree(workdir)
        code, _, err = run_cli(*args)
        lines = err.splitlines()
        problems = []
        if "Traceback" in err or "weights_only=False" in err or "/proc/self/fd" in err:
            problems.append(f"stderr: {err[-400:]!r}")
        if code == 0 and may_succeed:
            pass
        elif code != 1 or len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"exit {code}, stderr {err[-400:]!r}")
        if args[0] == "info" and tree(workdir) != before:
            problems.append("files changed")
        if args[0] == "convert" and code != 0 and os.path.lexists(args[2]):
            problems.append("convert wrote its destination")
        if marker is not None and marker.exists():
            problems.append("THE PAYLOAD RAN")
        if problems:
            self.failures.append(f"{label} ({' '.join(map(str, args[:1]))}): {'; '.join(problems)}")

    def check(self) -> None:
        assert self.count > 0
        assert not self.failures, f"{len(self.failures)} of {self.count} cases failed:\n" + "\n".join(
            self.failures[:40]
        )


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "ours": files_of(make_ours(root / "ours")),
        "sharded": files_of(make_ours(root / "sharded", shard_bytes=40_000)),
        "released": files_of(make_released(root / "released")),
    }


def offsets(length: int, special: list[int]) -> list[int]:
    spread = [int(length * i / 40) for i in range(40)]
    return sorted({o for o in special + spread + [length - 1] if 0 <= o < length})


def header_of(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def with_header(header, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# ------------------------------------------------------------------------------------------ safetensors


def test_truncated_safetensors_at_many_offsets(tmp_path, bases):
    cases = Cases(tmp_path)
    data = bases["ours"]["model.safetensors"]
    (n,) = struct.unpack("<Q", data[:8])
    for off in offsets(len(data), [0, 1, 4, 7, 8, 9, 16, 8 + n - 1, 8 + n, 8 + n + 1, 8 + n + 4]):
        path = cases.folder({**bases["ours"], "model.safetensors": data[:off]}, "ckpt")
        cases.refused(f"truncated at {off}", "info", path)
        cases.refused(f"truncated at {off}", "convert", path, path.parent / "out")
    for shard in sorted(k for k in bases["sharded"] if k.startswith("model-")):
        blob = bases["sharded"][shard]
        for off in offsets(len(blob), [0, 8])[::4]:
            path = cases.folder({**bases["sharded"], shard: blob[:off]}, "ckpt")
            cases.refused(f"{shard} truncated at {off}", "info", path)
    cases.check()


def test_random_bytes_as_weights(tmp_path, bases):
    cases = Cases(tmp_path)
    rng = random.Random(0)
    for name, base in (("model.safetensors", "ours"), ("pytorch_model.bin", "released")):
        for size in (1, 7, 8, 9, 64, 1000, 100_000, len(bases[base][name])):
            for seed in range(3):
                rng.seed(seed * 1000 + size)
                blob = bytes(rng.getrandbits(8) for _ in range(min(size, 4096))) * (size // 4096 + 1)
                path = cases.folder({**bases[base], name: blob[:size]}, "ckpt")
                cases.refused(f"{name} = {size} random bytes (seed {seed})", "info", path)
        path = cases.folder({**bases[base], name: b"\0" * 5000}, "ckpt")
        cases.refused(f"{name} = zeros", "info", path)
    cases.check()


def header_mutations(header: dict) -> Iterator[tuple[str, object]]:
    key = "layers.1.mixer.w1"
    entry = header[key]
    for dtype in ("I32", "I64", "I16", "BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "C64", "XYZ", "", 5, None):
        yield f"dtype {dtype!r}", {**header, key: {**entry, "dtype": dtype}}
    for shape in ([], [-1], [10**12, 10**12], "x", [2.5], [*entry["shape"], 1], [1] * 40, None, [2**64]):
        yield f"shape {shape!r:.30}", {**header, key: {**entry, "shape": shape}}
    start, end = entry["data_offsets"]
    for offs in ([end, start], [0, 10**15], [-1, end], [start, end + 8], [start - 8, end - 8], ["a", "b"], [start]):
        yield f"data_offsets {offs!r}", {**header, key: {**entry, "data_offsets": offs}}
    yield "entry not an object", {**header, key: [1, 2]}
    yield "entry without dtype", {**header, key: {k: v for k, v in entry.items() if k != "dtype"}}
    for meta in ([], "x", {"format": 5}, {"format": {"a": 1}}):
        yield f"__metadata__ {meta!r}", {**header, "__metadata__": meta}
    for value in ([], "x", 1, None):
        yield f"header {value!r}", value
    yield "key removed", {k: v for k, v in header.items() if k != key}
    yield "key renamed", {("evil" if k == key else k): v for k, v in header.items()}
    yield "empty key name", {("" if k == key else k): v for k, v in header.items()}
    yield "very long key", {("k" * 100_000 if k == key else k): v for k, v in header.items()}


def test_mutated_safetensors_headers(tmp_path, bases):
    cases = Cases(tmp_path)
    data = bases["ours"]["model.safetensors"]
    header, body = header_of(data)
    for label, mutated in header_mutations(header):
        path = cases.folder({**bases["ours"], "model.safetensors": with_header(mutated, body)}, "ckpt")
        cases.refused(label, "info", path)
        cases.refused(label, "convert", path, path.parent / "out")
    raw = data[8 : 8 + struct.unpack("<Q", data[:8])[0]]
    for n in (0, 1, len(raw) - 1, len(raw) + 1, 10**8, 2**63, 2**64 - 1):
        path = cases.folder({**bases["ours"], "model.safetensors": struct.pack("<Q", n) + data[8:]}, "ckpt")
        cases.refused(f"header length {n}", "info", path)
    for junk in (b"{", b"not json", b"\xff" * 20, b'{"a": ' * 1000, b"[]"):
        blob = struct.pack("<Q", len(junk)) + junk + body
        path = cases.folder({**bases["ours"], "model.safetensors": blob}, "ckpt")
        cases.refused(f"header {junk[:12]!r}", "info", path)
    cases.check()


def test_hostile_shard_indexes(tmp_path, bases):
    cases = Cases(tmp_path)
    index = json.loads(bases["sharded"]["model.safetensors.index.json"])
    first = next(iter(index["weight_map"]))
    names = [
        "../x.safetensors",
        "/etc/passwd",
        "/dev/zero",
        "/dev/stdin",
        "/proc/self/environ",
        "..",
        ".",
        "",
        "a/../../b",
        "\0",
        "x" * 5000,
        "~/.ssh/id_rsa",
        "//etc/hosts",
    ]
    for name in names:
        mutated = {**index, "weight_map": {**index["weight_map"], first: name}}
        path = cases.folder({**bases["sharded"], "model.safetensors.index.json": json.dumps(mutated).encode()}, "ck")
        cases.refused(f"weight_map entry {name!r:.30}", "info", path)
    for weight_map in ([], None, 3, "s", {}, {first: 1}, {first: None}, {first: []}, {first: {}}, {first: True}):
        text = json.dumps({**index, "weight_map": weight_map}).encode()
        path = cases.folder({**bases["sharded"], "model.safetensors.index.json": text}, "ck")
        cases.refused(f"weight_map {weight_map!r:.30}", "info", path)
    for text in (b"", b"[", b"null", b"[]", b"\xff\xfe", b'{"weight_map": ' * 100_000, b"[" * 100_000):
        path = cases.folder({**bases["sharded"], "model.safetensors.index.json": text}, "ck")
        cases.refused(f"index {text[:12]!r}", "info", path)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(bases["ours"]["model.safetensors"])
    path = cases.folder(bases["sharded"], "ck")
    shard = index["weight_map"][first]
    (path / shard).unlink()
    os.symlink(outside, path / shard)
    cases.refused("shard is a symlink leading out", "info", path)
    cases.check()


# ------------------------------------------------------------------------------------------ released weights


def released_variants(state: dict) -> Iterator[tuple[str, object]]:
    model = state["model"]
    key = "decoder.layers.1.mixer.local_experts.2.linear_fc1.weight"
    for value in (None, 1, "s", [], (), b"x", 1.5):
        yield f"file holds {value!r}", value
    for value in (None, 1, [], "s", (1, 2), list(model.values())):
        yield f"model = {type(value).__name__}", {"model": value}
    yield "no model key", dict(model)
    yield "model nested", {"model": {"model": model}}
    yield "integer keys", {"model": {i: v for i, v in enumerate(model.values())}}
    yield "empty model", {"model": {}}
    for dtype in (torch.int32, torch.int64, torch.bool, torch.uint8, torch.int8, torch.complex64):
        yield f"{dtype} weights", {"model": {**model, key: model[key].to(dtype)}}
    yield "string value", {"model": {**model, key: "tensor"}}
    yield "list value", {"model": {**model, key: model[key].tolist()}}
    yield "sparse value", {"model": {**model, key: model[key].to_sparse()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated; a file may still hold one
        quantized = torch.quantize_per_tensor(model[key], 0.1, 0, torch.qint8)
    yield "quantized value", {"model": {**model, key: quantized}}
    yield "wrong shape", {"model": {**model, key: model[key][:1]}}
    yield "scalar", {"model": {**model, key: torch.tensor(1.0)}}
    yield "missing key", {"model": {k: v for k, v in model.items() if k != key}}
    yield "extra key", {"model": {**model, "decoder.layers.99.norm.weight": model[key]}}
    yield "ordered dict of nothing", {"model": OrderedDict()}


def test_strange_released_files(tmp_path, bases):
    cases = Cases(tmp_path)
    path0 = cases.folder(bases["released"], "rel")
    state = torch.load(path0 / "pytorch_model.bin", weights_only=True)
    for label, obj in released_variants(state):
        path = cases.folder(bases["released"], "rel")
        torch.save(obj, path / "pytorch_model.bin")
        cases.refused(label, "info", path)
        cases.refused(label, "convert", path, path.parent / "out")
        legacy = cases.folder(bases["released"], "rel")
        torch.save(obj, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
        cases.refused(f"{label} (legacy format)", "info", legacy)
    cases.check()


def test_truncated_and_flipped_released_zip(tmp_path, bases):
    cases = Cases(tmp_path)
    data = bases["released"]["pytorch_model.bin"]
    for off in offsets(len(data), [0, 1, 2, 4, 30, len(data) - 22, len(data) - 100]):
        path = cases.folder({**bases["released"], "pytorch_model.bin": data[:off]}, "rel")
        cases.refused(f"truncated at {off}", "info", path)
    legacy = cases.folder(bases["released"], "rel")
    torch.save(
        torch.load(legacy / "pytorch_model.bin", weights_only=True),
        legacy / "pytorch_model.bin",
        _use_new_zipfile_serialization=False,
    )
    blob = (legacy / "pytorch_model.bin").read_bytes()
    for off in offsets(len(blob), [1, 2, 3, 10])[::2]:
        path = cases.folder({**bases["released"], "pytorch_model.bin": blob[:off]}, "rel")
        cases.refused(f"legacy truncated at {off}", "info", path)
    rng = random.Random(7)
    for i in range(60):  # flips anywhere: tensor data may absorb them silently, but never a traceback
        flipped = bytearray(data)
        for _ in range(rng.choice((1, 4, 32))):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        path = cases.folder({**bases["released"], "pytorch_model.bin": bytes(flipped)}, "rel")
        cases.refused(f"flip set {i}", "info", path, may_succeed=True)
    cases.check()


# ------------------------------------------------------------------------------------------ pickled code


class Payload:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class SystemPayload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class EvalPayload:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def payloads(marker: Path) -> Iterator[tuple[str, object]]:
    make = f"open({str(marker)!r}, 'w').close()"
    for name, p in (
        ("exec", Payload(make)),
        ("os.system", SystemPayload(f"touch {marker}")),
        ("eval", EvalPayload(f"__import__('pathlib').Path({str(marker)!r}).touch()")),
    ):
        yield f"{name} at the top", p
        yield f"{name} as the model", {"model": p}
        yield f"{name} in the model", {"model": {"x": torch.ones(1), "y": p}}
        yield f"{name} beside the model", {"model": {}, "extra": [1, {"a": p}]}


def test_planted_pickle_payloads_never_run(tmp_path, bases):
    cases = Cases(tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    for label, obj in payloads(marker):
        for fmt in ("zip", "legacy", "pickle2", "pickle4", "pickle0"):
            path = cases.folder(bases["released"], "rel")
            file = path / "pytorch_model.bin"
            if fmt == "zip":
                torch.save(obj, file)
            elif fmt == "legacy":
                torch.save(obj, file, _use_new_zipfile_serialization=False)
            else:
                file.write_bytes(pickle.dumps(obj, protocol=int(fmt[-1])))
            cases.refused(f"{label} ({fmt})", "info", path, marker=marker)
            cases.refused(f"{label} ({fmt})", "convert", path, path.parent / "out", marker=marker)
            if fmt in ("zip", "legacy", "pickle2", "pickle4"):
                code, _, err = run_cli("info", path)
                if "holds Python code (a pickle that is not plain tensors) and was refused" not in err:
                    cases.failures.append(f"{label} ({fmt}): not reported as code: {err!r}")
        step = cases.folder(bases["ours"], "step")
        torch.save({"optimizer": obj}, step / "trainer_state.pt")
        code, out, err = run_cli("info", step)
        if code != 0 or marker.exists() or "optimizer state" not in out:
            cases.failures.append(f"{label} in trainer_state.pt: exit {code}, {err!r}, ran={marker.exists()}")
    assert not marker.exists()
    cases.check()


# ------------------------------------------------------------------------------------------ configs


INT_FIELDS = [
    "vocab_size",
    "d_model",
    "d_state",
    "d_conv",
    "expand",
    "dt_rank",
    "n_experts",
    "d_ff",
    "max_seq_len",
    "sinkhorn_max_iters",
    "tokenizer_vocab_size",
]
FLOAT_FIELDS = {  # field: extra out-of-bound values
    "norm_eps": [0, 2, -1e-5],
    "initializer_range": [11, -0.5],
    "dt_min": [0, -1, 1.0],  # 1.0 > dt_max
    "dt_max": [0, -1, 1e-4],  # below dt_min
    "dt_init_floor": [-1],
    "sinkhorn_tol": [-1],
    "load_balance_weight": [-0.1],
    "z_loss_weight": [-1],
}
CHOICE_FIELDS = ["moe_activation", "train_routing", "sinkhorn_init", "sinkhorn_criterion"]
WRONG_TYPES = ["x", "", "12", True, False, [], [1], {}, {"a": 1}]


def bad_values() -> Iterator[tuple[str, object]]:
    limit = {"tokenizer_vocab_size": LIMITS["vocab_size"]}
    for field in INT_FIELDS:
        for value in [*WRONG_TYPES, 1.5, 32.0, -1, 0, limit.get(field, LIMITS.get(field, 0)) + 1, 10**100, -(10**100)]:
            yield field, value
        if field not in ("dt_rank", "tokenizer_vocab_size"):
            yield field, None
    for field, extra in FLOAT_FIELDS.items():
        for value in [*WRONG_TYPES, None, math.nan, math.inf, -math.inf, *extra]:
            yield field, value
    for field in CHOICE_FIELDS:
        for value in [*WRONG_TYPES, None, 1, "bogus", "GELU", "gelu "]:
            yield field, value
    for value in ["true", 1, 0, None, [], "yes", {}]:
        yield "conv_bias", value
    for value in ["mamba", [], None, 1, {}, ["mamba", None], ["MAMBA"], [["mamba"]], ["mamba"] * 1025, ["moe"] * 10**5]:
        yield "layer_pattern", value


def test_every_field_of_our_config(tmp_path, bases):
    cases = Cases(tmp_path)
    config = json.loads(bases["ours"]["config.json"])
    path = cases.folder(bases["ours"], "ckpt")
    for field, value in bad_values():
        text = json.dumps({**config, field: value}).encode()
        (path / "config.json").write_bytes(text)
        label = f"{field} = {value!r:.40}"
        cases.refused(label, "info", path)
        standalone = path.parent / "standalone.json"
        standalone.write_bytes(text)
        cases.refused(label, "flops", "--config", standalone)
    for label, text in whole_file_hostility():
        (path / "config.json").write_bytes(text)
        cases.refused(label, "info", path)
        cases.refused(label, "convert", path, path.parent / "out")
        (path.parent / "standalone.json").write_bytes(text)
        cases.refused(label, "flops", "--config", path.parent / "standalone.json")
    for extra in ({"n_layer": 4}, {"": 1}, {"x" * 10_000: 1}):
        (path / "config.json").write_text(json.dumps({**config, **extra}))
        cases.refused(f"unknown field {list(extra)[0]:.20}", "info", path)
    cases.check()


def whole_file_hostility() -> Iterator[tuple[str, bytes]]:
    yield "deep dict", b'{"a":' * 200_000 + b"1" + b"}" * 200_000
    yield "deep list", b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    yield "unclosed deep", b"{" + b'"a":[' * 200_000
    for text in (b"", b" ", b"[]", b"1", b'"s"', b"null", b"true", b"\xff\xfe{}", b"{\x00}", b"{'a': 1}"):
        yield f"file {text!r}", text
    yield "number too long", b'{"vocab_size": 1' + b"0" * 10_000 + b"}"
    yield "NaN size", b'{"d_model": NaN}'


RELEASED_INTS = [
    "num_layers",
    "hidden_size",
    "vocab_size",
    "ffn_hidden_size",
    "state_size",
    "conv_dimension",
    "expansion_factor",
    "max_sequence_length",
]


def released_bad_values(config: dict) -> Iterator[tuple[str, dict]]:
    for field in RELEASED_INTS:
        for value in [*WRONG_TYPES, None, 1.5, 64.0, -1, 0, 2**40, 10**100]:
            yield f"{field} = {value!r:.30}", {**config, field: value}
        if field in ("num_layers", "hidden_size", "vocab_size", "ffn_hidden_size"):
            yield f"{field} missing", {k: v for k, v in config.items() if k != field}
    n = config["num_layers"]
    for codes in (
        "r8r8",
        5,
        {},
        [None] * n,
        [True] * n,
        [1.5] * n,
        [[]] * n,
        ["r"] * (n + 1),
        ["x"] * n,
        ["r8"] * n,
        ["1"] * n,
        ["", "r", "r", "r"][:n] + ["r"] * (n - 4),
        ["8", "9"] * (n // 2),
        ["r"] * 10**6,
    ):
        yield f"mamba_moe_layers {codes!r:.30}", {**config, "mamba_moe_layers": codes}
    for field in ("add_bias_linear", "swiglu", "bias"):
        for value in ("no", 1, None, [], {}):
            yield f"{field} = {value!r}", {**config, field: value}
    yield "add_bias_linear true", {**config, "add_bias_linear": True}
    yield "swiglu false", {**config, "swiglu": False}
    yield "a million layers", {**config, "num_layers": 10**6, "mamba_moe_layers": ["r"] * 10**6}


def test_every_field_of_the_released_config(tmp_path, bases):
    cases = Cases(tmp_path)
    config = json.loads(bases["released"]["config.json"])
    path = cases.folder(bases["released"], "rel")
    for label, mutated in released_bad_values(config):
        text = json.dumps(mutated).encode()
        (path / "config.json").write_bytes(text)
        cases.refused(label, "info", path)
        (path.parent / "standalone.json").write_bytes(text)
        if "mamba_moe_layers" in mutated:  # without it the file reads as our layout (and fails there)
            cases.refused(label, "flops", "--config", path.parent / "standalone.json")
    cases.check()


def test_huge_but_valid_looking_configs_fail_fast(tmp_path, bases):
    """Sizes each within bounds, or just past one: every refusal comes at once, before any allocation."""
    import time

    cases = Cases(tmp_path)
    config = json.loads(bases["ours"]["config.json"])
    big = {
        "d_model": LIMITS["d_model"],
        "vocab_size": LIMITS["vocab_size"],
        "d_ff": LIMITS["d_ff"],
        "n_experts": LIMITS["n_experts"],
        "layer_pattern": ["mamba", "moe"] * (LIMITS["n_layers"] // 2),
        "dt_rank": LIMITS["dt_rank"],
    }
    path = cases.folder(bases["ours"], "ckpt")
    for i in range(1, len(big) + 1):
        mutated = {**config, **dict(list(big.items())[:i])}
        (path / "config.json").write_text(json.dumps(mutated))
        start = time.perf_counter()
        cases.refused(f"first {i} sizes at their bounds", "info", path)
        if time.perf_counter() - start > 5:
            cases.failures.append(f"first {i} sizes at their bounds: took {time.perf_counter() - start:.1f} s")
    cases.check()


def test_generators_produce_many_cases():
    assert sum(1 for _ in bad_values()) > 150
    config = {"num_layers": 4, "mamba_moe_layers": ["r", "8", "r", "8"]}
    assert sum(1 for _ in released_bad_values(config)) > 100
