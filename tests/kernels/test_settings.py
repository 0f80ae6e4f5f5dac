"""The kernel settings object: frozen, validated, changed only inside use_settings."""

import dataclasses

import pytest

from blackmamba.kernels import KernelSettings, get_settings, use_settings


def test_use_settings_changes_then_restores():
    before = get_settings()
    with use_settings(decode_tokens=0, scan_segments=3) as inside:
        assert get_settings() is inside
        assert (inside.decode_tokens, inside.scan_segments) == (0, 3)
        assert inside.scan_chunk == before.scan_chunk  # the fields not named keep their values
        with use_settings(decode_tokens=16):
            assert (get_settings().decode_tokens, get_settings().scan_segments) == (16, 3)
        assert get_settings().decode_tokens == 0
    assert get_settings() is before


def test_use_settings_restores_after_an_error():
    before = get_settings()
    with pytest.raises(RuntimeError), use_settings(fuse_router=False):
        raise RuntimeError("boom")
    assert get_settings() is before


def test_settings_are_frozen():
    settings = get_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.decode_tokens = 0
    with pytest.raises(TypeError):
        settings.moe_fc1_tiles[1]["BK"] = 32


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"decode_token": 1}, "unknown kernel setting.*decode_token"),
        ({"grouped_gemm": "cutlass"}, "grouped_gemm"),
        ({"scan_chunk": 6}, "scan_chunk"),
        ({"scan_segments": 0}, "scan_segments"),
        ({"scan_fwd_config": (8,)}, "scan_fwd_config"),
        ({"scan_bwd_seg_config": (8, 0)}, "scan_bwd_seg_config"),
        ({"decode_tokens": -1}, "decode_tokens"),
        ({"gemv_max_rows": -1}, "gemv_max_rows"),
        ({"pdl_max_rows": -1}, "pdl_max_rows"),
        ({"ssm_fused_dt_max_rows": -1}, "ssm_fused_dt_max_rows"),
        ({"ssm_update_tiles": {16: dict(BLOCK_D=32, ROWS=0, num_warps=4)}}, "ssm_update_tiles"),
        ({"ssm_update_tiles": {16: dict(BLOCK_D=32, num_warps=4)}}, "ssm_update_tiles"),
        ({"gemv_programs_per_sm": 0}, "gemv_programs_per_sm"),
        ({"moe_fc2_splits": {1: 0}}, "moe_fc2_splits"),
    ],
)
def test_bad_settings_are_named(changes, match):
    before = get_settings()
    with pytest.raises(ValueError, match=match), use_settings(**changes):
        pass
    assert get_settings() is before


def test_tile_tables_given_as_dicts_are_frozen():
    table = {1: {"BN": 16, "BK": 64, "num_warps": 4, "num_stages": 2}}
    settings = KernelSettings(moe_fc2_tiles=table)
    table[1]["BK"] = 128
    assert settings.moe_fc2_tiles[1]["BK"] == 64
