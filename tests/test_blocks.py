"""Per-block strengths: SDXL's 20 block names mapped onto diffusers keys, checked against the index formulas of
kohya's `get_lbw_block_index` applied to diffusers names (not against our single-file key map), and `--blocks`
parsing."""

from __future__ import annotations

import re

import pytest

from lightning_tools.blocks import BLOCKS, block_of, parse_blocks
from lightning_tools.errors import UsageError
from lightning_tools.sdxl.detect import base_config, expected_shapes
from lightning_tools.tiny import tiny_unet_config

_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.")


def kohya_block(key: str) -> str:
    """The block of a diffusers UNet key by kohya's SD formulas (networks/svd_merge_lora.py): down_blocks.i
    resnet/attention j is input block 3i + j + 1, its downsampler 3(i + 1); up_blocks.i resnet/attention j is
    output block 3i + j, its upsampler 3i + 2. Time and label embeddings go with IN00 (kohya), conv_norm_out and
    conv_out with OUT08 (supermerger)."""
    if key.startswith(("conv_in.", "time_embedding.", "add_embedding.")):
        return "IN00"
    if key.startswith(("conv_norm_out.", "conv_out.")):
        return "OUT08"
    if key.startswith("mid_block."):
        return "MID"
    if m := _DOWN.match(key):
        i, kind, j = int(m[1]), m[2], int(m[3])
        return f"IN{3 * (i + 1) if kind == 'downsamplers' else 3 * i + j + 1:02d}"
    if m := _UP.match(key):
        i, kind, j = int(m[1]), m[2], int(m[3])
        return f"OUT{3 * i + 2 if kind == 'upsamplers' else 3 * i + j:02d}"
    raise AssertionError(f"no rule for {key}")


@pytest.mark.parametrize("config", [base_config("unet"), tiny_unet_config()], ids=["sdxl", "tiny"])
def test_every_unet_key_lies_in_the_block_kohya_puts_it_in(config):
    keys = list(expected_shapes("unet", config))
    blocks = {key: block_of("unet", key, config) for key in keys}
    assert blocks == {key: kohya_block(key) for key in keys}
    assert set(blocks.values()) == set(BLOCKS) - {"BASE"}  # all 19 UNet blocks are used


def test_text_encoders_are_base_and_the_vae_has_no_block():
    config = base_config("unet")
    assert block_of("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", config) == "BASE"
    assert block_of("text_encoder_2", "text_projection.weight", config) == "BASE"
    assert block_of("vae", "decoder.conv_in.weight", config) is None
    weights = parse_blocks("BASE:0,IN:0.5")
    assert weights.of("vae", "decoder.conv_in.weight", config) == 1.0
    assert weights.of("text_encoder", "text_model.final_layer_norm.weight", config) == 0.0
    assert weights.of("unet", "down_blocks.1.attentions.0.proj_in.weight", config) == 0.5


def test_groups_single_blocks_and_later_pairs_winning():
    weights = parse_blocks("IN:0.5, MID:1 ,OUT:0.8,IN04:0.3,base=0,m00:2").weights
    assert weights["BASE"] == 0 and weights["MID"] == 2 and weights["IN04"] == 0.3
    assert [weights[f"IN{i:02d}"] for i in (0, 3, 8)] == [0.5, 0.5, 0.5]
    assert all(weights[f"OUT{i:02d}"] == 0.8 for i in range(9))
    assert parse_blocks("IN04:0.3,IN:1").weights["IN04"] == 1  # the later group wins
    assert parse_blocks("OUT4:0").weights["OUT04"] == 0
    assert parse_blocks("") is None and parse_blocks(None) is None


def test_twenty_numbers_follow_kohyas_order():
    numbers = [i / 10 for i in range(20)]
    for spec in (",".join(map(str, numbers)), str(numbers)):
        weights = parse_blocks(spec)
        assert [weights.weights[b] for b in BLOCKS] == numbers
        assert weights.weights["BASE"] == 0 and weights.weights["IN00"] == 0.1 and weights.weights["MID"] == 1.0
        assert weights.weights["OUT08"] == 1.9
    assert parse_blocks(",".join(["1"] * 20)).identity and not parse_blocks("OUT08:0.9").identity


@pytest.mark.parametrize("spec, message", [
    (",".join(["1"] * 19), "19 numbers; give 20"),
    ("IN09:1", "no block IN09"),
    ("FOO:1", "no block FOO"),
    ("IN:high", "'IN:high' is not NAME:VALUE"),
    ("IN:nan", "is not NAME:VALUE"),
    ("[1, 2", "not a JSON list"),
])
def test_bad_specs_are_usage_errors_that_name_the_fix(spec, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_blocks(spec)


def test_describe_groups_what_agrees():
    assert parse_blocks("IN:0.5,OUT05:0").describe() == \
        "BASE 1, IN 0.5, MID 1, OUT00 1, OUT01 1, OUT02 1, OUT03 1, OUT04 1, OUT05 0, OUT06 1, OUT07 1, OUT08 1"
