"""LyCORIS variants and DoRA in the LoRA normal form, checked against the tools that write them.

Every file here is written by lycoris-lora (its kohya entry point, as sd-scripts trains with it) or by peft
through diffusers' `save_lora_weights`; the merged weights we compute are compared tensor by tensor with the
weights lycoris (`merge_to`, and its forward pass) and peft (`merge`) compute from the same adapters.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lightning_tools.errors import UserError
from lightning_tools.convert import convert_lora
from lightning_tools.lora import (FullDiff, Hadamard, Kronecker, LowRank, add_lora, add_lora_bias,
                                  modules_of_keys, read_lora)
from lightning_tools.merge import merge
from lightning_tools.sdxl.keys import hf_clip_key
from lightning_tools.tensors import TensorSource
from lora_fixtures import (LYCORIS_PRESET, load_models, lycoris_network, peft_lora_via_diffusers,
                           to_single_file_names, unet_config, write)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# lycoris-lora 4.1.3's `merge_to` applies alpha / dim twice to LoHa and LoKr (`get_diff_weight` scales what
# `get_weight` already scaled), unlike its own forward pass and ComfyUI; with alpha = dim both agree, so the
# tensor-by-tensor comparison with `merge_to` uses that, and
# `test_merged_layers_compute_what_lycoris_applied_layers_compute` checks alpha != dim against the forward pass.
VARIANTS = {
    # name: (algo, options, strength, kohya suffixes the file must hold)
    "locon": ("locon", {}, 0.7, {"lora_down.weight", "lora_up.weight", "alpha"}),
    "locon-tucker": ("locon", {"use_tucker": True}, -0.5, {"lora_mid.weight"}),
    "loha": ("loha", {"alpha": 4.0, "conv_alpha": 4.0}, 0.7, {"hada_w1_a", "hada_w2_b"}),
    "loha-tucker": ("loha", {"use_tucker": True, "alpha": 4.0, "conv_alpha": 4.0}, 1.0, {"hada_t1", "hada_t2"}),
    "lokr": ("lokr", {"dim": 2, "alpha": 2.0, "conv_dim": 2, "conv_alpha": 2.0}, 0.7,
             {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}),
    "lokr-both-tucker": ("lokr", {"dim": 1, "alpha": 1.0, "conv_dim": 1, "conv_alpha": 1.0, "decompose_both": True,
                                  "use_tucker": True}, 1.0, {"lokr_w1_a", "lokr_w1_b", "lokr_t2"}),
    "full": ("full", {}, 0.6, {"diff", "diff_b"}),
    "locon-dora": ("locon", {"dora_wd": True}, 1.0, {"dora_scale"}),
    "loha-dora-per-input": ("loha", {"dora_wd": True, "wd_on_output": False, "alpha": 4.0, "conv_alpha": 4.0}, 1.0,
                            {"dora_scale"}),
    "lokr-dora": ("lokr", {"dora_wd": True, "dim": 2, "alpha": 2.0, "conv_dim": 1, "conv_alpha": 1.0,
                           "use_tucker": True}, 1.0, {"dora_scale", "lokr_t2"}),
}
FACTORS = {"locon": LowRank, "loha": Hadamard, "lokr": Kronecker, "full": FullDiff}


@pytest.fixture(scope="module")
def models(tiny_pipeline):
    """The tiny pipeline's UNet and text encoders; deep-copy before changing them."""
    return load_models(tiny_pipeline)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("lycoris") / "preset.toml"
    path.write_text(LYCORIS_PRESET)
    return path


def _targets(pipeline):
    return {c: modules_of_keys(TensorSource.open(pipeline / c), c) for c in COMPONENTS}


def _read(path, pipeline):
    return read_lora(path, _targets(pipeline), unet_config(pipeline))


def _weights(models) -> dict[tuple[str, str], torch.Tensor]:
    """(component, key in normal form) -> a copy of the tensor."""
    return {(c, k if c == "unet" else hf_clip_key(k)): t.detach().clone()
            for c, model in models.items() for k, t in model.state_dict().items()}


