"""extract: exact recovery of low-rank deltas, the official file layout, merging back, loading in diffusers,
rank clamping, refusals, and the SVD math itself."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner

from lightning_tools import provenance as meta
from lightning_tools.cli import main
from lightning_tools.errors import UserError
from lightning_tools.extract import extract_lora
from lightning_tools.lora import lightning_targets
from lightning_tools.lowrank import ModuleReport, clamp_at_quantile, factorize, overall
from lightning_tools.lora import read_lora
from lightning_tools.stream import LazyTensor, write_file
from lightning_tools.tensors import SafetensorsFile, TensorSource, hash_file, read_header
from lightning_tools.tiny import make_lightning_lora, tiny_unet_config

TRUE_RANK = 3
UNCHANGED = "down_blocks.1.attentions.0.proj_in"  # a target the tuned model leaves alone
BIAS = "conv_in.bias"  # a change outside every target: no LoRA can carry it


def _unet_config(pipeline) -> dict:
    return json.loads((pipeline / "unet" / "config.json").read_text())


def _low_rank(shape: tuple[int, ...], rank: int, gen: torch.Generator) -> torch.Tensor:
    rows, cols = shape[0], math.prod(shape[1:])
    return (torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen) * 0.01).reshape(shape)


@pytest.fixture(scope="module")
def tuned_unet(tiny_pipeline, tmp_path_factory):
    """The tiny UNet plus an exact rank-3 delta on every Lightning target but one, and a changed bias.

    Named like an official file so its sampler settings are recognised."""
    source = TensorSource.open(tiny_pipeline / "unet")
    targets = set(lightning_targets(_unet_config(tiny_pipeline)))
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for key in source:
        t = LazyTensor.of(source, key)
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in targets and module != UNCHANGED:
            delta = _low_rank(t.shape, TRUE_RANK, gen)
            t = t.map(lambda w, d=delta: w + d)
        elif key == BIAS:
            t = t.map(lambda b: b + 0.01)
        tensors[key] = t
    path = tmp_path_factory.mktemp("tuned") / "tiny_lightning_4step_unet.safetensors"
    write_file(path, tensors)
    return path


@pytest.fixture(scope="module")
def exact(tiny_pipeline, tuned_unet, tmp_path_factory):
    """Extracted at the true rank in fp32, with a conv rank larger than any 3x3 conv allows."""
    out = tmp_path_factory.mktemp("exact") / "exact_lora.safetensors"
    report = extract_lora(tiny_pipeline, tuned_unet, out, rank=TRUE_RANK, conv_rank=1000, dtype="fp32")
    return out, report.to_json()


@pytest.fixture(scope="module")
def truncated(tiny_pipeline, tuned_unet, tmp_path_factory):
    """Through the CLI: below the true rank, fp16 (the default), peft format, clamped at a quantile."""
    out = tmp_path_factory.mktemp("truncated") / "truncated_lora.safetensors"
    result = CliRunner().invoke(main, ["extract", "--base", str(tiny_pipeline), "--tuned", str(tuned_unet),
                                       "--rank", "2", "--format", "peft", "--clamp-quantile", "0.999",
                                       "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return out, json.loads(result.stdout)


def _state(path) -> dict[str, torch.Tensor]:
    source = TensorSource.open(path)
    return {k: source.load(k).float() for k in source}


# --- the command on tiny models ---------------------------------------------------------------------------

def test_exact_low_rank_delta_is_recovered_at_its_rank(exact, tiny_pipeline):
    out, report = exact
    assert report["error"] < 1e-5 and report["energy"] > 1 - 1e-5
    rows = {r["module"]: r for r in report["per_module"]}
    assert len(rows) == len(lightning_targets(_unet_config(tiny_pipeline))) == report["modules"] + 1
    assert rows[UNCHANGED]["svd"] == "skipped" and report["skipped"] == 1
    for row in rows.values():
        if row["svd"] != "skipped":
            assert row["error"] < 1e-5, row
    linear = [r for r in rows.values() if len(r["shape"]) == 2]
    assert linear and all(r["rank"] == TRUE_RANK for r in linear if r["svd"] != "skipped")
    # 3x3 convs asked for rank 1000 get their full rank instead, and are counted.
    convs = [r for r in rows.values() if r["shape"][2:] == [3, 3]]
    assert convs and all(r["rank"] == min(r["shape"][0], math.prod(r["shape"][1:])) for r in convs)
    assert report["clamped_ranks"] == len(convs)
    assert report["untargeted"]["changed_tensors"] == 1 and report["untargeted"]["share_of_change"] > 0


def test_output_has_the_official_lightning_layout(exact, tiny_pipeline):
    out, report = exact
    official = make_lightning_lora(tiny_unet_config(), rank=TRUE_RANK)
    skipped = "lora_unet_" + UNCHANGED.replace(".", "_")
    ours = SafetensorsFile(out)
    assert set(ours) == {k for k in official if not k.startswith(skipped + ".")}
    for key, info in ours.items():
        if key.endswith(".lora_up.weight") and len(info.shape) == 4:
            assert info.shape[2:] == (1, 1)  # 3x3 convs: down k x k, up 1 x 1, like the official files
        if key.endswith(".alpha"):
            rank = ours[key.replace(".alpha", ".lora_down.weight")].shape[0]
            assert ours.load(key).item() == rank  # alpha = rank: scale 1
    lora = read_lora(out)
    assert lora.format == "kohya-diffusers" and not lora.unresolved


def test_metadata_explains_the_file(exact, tuned_unet):
    out, report = exact
    metadata = read_header(out)[1]
    assert metadata["modelspec.architecture"].endswith("/lora")
    sources = {s["role"]: s for s in meta.read_sources(metadata)}
    assert sources["tuned"]["sha256"] == hash_file(tuned_unet) and set(sources) == {"base", "tuned"}
    assert metadata[meta.STEPS] == "4" and report["settings"]["steps"] == 4  # from the tuned file's name
    stored = json.loads(metadata[meta.EXTRACT])
    assert stored["error"] == report["error"] and stored["rank"] == TRUE_RANK
    assert set(stored["per_module"]["rows"]) == {r["module"] for r in report["per_module"]}


def test_merging_back_reproduces_the_tuned_weights_within_the_reported_error(truncated, tuned_unet,
                                                                           tiny_pipeline, tmp_path, cli):
    out, report = truncated
    assert report["format"] == "peft" and report["dtype"] == "fp16" and report["clamp_quantile"] == 0.999
    assert 0 < report["error"] < 1 and report["energy"] < 1
    base_unet = shutil.copy(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors",
                            tmp_path / "base_unet.safetensors")
    merged_path = tmp_path / "merged_unet.safetensors"
    cli("merge", "--base", base_unet, "--lora", out, "--out", merged_path, ok=True)
    merged, tuned, base = _state(merged_path), _state(tuned_unet), _state(base_unet)
    for row in report["per_module"]:
        key = row["module"] + ".weight"
        delta = tuned[key] - base[key]
        if row["svd"] == "skipped":
            assert torch.equal(merged[key], base[key])
            continue
        actual = float((merged[key] - tuned[key]).norm() / delta.norm())
        assert actual == pytest.approx(row["error"], rel=1e-3, abs=1e-5), row["module"]


@pytest.mark.parametrize("which", ["exact", "truncated"])
def test_diffusers_loads_and_fuses_the_extracted_lora(which, request, tiny_pipeline, tuned_unet):
    from diffusers import StableDiffusionXLPipeline

    out, report = request.getfixturevalue(which)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline, local_files_only=True)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused, tuned = pipe.unet.state_dict(), _state(tuned_unet)
    for row in report["per_module"]:
        key = row["module"] + ".weight"
        gap = float((fused[key] - tuned[key]).norm() / (tuned[key] - base[key]).norm()) if row["rank"] else 0.0
        assert gap == pytest.approx(row["error"], rel=1e-3, abs=1e-5), row["module"]
        if not row["rank"]:
            assert torch.equal(fused[key], base[key])


def test_different_architectures_are_one_line_errors(tiny_pipeline, tuned_unet, tmp_path, cli):
    from diffusers import UNet2DConditionModel

    wider = UNet2DConditionModel(**(tiny_unet_config() | {"block_out_channels": [16, 32, 64]}))
    wide_path = tmp_path / "wider_unet.safetensors"
    write_file(wide_path, {k: LazyTensor("F32", tuple(v.shape), lambda v=v: v.detach())
                              for k, v in wider.state_dict().items()})
    result = cli("extract", "--base", tiny_pipeline, "--tuned", wide_path, "--rank", 2,
                 "--out", tmp_path / "x.safetensors", ok=False)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "same architecture" in result.stderr and str(wide_path) in result.stderr

    source = TensorSource.open(tuned_unet)
    partial = tmp_path / "partial_unet.safetensors"
    write_file(partial, {k: LazyTensor.of(source, k) for k in source if k != "mid_block.resnets.0.conv1.weight"})
    result = cli("extract", "--base", tiny_pipeline, "--tuned", partial, "--rank", 2,
                 "--out", tmp_path / "x.safetensors", ok=False)
    assert "lacks weight mid_block.resnets.0.conv1.weight" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_existing_output_is_refused_before_any_work(tiny_pipeline, tuned_unet, tmp_path, cli):
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"keep me")
    result = cli("extract", "--base", tiny_pipeline, "--tuned", tuned_unet, "--rank", 2, "--out", out, ok=False)
    assert "--overwrite" in result.stderr and out.read_bytes() == b"keep me"
    assert cli("extract", "--base", tiny_pipeline, "--tuned", tuned_unet, "--rank", 0, "--out", out).exit_code == 2


# --- the math -------------------------------------------------------------------------------------------------

def _with_spectrum(rows: int, cols: int, singular_values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u = torch.linalg.qr(torch.randn(rows, k, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(cols, k, generator=gen))[0]
    return (u * singular_values) @ v.T


@pytest.mark.parametrize("rows, cols, rank, method", [(300, 200, 8, "randomized"), (60, 200, 40, "exact")])
def test_truncation_is_near_optimal_and_reports_its_error(rows, cols, rank, method):
    spectrum = torch.arange(1, min(rows, cols) + 1, dtype=torch.float32) ** -0.8  # slow decay, like fine-tunes
    delta = _with_spectrum(rows, cols, spectrum)
    up, down, report = factorize(delta, rank, dtype=torch.float32)
    optimum = math.sqrt(float(spectrum[rank:].square().sum() / spectrum.square().sum()))
    actual = float((delta - up @ down).norm() / delta.norm())
    assert report.svd == method and up.shape == (rows, rank) and down.shape == (rank, cols)
    assert report.error == pytest.approx(actual, rel=1e-4)
    assert optimum * (1 - 1e-4) <= actual <= 1.01 * optimum
    assert report.error ** 2 + report.energy == pytest.approx(1, abs=1e-4)


def test_conv_factors_have_the_official_shapes_and_compose_to_the_delta():
    gen = torch.Generator().manual_seed(1)
    delta = _low_rank((16, 8, 3, 3), 2, gen)
    up, down, report = factorize(delta, 2, dtype=torch.float32)
    assert down.shape == (2, 8, 3, 3) and up.shape == (16, 2, 1, 1)
    x = torch.randn(1, 8, 6, 6, generator=gen)
    conv = torch.nn.functional.conv2d
    torch.testing.assert_close(conv(conv(x, down, padding=1), up), conv(x, delta, padding=1), rtol=0, atol=1e-5)
    assert report.error < 1e-5


def test_clamping_clips_the_largest_values_and_the_error_says_so():
    gen = torch.Generator().manual_seed(2)
    delta = torch.randn(64, 48, generator=gen) ** 3  # heavy tails
    _, _, plain = factorize(delta, 8, dtype=torch.float32)
    up, down, clamped = factorize(delta, 8, clamp_quantile=0.9, dtype=torch.float32)
    values = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
    assert (values == values.max()).sum() >= 0.05 * values.numel()  # the top ~10% now sit at the limit
    assert clamped.error > plain.error
    a, b = clamp_at_quantile(torch.tensor([[1.0, -100.0]]), torch.tensor([[2.0], [3.0]]), 0.75)
    assert a.tolist() == [[1.0, -3.0]] and b.tolist() == [[2.0], [3.0]]


def test_overall_error_weights_modules_by_their_change_and_counts_skipped_ones_as_missed():
    reports = [ModuleReport("a", (4, 4), 2, 3.0, 0.1, 0.99, "exact"),
               ModuleReport("b", (4, 4), 0, 4.0, 1.0, 0.0, "skipped")]
    result = overall(reports)
    assert result["error"] == pytest.approx(math.sqrt((0.3 ** 2 + 4.0 ** 2) / 25))
    assert result["energy"] == pytest.approx(0.99 * 9 / 25)


def test_bad_options_are_refused(tiny_pipeline, tuned_unet, tmp_path):
    for kwargs, message in [({"format": "civitai"}, "kohya or peft"), ({"clamp_quantile": 1.5}, r"\(0, 1\]"),
                            ({"dtype": "int8"}, "dtype")]:
        with pytest.raises(UserError, match=message):
            extract_lora(tiny_pipeline, tuned_unet, tmp_path / "x.safetensors", rank=2, **kwargs)
