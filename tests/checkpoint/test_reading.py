"""Reading untrusted checkpoints: pickled code is refused and never runs, shard names stay inside the folder,
every damaged file is one CheckpointError naming it (for `info` as for loading), weights must be floating
point, and a reader never mixes two versions of a folder that is replaced while it reads."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

import blackmamba.checkpoint as ckpt
from blackmamba import CheckpointError, load_pretrained, save_pretrained
from blackmamba.checkpoint import open_checkpoint

from .common import assert_refused, make_ours, make_released, released_state, run_cli, state_equal, tiny


class Payload:
    """Unpickling this runs code that creates ``marker``: what an attacker plants in a torch file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def plant(file: Path, obj, legacy: bool = False) -> None:
    if legacy:  # a plain pickle (protocol 2 starts with PROTO, like torch's legacy format)
        file.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, file)


# ------------------------------------------------------------------------------------------ pickled code


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("where", ["top", "in_model", "as_tensor"])
def test_pickled_code_in_released_weights_is_refused_and_never_runs(tmp_path, legacy, where):
    path = make_released(tmp_path / "rel")
    marker = tmp_path / "marker"
    state = released_state(path)
    if where == "top":
        obj = Payload(marker)
    elif where == "in_model":
        obj = {"model": {**state["model"], "extra": Payload(marker)}}
    else:
        obj = {"model": {**state["model"], "embedding.word_embeddings.weight": Payload(marker)}}
    plant(path / "pytorch_model.bin", obj, legacy)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path)
    message = str(info.value)
    prefix = f"{path / 'pytorch_model.bin'} holds Python code (a pickle that is not plain tensors) and was refused"
    assert message == prefix + " (it imports builtins.exec)", message
    assert_refused(tmp_path, "info", path, fragments=("holds Python code",))
    assert_refused(tmp_path, "convert", path, tmp_path / "out", fragments=("holds Python code",))
    assert not marker.exists()


def test_plain_weights_in_a_protocol_4_pickle_are_refused_with_the_reason(tmp_path):
    path = make_released(tmp_path / "rel")
    torch.save(released_state(path), path / "pytorch_model.bin", pickle_protocol=4)
    message = assert_refused(tmp_path, "info", path, fragments=("pickle protocol 4",))
    assert "Python code" not in message and "weights_only" not in message


def test_info_does_not_unpickle_trainer_state(tmp_path):
    path = make_ours(tmp_path / "step")
    marker = tmp_path / "marker"
    plant(path / "trainer_state.pt", {"optimizer": Payload(marker), "pad": torch.randn(70_000)})
    code, out, err = run_cli("info", path)
    assert code == 0, err
    assert not marker.exists()
    size = (path / "trainer_state.pt").stat().st_size
    row = next(line for line in out.splitlines() if line.startswith("size on disk"))
    assert f"includes {size / 2**20:,.1f} MiB of optimizer state in trainer_state.pt" in row


def test_info_without_trainer_state_mentions_no_optimizer(tmp_path):
    code, out, _ = run_cli("info", make_ours(tmp_path / "ckpt"))
    assert code == 0 and "optimizer" not in out


# ------------------------------------------------------------------------------------------ shard index


def sharded(tmp_path: Path) -> tuple[Path, dict]:
    path = make_ours(tmp_path / "sharded", shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    return path, index


def outside_names(tmp_path: Path, path: Path) -> dict[str, str]:
    victim = make_ours(tmp_path / "victim") / "model.safetensors"
    os.symlink(victim, path / "model-00009-of-00009.safetensors")
    os.symlink(tmp_path / "victim", path / "linkdir")
    return {
        "dotdot": "../victim/model.safetensors",
        "absolute": str(victim),
        "dotdot_inside": "linkdir/../../victim/model.safetensors",
        "symlink_file": "model-00009-of-00009.safetensors",
        "symlink_dir": "linkdir/model.safetensors",
        "nul": "model\0.safetensors",
        "folder_itself": ".",
    }


@pytest.mark.parametrize(
    "case", ["dotdot", "absolute", "dotdot_inside", "symlink_file", "symlink_dir", "nul", "folder_itself"]
)
def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path, case):
    path, index = sharded(tmp_path)
    name = outside_names(tmp_path, path)[case]
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    message = assert_refused(tmp_path, "info", path, fragments=("outside the checkpoint folder",))
    assert "model.safetensors.index.json" in message
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_pretrained(path)


def test_index_may_name_a_symlink_that_stays_inside(tmp_path):
    path, index = sharded(tmp_path)
    model = load_pretrained(path)
    real = sorted(set(index["weight_map"].values()))[0]
    os.rename(path / real, path / "renamed.bin")
    os.symlink("renamed.bin", path / real)
    assert state_equal(load_pretrained(path).state_dict(), model.state_dict())


