"""lora resize and lora combine: resizing to the same rank is lossless, lower ranks report the error the files
really have (near the SVD optimum) and load in diffusers, dynamic ranks follow the spectrum; combining equals
diffusers fusing the inputs at their strengths (`set_adapters`), any variant (a LoHa written by lycoris-lora)
combines, and what cannot be resized or combined is refused in one line."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_tools import families as fams
from lightning_tools import provenance as meta
from lightning_tools.blocks import block_of
from lightning_tools.lora import lightning_targets
from lightning_tools.lora_tools import choose_rank, spectrum
from lightning_tools.tensors import read_header
from lightning_tools.tiny import tiny_unet_config
from lora_fixtures import (LYCORIS_PRESET, kohya_te_lora, kohya_unet_lora, load_models, lycoris_network,
                           peft_lora_via_diffusers, peft_via_diffusers, write)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FP32 = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def loras(tiny_pipeline, tmp_path_factory):
    """A rank-4 kohya LoRA on the UNet (fp16, alpha 2) and both text encoders (fp32, alpha 2), and a second
    LoRA as peft, written by diffusers' save_lora_weights."""
    folder = tmp_path_factory.mktemp("lora-tools")
    first = write(kohya_unet_lora(tiny_pipeline, alpha=2.0, seed=3) | kohya_te_lora(tiny_pipeline, seed=4),
                  folder / "first.safetensors")
    second_kohya = write(kohya_unet_lora(tiny_pipeline, seed=5), folder / "second_kohya.safetensors")
    return {"first": first, "second": peft_via_diffusers(tiny_pipeline, second_kohya, folder / "peft")}


def _modules(path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """stem -> (up, down, scale) of a kohya file, read with safetensors alone."""
    tensors = load_file(str(path))
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            up = tensors[stem + ".lora_up.weight"].float()
            up = up.reshape(up.shape[0], -1)
            alpha = float(tensors[stem + ".alpha"]) if stem + ".alpha" in tensors else down.shape[0]
            out[stem] = (up, down.float().reshape(down.shape[0], -1), alpha / down.shape[0])
    return out


def _stem(label: str) -> str:
    """The kohya key stem of a module as the reports name it."""
    component, _, module = label.partition(".")
    prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}.get(component)
    return prefix + module.replace(".", "_") if prefix else "lora_unet_" + label.replace(".", "_")


def _delta(module) -> torch.Tensor:
    up, down, scale = module
    return scale * up @ down