def _suffixes(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k.partition(".")[2] for k in f.keys()}


def _error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| relative to max |reference|."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def lycoris_file(models, preset, tmp_path_factory):
    """variant -> (file written by lycoris, the weights lycoris merges from it at the variant's strength, the base
    weights), each made once."""
    folder = tmp_path_factory.mktemp("lycoris-files")
    made = {}

    def get(variant: str):
        if variant not in made:
            algo, options, strength, _ = VARIANTS[variant]
            changed = copy.deepcopy(models)
            base = _weights(changed)
            network = lycoris_network(changed, preset, algo, **options)
            path = folder / f"{variant}.safetensors"
            network.save_weights(str(path), torch.float32, {})
            network.restore()
            for module in network.loras:
                module.merge_to(strength)
            made[variant] = path, _weights(changed), base
        return made[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_lycoris_variant_merges_to_what_lycoris_computes(variant, lycoris_file, tiny_pipeline):
    algo, options, strength, suffixes = VARIANTS[variant]
    path, expected, base = lycoris_file(variant)
    assert suffixes <= _suffixes(path)
    lora = _read(path, tiny_pipeline)
    assert lora.format == "kohya-diffusers" and not lora.unresolved
    assert {m.component for m in lora.modules} == set(COMPONENTS)
    assert all(isinstance(m.factors, FACTORS[algo]) for m in lora.modules)
    assert all((m.dora is not None) == bool(options.get("dora_wd")) for m in lora.modules)
    worst, merged = 0.0, 0
    for m in lora.modules:
        key = (m.component, m.module + ".weight")
        ours = add_lora(base[key].clone(), m, strength)
        assert not torch.equal(expected[key], base[key]), f"lycoris left {key} unchanged"
        worst = max(worst, _error(ours, expected[key]))
        merged += 1
        if m.bias is not None:
            key = (m.component, m.module + ".bias")
            worst = max(worst, _error(add_lora_bias(base[key].clone(), m, strength), expected[key]))
            merged += 1
    print(f"{variant}: {merged} tensors at strength {strength}, max |ours - lycoris| / max |lycoris| = {worst:.1e}")
    assert worst < 1e-5
    if algo == "full":
        assert merged > len(lora.modules)  # diff_b biases merged too


@pytest.mark.parametrize("variant", ["loha-tucker", "lokr-both-tucker", "locon-dora", "full"])
def test_merged_layers_compute_what_lycoris_applied_layers_compute(variant, models, preset, tiny_pipeline,
                                                                   tmp_path):
    """With alpha != dim everywhere (and full's biases), each layer with our merged weight gives the output of
    that layer with lycoris applied (its forward pass, not `merge_to`)."""
    algo, options, _, _ = VARIANTS[variant]
    options = options | {"alpha": 3.0, "conv_alpha": 0.5}
    models = copy.deepcopy(models)
    base = _weights(models)
    network = lycoris_network(models, preset, algo, seed=1, **options)
    path = tmp_path / f"{variant}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    applied = {module.lora_name: module for module in network.loras}
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for m in _read(path, tiny_pipeline).modules:
        layer = applied[m.name]
        original = layer.org_module[0]
        weight = add_lora(base[(m.component, m.module + ".weight")].clone(), m)
        bias = base.get((m.component, m.module + ".bias"))
        bias = add_lora_bias(bias.clone(), m) if m.bias is not None else bias
        if isinstance(original, torch.nn.Linear):
            x = torch.randn(3, original.in_features, generator=gen)
            ours = F.linear(x, weight, bias)
        else:
            x = torch.randn(2, original.in_channels, 8, 8, generator=gen)
            ours = F.conv2d(x, weight, bias, original.stride, original.padding, original.dilation, original.groups)
        with torch.no_grad():
            worst = max(worst, _error(ours, layer(x)))
    print(f"{variant}: alpha != dim, max |ours - lycoris forward| / max |lycoris forward| = {worst:.1e}")
    assert worst < 1e-5


def test_merge_bakes_lycoris_files_into_the_base_like_lycoris(lycoris_file, tiny_pipeline, tmp_path):
    """The merge command on a full-difference file (weights and biases, strength 0.6) and on LoHa with DoRA per
    input column (conv factors stored flattened) in single-file names: every tensor of the output is what
    lycoris merges, untouched ones included."""
    for variant in ("full", "loha-dora-per-input"):
        path, expected, _ = lycoris_file(variant)
        if variant != "full":
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            path = write(to_single_file_names(tensors, unet_config(tiny_pipeline)), tmp_path / "sf.safetensors")
            assert _read(path, tiny_pipeline).format == "kohya-single-file"
        out = tmp_path / f"merged-{variant}"
        report = merge(tiny_pipeline, [path], out, strengths=[VARIANTS[variant][2]], to="diffusers")
        assert report.unmatched_modules == []
        worst, compared = 0.0, set()
        for c in COMPONENTS:
            source = TensorSource.open(out / c)
            for key in source:
                normal = (c, key if c == "unet" else hf_clip_key(key))
                if normal in expected and source[key].is_float:
                    worst = max(worst, _error(source.load(key), expected[normal]))
                    compared.add(normal)
        assert compared == {k for k, t in expected.items() if t.is_floating_point()}
        print(f"merge {variant}: {report.tensors_merged} tensors merged, max relative difference {worst:.1e}")
        assert worst < 1e-5


@pytest.mark.parametrize("config", [{"use_dora": True}, {"lora_bias": True}])
def test_peft_dora_and_lora_bias_merge_like_peft(config, tiny_pipeline, tmp_path):
    from peft.tuners.lora import LoraLayer

    path, models = peft_lora_via_diffusers(tiny_pipeline, tmp_path, **config)
    lora = _read(path, tiny_pipeline)
    assert lora.format == "peft" and {m.component for m in lora.modules} == {"unet", "text_encoder"}
    assert all((m.dora is not None) == ("use_dora" in config) for m in lora.modules)
    assert all((m.bias is not None) == ("lora_bias" in config) for m in lora.modules)
    ours = {(m.component, m.module if m.component == "unet" else hf_clip_key(m.module + ".weight")[:-7]): m
            for m in lora.modules}
    worst, layers = 0.0, 0
    for component in ("unet", "text_encoder"):
        for name, layer in models[component].named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            original = layer.get_base_layer()
            module = ours[(component, name if component == "unet" else hf_clip_key(name + ".weight")[:-7])]
            weight = add_lora(original.weight.detach().clone(), module)
            bias = add_lora_bias(original.bias.detach().clone(), module) if module.bias is not None else None
            layer.merge()  # peft's merge, what merge_and_unload runs layer by layer
            worst = max(worst, _error(weight, original.weight.detach()))
            if bias is not None:
                worst = max(worst, _error(bias, original.bias.detach()))
            layers += 1
    assert layers == len(lora.modules)
    print(f"peft {config}: {layers} layers, max |ours - peft| / max |peft| = {worst:.1e}")
    assert worst < 1e-5


def test_dora_strength_moves_linearly_from_the_base_to_the_dora_merge(lycoris_file, tiny_pipeline):
    """Our strength for DoRA (ComfyUI's): 0 keeps the weight, 1 is lycoris' merge, and in between is linear."""
    path, _, base = lycoris_file("locon-dora")
    for m in _read(path, tiny_pipeline).modules[:20]:
        weight = base[(m.component, m.module + ".weight")]
        full = add_lora(weight.clone(), m, 1.0)
        assert torch.equal(add_lora(weight.clone(), m, 0.0), weight)
        torch.testing.assert_close(add_lora(weight.clone(), m, 0.25), weight + 0.25 * (full - weight))
        torch.testing.assert_close(add_lora(weight.clone(), m, -1.0), 2 * weight - full)


def test_kohya_output_keeps_every_variant_bit_for_bit_and_peft_output_refuses_lycoris(lycoris_file, tiny_pipeline,
                                                                                       tmp_path):
    for variant in ("loha-tucker", "lokr-both-tucker", "full", "loha-dora-per-input"):
        path, _, _ = lycoris_file(variant)
        again = tmp_path / f"{variant}-again.safetensors"
        convert_lora(path, "kohya", again)
        _assert_same_modules(_read(path, tiny_pipeline), _read(again, tiny_pipeline))
        variant_name = {"loha-tucker": "LoHa", "lokr-both-tucker": "LoKr", "full": "full difference",
                        "loha-dora-per-input": "LoHa"}[variant]
        with pytest.raises(UserError, match=f"{variant_name}.* no peft/diffusers form; keep this LoRA as kohya"):
            convert_lora(path, "peft", tmp_path / f"{variant}-peft.safetensors")


def test_peft_dora_converts_to_kohya_that_lycoris_merges_like_peft(tiny_pipeline, tmp_path):
    """A peft DoRA file written as kohya (magnitudes as lycoris' `dora_scale`), loaded by lycoris' own reader
    and merged by lycoris, gives peft's merged UNet; and back to peft it is the original bit for bit."""
    from lycoris.kohya import create_network_from_weights
    from peft.tuners.lora import LoraLayer

    path, models = peft_lora_via_diffusers(tiny_pipeline, tmp_path / "peft", use_dora=True)
    kohya, back = tmp_path / "kohya.safetensors", tmp_path / "back.safetensors"
    convert_lora(path, "kohya", kohya)
    convert_lora(kohya, "peft", back)
    _assert_same_modules(_read(path, tiny_pipeline), _read(back, tiny_pipeline))

    fresh = load_models(tiny_pipeline)
    network, _ = create_network_from_weights(1.0, str(kohya), None, [fresh["text_encoder"], fresh["text_encoder_2"]],
                                             fresh["unet"])
    peft_layers = {name: layer for name, layer in models["unet"].named_modules() if isinstance(layer, LoraLayer)}
    assert len(network.unet_loras) == len(peft_layers)
    for module in network.unet_loras:
        module.merge_to(1.0)
    worst = 0.0
    for name, layer in peft_layers.items():
        layer.merge()
        worst = max(worst, _error(fresh["unet"].get_submodule(name).weight.detach(),
                                  layer.get_base_layer().weight.detach()))
    print(f"peft DoRA -> kohya -> lycoris merge vs peft merge: max relative difference {worst:.1e}")
    assert worst < 1e-5


@pytest.mark.parametrize("algo, variant", [("diag-oft", "OFT/BOFT"), ("glora", "GLoRA"), ("ia3", r"\(IA\)\^3")])
def test_other_lycoris_algorithms_are_refused_by_name(algo, variant, models, preset, tmp_path, cli):
    network = lycoris_network(copy.deepcopy(models), preset, algo)
    path = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    with pytest.raises(UserError, match=f"{variant} weights .* are not supported"):
        read_lora(path)
    result = cli("inspect", path, ok=False)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and "not supported" in result.stderr


def _assert_same_modules(lora, other):
    """The same modules, variants, alphas and tensors (dtype, shape, values; DoRA magnitudes as numbers)."""
    before, after = ({(m.component, m.module): m for m in f.modules} for f in (lora, other))
    assert before.keys() == after.keys()
    for key, m in before.items():
        n = after[key]
        assert (type(n.factors), n.alpha, n.variant) == (type(m.factors), m.alpha, m.variant), key
        assert all(_same(getattr(n.factors, f), getattr(m.factors, f)) for f in m.factors.KOHYA), key
        assert _same(n.bias, m.bias), key
        if m.dora is not None:
            assert n.dora.axis == m.dora.axis and torch.equal(n.dora.magnitude.load().flatten(),
                                                              m.dora.magnitude.load().flatten()), key


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.load(), b.load())