@pytest.mark.parametrize(
    "weight_map, fragment",
    [
        (["model-00001-of-00003.safetensors"], "found list"),
        (None, "found NoneType"),
        ({}, "found an empty dict"),
        ("model.safetensors", "found str"),
        ({"embedding.weight": 3}, "must be a file name, found int"),
        ({"embedding.weight": None}, "must be a file name, found NoneType"),
        ({"embedding.weight": ["a"]}, "must be a file name, found list"),
        ({"embedding.weight": ""}, "must be a file name"),
    ],
)
def test_malformed_weight_map_is_a_clear_error(tmp_path, weight_map, fragment):
    path, _ = sharded(tmp_path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_refused(tmp_path, "info", path, fragments=("model.safetensors.index.json", fragment))


@pytest.mark.parametrize("text", ["[1, 2]", "null", '{"metadata": {}}', "[" * 100_000, "\xff\xfe"])
def test_index_that_is_not_an_object_with_a_weight_map(tmp_path, text):
    path, _ = sharded(tmp_path)
    (path / "model.safetensors.index.json").write_bytes(text.encode("latin-1"))
    assert_refused(tmp_path, "info", path, fragments=("model.safetensors.index.json", "not a valid shard index"))


def test_index_and_shards_disagree(tmp_path):
    path, index = sharded(tmp_path)
    names = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == names[0])
    index["weight_map"][key] = names[1]  # the index now puts it in the wrong shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(tmp_path, "info", path, fragments=(key, names[0], names[1]))


def test_key_stored_in_two_shards(tmp_path):
    path, index = sharded(tmp_path)
    names = sorted(set(index["weight_map"].values()))
    shard = ckpt.safe_open(str(path / names[1]), framework="pt")
    tensors = {k: shard.get_tensor(k) for k in shard.keys()}
    tensors["embedding.weight"] = torch.randn(256, 32)
    ckpt.save_file(tensors, path / names[1])
    assert_refused(tmp_path, "info", path, fragments=("'embedding.weight' is stored twice",))


# ------------------------------------------------------------------------------------------ damaged files


def safetensors_damage(file: Path, kind: str) -> None:
    data = file.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    if kind == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_in_header":
        file.write_bytes(data[: 8 + header_len // 2])
    elif kind == "zero_bytes":
        file.write_bytes(b"")
    elif kind == "random":
        file.write_bytes(
            torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(1)).byte().numpy().tobytes()
        )
    elif kind == "garbage_header":
        junk = b"{not json at all" + b" " * (header_len - 16)
        file.write_bytes(data[:8] + junk + data[8 + header_len :])
    elif kind == "huge_header_length":
        file.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif kind == "extra_bytes":
        file.write_bytes(data + b"\0" * 64)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["truncated", "truncated_in_header", "zero_bytes", "random", "garbage_header", "huge_header_length", "extra_bytes"],
)
def test_damaged_safetensors_is_one_error_for_info_and_load(tmp_path, kind):
    path = make_ours(tmp_path / "ckpt")
    safetensors_damage(path / "model.safetensors", kind)
    assert_refused(tmp_path, "info", path, fragments=("model.safetensors", "truncated or corrupt"))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(path)


def released_damage(path: Path, kind: str) -> None:
    file = path / "pytorch_model.bin"
    state = released_state(path)
    if kind == "not_a_zip":
        file.write_text("this is a text file, not weights\n")
    elif kind == "truncated":
        data = file.read_bytes()
        file.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "zero_bytes":
        file.write_bytes(b"")
    elif kind == "no_model_key":
        torch.save(state["model"], file)
    elif kind == "model_is_list":
        torch.save({"model": list(state["model"].values())}, file)
    elif kind == "model_holds_numbers":
        torch.save({"model": {k: 1.5 for k in state["model"]}}, file)
    elif kind == "a_list":
        torch.save([state], file)
    elif kind == "sparse_tensor":
        state["model"]["decoder.layers.0.mixer.D"] = state["model"]["decoder.layers.0.mixer.D"].to_sparse()
        torch.save(state, file)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("not_a_zip", "truncated or corrupt"),
        ("truncated", "truncated or corrupt"),
        ("zero_bytes", "truncated or corrupt"),
        ("no_model_key", "expected a dict with key 'model'"),
        ("model_is_list", "'model' holds a list"),
        ("model_holds_numbers", "holds a float, not a tensor"),
        ("a_list", "expected a dict with key 'model', found list"),
        ("sparse_tensor", "not plain data"),
    ],
)
def test_damaged_released_weights_are_one_error_for_info_and_load(tmp_path, kind, fragment):
    path = make_released(tmp_path / "rel")
    released_damage(path, kind)
    assert_refused(tmp_path, "info", path, fragments=("pytorch_model.bin", fragment))
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_pretrained(path)