def _fused(pipeline, files_and_scales) -> dict[str, dict[str, torch.Tensor]]:
    """What diffusers merges: the LoRAs loaded as adapters, set to their scales, fused."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline, local_files_only=True)
    names = []
    for i, (path, _) in enumerate(files_and_scales):
        names.append(f"a{i}")
        pipe.load_lora_weights(str(path), adapter_name=names[-1])
    if names:
        pipe.set_adapters(names, [s for _, s in files_and_scales])
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}


# --- resize -------------------------------------------------------------------------------------------------------

def test_resizing_to_the_same_rank_is_lossless(loras, tmp_path, cli):
    out = tmp_path / "same.safetensors"
    report = json.loads(cli("lora", "resize", loras["first"], "--rank", 4, "--out", out, "--json", ok=True).stdout)
    ours, source = load_file(str(out)), load_file(str(loras["first"]))
    assert ours.keys() == source.keys()
    assert all(ours[k].dtype == source[k].dtype and torch.equal(ours[k], source[k]) for k in source)
    assert report["kept"] == report["modules"] == len(source) // 3 and report["error"] == 0


def test_a_lower_rank_reports_the_error_the_file_has_near_the_optimum(loras, tiny_pipeline, tmp_path, cli):
    out = tmp_path / "rank2.safetensors"
    report = json.loads(cli("lora", "resize", loras["first"], "--rank", 2, "--dtype", "fp32", "--out", out, "--json",
                            ok=True).stdout)
    assert report["kept"] == 0 and report["ranks"] == {"2": report["modules"]}
    rows = {_stem(r["module"]): r for r in report["per_module"]}
    source, ours = _modules(loras["first"]), _modules(out)
    assert len(rows) == len(source) == len(ours)
    for stem, module in source.items():
        delta, resized = _delta(module), _delta(ours[stem])
        actual = float((delta - resized).norm() / delta.norm())
        s = torch.linalg.svdvals(delta)
        optimum = float(s[2:].norm() / s.norm())
        row = rows[stem]
        assert row["rank"] == 2 and actual == pytest.approx(row["error"], rel=1e-3, abs=1e-6), stem
        assert optimum * (1 - 1e-4) <= actual <= optimum * 1.02 + 1e-6, stem
    assert 0 < report["error"] < 1

    # diffusers fuses the resized file to within the reported error of the source's fusion
    base = _fused(tiny_pipeline, [])
    full, small = _fused(tiny_pipeline, [(loras["first"], 1.0)]), _fused(tiny_pipeline, [(out, 1.0)])
    changed = [(c, k) for c in COMPONENTS for k in base[c] if not torch.equal(full[c][k], base[c][k])]
    squared = sum(float((full[c][k] - base[c][k]).square().sum()) for c, k in changed)
    gap = sum(float((small[c][k] - full[c][k]).square().sum()) for c, k in changed)
    assert math.sqrt(gap / squared) == pytest.approx(report["error"], rel=1e-3)


def test_spectrum_and_dynamic_ranks():
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(40, 4, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(30, 4, generator=gen))[0]
    s = torch.tensor([8.0, 4.0, 2.0, 1.0])
    up, down = u * s.sqrt(), (v * s.sqrt()).T
    torch.testing.assert_close(spectrum(up, down), s, rtol=1e-5, atol=1e-5)
    # Frobenius fraction kept by 1, 2, 3 values: 0.868, 0.970, 0.994; sums: 0.533, 0.8, 0.933
    cases = [("sv_fro", 0.9, 2), ("sv_fro", 0.99, 3), ("sv_fro", 1.0, 4), ("sv_cumulative", 0.8, 2),
             ("sv_cumulative", 0.9, 3), ("sv_ratio", 3, 2), ("sv_ratio", 5, 3), ("sv_ratio", 1, 1), (None, None, 64)]
    for mode, param, expected in cases:
        assert choose_rank(s, 64, mode, param) == min(expected, 4), (mode, param)
    assert choose_rank(s, 2, "sv_fro", 0.99) == 2  # --rank caps


def test_dynamic_resize_of_a_file_keeps_what_each_spectrum_needs(tmp_path, cli):
    """Three modules with the spectrum 8, 4, 2, 1 at different scales: sv_fro 0.95 keeps 2 of each."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(n, s) for n, s in lightning_targets(tiny_unet_config()).items() if len(s) == 2 and min(s) >= 8][:3]
    tensors = {}
    for i, (name, (rows, cols)) in enumerate(shapes):
        u = torch.linalg.qr(torch.randn(rows, 4, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(cols, 4, generator=gen))[0]
        s = torch.tensor([8.0, 4.0, 2.0, 1.0]) * 10 ** i
        stem = "lora_unet_" + name.replace(".", "_")
        tensors |= {stem + ".lora_up.weight": (u * s.sqrt()).contiguous(), stem + ".lora_down.weight": (v * s.sqrt()).T.contiguous(),
                    stem + ".alpha": torch.tensor(4.0)}
    src = tmp_path / "designed.safetensors"
    save_file(tensors, str(src))
    report = json.loads(cli("lora", "resize", src, "--rank", 3, "--dynamic", "sv_fro", "--dynamic-param", 0.95,
                            "--dtype", "fp32", "--out", tmp_path / "dyn.safetensors", "--json", ok=True).stdout)
    assert report["ranks"] == {"2": 3} and report["dynamic"] == "sv_fro"
    assert report["error"] == pytest.approx(math.sqrt(5 / 85), rel=1e-4)  # the two smallest of 64+16+4+1
    result = cli("lora", "resize", src, "--rank", 3, "--dynamic", "sv_fro", "--dynamic-param", 1.5,
                 "--out", tmp_path / "x.safetensors", ok=False)
    assert result.exit_code == 2 and "a fraction in (0, 1]" in result.stderr


# --- combine ------------------------------------------------------------------------------------------------------

def test_combining_equals_diffusers_fusing_both_at_their_strengths(loras, tiny_pipeline, tmp_path, cli):
    out = tmp_path / "combined.safetensors"
    report = json.loads(cli("lora", "combine", loras["first"], loras["second"], "--strength", 0.8, "--strength",
                            -0.4, "--rank", 8, "--dtype", "fp32", "--format", "peft", "--out", out, "--json",
                            ok=True).stdout)
    assert report["error"] < 1e-5 and report["strengths"] == [0.8, -0.4]
    ours = _fused(tiny_pipeline, [(out, 1.0)])
    reference = _fused(tiny_pipeline, [(loras["first"], 0.8), (loras["second"], -0.4)])
    for c in COMPONENTS:
        for key, expected in reference[c].items():
            torch.testing.assert_close(ours[c][key], expected, **FP32, msg=f"{c}/{key}")
    metadata = read_header(out)[1]
    stored = json.loads(metadata[meta.LOWRANK])
    assert set(stored["per_module"]["rows"]) == {r["module"] for r in report["per_module"]}
    assert [(s["role"], s["strength"]) for s in meta.read_sources(metadata)] == [("lora", 0.8), ("lora", -0.4)]


def test_a_lycoris_loha_combines_with_a_lora(loras, tiny_pipeline, tmp_path, cli):
    """A LoHa written by lycoris-lora (full-rank deltas) and a LoRA combined at full rank merge like the two
    merged one after the other; resize refuses the LoHa in one line."""
    preset = tmp_path / "preset.toml"
    preset.write_text(LYCORIS_PRESET)
    models = load_models(tiny_pipeline)
    network = lycoris_network(copy.deepcopy(models), preset, "loha", alpha=4.0, conv_alpha=4.0)
    loha = tmp_path / "loha.safetensors"
    network.save_weights(str(loha), torch.float32, {})

    combined = tmp_path / "combined.safetensors"
    cli("lora", "combine", loha, loras["first"], "--strength", 0.7, "--strength", 0.5, "--rank", 100000,
        "--dtype", "fp32", "--out", combined, ok=True)
    one, two = tmp_path / "one", tmp_path / "two"
    cli("merge", "--base", tiny_pipeline, "--lora", combined, "--out", one, ok=True)
    cli("merge", "--base", tiny_pipeline, "--lora", loha, "--lora", loras["first"], "--strength", 0.7, "--strength",
        0.5, "--out", two, ok=True)
    for c in COMPONENTS:
        got = load_file(str(next((one / c).glob("*.safetensors"))))
        for key, expected in load_file(str(next((two / c).glob("*.safetensors")))).items():
            torch.testing.assert_close(got[key], expected, **FP32, msg=f"{c}/{key}")

    refused = cli("lora", "resize", loha, "--rank", 2, "--out", tmp_path / "r.safetensors", ok=False)
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "LoHa" in refused.stderr and "LoRA and LoCon modules only" in refused.stderr


def test_combine_per_block_leaves_out_the_zeroed_blocks(loras, tmp_path, cli):
    out = tmp_path / "no-in.safetensors"
    report = json.loads(cli("lora", "combine", loras["first"], "--rank", 2, "--blocks", "IN:0,BASE:0", "--out", out,
                            "--json", ok=True).stdout)
    config = tiny_unet_config()
    modules = [r["module"] for r in report["per_module"]]
    assert modules and all(block_of("unet", m, config) not in ("BASE", *[f"IN{i:02d}" for i in range(9)])
                           for m in modules)
    assert not any(k.startswith(("lora_te", "lora_unet_down_blocks")) for k in load_file(str(out)))


def test_dora_and_stacked_accelerators_are_refused(tiny_pipeline, tiny_lora, tmp_path, cli):
    dora, _ = peft_lora_via_diffusers(tiny_pipeline, tmp_path / "dora", use_dora=True)
    for args in (["resize", dora, "--rank", 2], ["combine", dora, "--rank", 2]):
        result = cli("lora", *args, "--out", tmp_path / "x.safetensors", ok=False)
        assert result.exit_code == 1 and "DoRA" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    named = []
    for family in ("lightning", "hyper_sd"):
        named.append(tmp_path / fams.family(family).find(4, "lora").name)
        shutil.copy(tiny_lora, named[-1])
    result = cli("lora", "combine", *named, "--rank", 2, "--out", tmp_path / "x.safetensors", ok=False)
    assert "stacks 2 few-step accelerators" in result.stderr and "--allow-stacking" in result.stderr
    cli("lora", "combine", *named, "--rank", 2, "--allow-stacking", "--out", tmp_path / "x.safetensors", ok=True)