def test_legacy_format_released_weights_load(tmp_path):
    path = make_released(tmp_path / "rel")
    # Cloned: the loaded weights map the file, which is rewritten in place below.
    expected = {k: v.clone() for k, v in load_pretrained(path).state_dict().items()}
    raw = {"model": {k: v.clone() for k, v in released_state(path)["model"].items()}}
    torch.save(raw, path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert state_equal(load_pretrained(path).state_dict(), expected)
    code, out, err = run_cli("info", path)
    assert code == 0 and err == "" and "released" in out


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.int8])
def test_integer_weights_are_refused_in_both_layouts(tmp_path, dtype):
    ours = make_ours(tmp_path / "ours")
    f = ckpt.safe_open(str(ours / "model.safetensors"), framework="pt")
    state = {k: f.get_tensor(k) for k in f.keys()}
    state["layers.1.mixer.w1"] = (state["layers.1.mixer.w1"] > 0).to(dtype)
    ckpt.save_file(state, ours / "model.safetensors")
    name = str(dtype).removeprefix("torch.")
    assert_refused(tmp_path, "info", ours, fragments=("'layers.1.mixer.w1'", f"holds {name} values"))
    with pytest.raises(CheckpointError, match=f"holds {name} values"):
        load_pretrained(ours)

    rel = make_released(tmp_path / "rel")
    raw = released_state(rel)
    key = "decoder.layers.0.mixer.in_proj.weight"
    raw["model"][key] = (raw["model"][key] * 10).to(dtype)
    torch.save(raw, rel / "pytorch_model.bin")
    assert_refused(tmp_path, "info", rel, fragments=(key, f"holds {name} values"))


def test_float64_and_float16_weights_are_accepted(tmp_path):
    for dtype in (torch.float64, torch.float16):
        model = tiny()
        for p in model.parameters():
            p.data = p.data.to(dtype)
        save_pretrained(model, tmp_path / str(dtype), overwrite=True)
        assert open_checkpoint(tmp_path / str(dtype)).dtype == dtype


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_instead_of_a_file_is_refused_without_blocking(tmp_path):
    path, index = sharded(tmp_path)
    name = sorted(set(index["weight_map"].values()))[0]
    (path / name).unlink()
    os.mkfifo(path / name)
    assert_refused(tmp_path, "info", path, fragments=(name, "not a regular file"))


def test_info_reads_headers_only(tmp_path, monkeypatch):
    """`info` checks what loading checks, from the headers: no tensor is read."""
    path = make_ours(tmp_path / "ckpt", shard_bytes=40_000)
    monkeypatch.setattr(ckpt, "_read_safetensors_tensors", None)  # any call would fail
    opened = open_checkpoint(path)
    assert opened.state is None and opened.layout == "ours" and opened.dtype == torch.float32


# ------------------------------------------------------------------------------------------ one version or the other


@pytest.mark.parametrize("pinned", [True, False], ids=["proc_fd", "identity_only"])
def test_reader_rereads_a_folder_replaced_mid_read(tmp_path, monkeypatch, pinned):
    """A save replaces the folder between the reader's config and its weights. Through /proc/self/fd the
    reader still sees the old folder, whose files the writer deletes; without it, it would mix the new
    weights with the old config. Either way the change is noticed and the whole read done again."""
    if not pinned:
        monkeypatch.setattr(ckpt, "_pinned", contextlib.nullcontext)
    path = make_ours(tmp_path / "ckpt", seed=0)
    other = tiny(seed=1, d_model=16)
    real_load_config = ckpt.load_config
    swapped = []

    def load_config_then_swap(p):
        config = real_load_config(p)
        if not swapped:
            swapped.append(True)
            save_pretrained(other, path)
        return config

    monkeypatch.setattr(ckpt, "load_config", load_config_then_swap)
    loaded = load_pretrained(path)
    assert loaded.config == other.config
    assert state_equal(loaded.state_dict(), other.state_dict())

    swapped.clear()
    save_pretrained(tiny(seed=0), path)
    monkeypatch.setattr(ckpt, "READ_ATTEMPTS", 1)  # without the second read the change is an error, never a mix
    with pytest.raises(CheckpointError) as info:
        load_pretrained(path)
    assert str(info.value) == f"checkpoint {path} was replaced during each of 1 reads; is another process saving it?"


def test_missing_checkpoint_points_at_an_interrupted_save(tmp_path):
    old = make_ours(tmp_path / ".ckpt.old-otherhost-12345-abcd")
    with pytest.raises(CheckpointError, match="interrupted save left the previous version") as info:
        load_pretrained(tmp_path / "ckpt")
    assert str(old) in str(info.value)
