"""LoRA targeting (presets, block-wise selection, per-block ranks), gradients, and the exports:
diffusers keys load with FluxPipeline.load_lora_weights; kohya keys round-trip to identical tensors
and load through diffusers' own kohya reader with the same effect."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.core import tensorfiles
from stages.core.params import Lora, Model
from stages.models import export, flux, lora


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return flux.build_tiny_random(tmp_path_factory.mktemp("tiny") / "flux")


def transformer(tiny):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny, subfolder="transformer")


def adapted(model) -> dict[str, int]:
    return {n: m.r["default"] for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.r}


def test_presets_target_the_intended_layers(tiny):
    m = transformer(tiny)
    att = set(lora.target_modules(m, Lora(targets="attention")))
    ff = set(lora.target_modules(m, Lora(targets="attention+ff")))
    every = set(lora.target_modules(m, Lora(targets="all")))
    assert "transformer_blocks.0.attn.to_q" in att and "single_transformer_blocks.1.attn.to_v" in att
    assert not any(".ff" in n or "proj_mlp" in n for n in att)
    assert att < ff < every
    assert "single_transformer_blocks.0.proj_mlp" in ff and "transformer_blocks.1.norm1.linear" in every
    assert len(att) == 2 * 4 + 2 * 3
    assert "transformer_blocks.0.attn.add_q_proj" in ff - att


def test_block_selection_and_rank_map_land_on_intended_modules(tiny):
    m = transformer(tiny)
    p = Lora(rank=4, targets="attention", double_blocks=[1], single_blocks=[0],
             rank_map={"single_transformer_blocks.0": 8, r"transformer_blocks\.1\.attn\.to_(q|k)": 2})
    params = lora.add_lora(m, p)
    ranks = adapted(m)
    assert set(ranks) == {f"transformer_blocks.1.attn.{s}" for s in ["to_q", "to_k", "to_v", "to_out.0"]} | {
        f"single_transformer_blocks.0.attn.to_{s}" for s in "qkv"}
    assert ranks["transformer_blocks.1.attn.to_q"] == 2 and ranks["transformer_blocks.1.attn.to_k"] == 2
    assert ranks["transformer_blocks.1.attn.to_v"] == 4
    assert all(ranks[f"single_transformer_blocks.0.attn.to_{s}"] == 8 for s in "qkv")
    # alpha follows rank when lora.alpha is None: every module has scale 1
    assert all(mod.scaling["default"] == 1.0 for n, mod in m.named_modules() if hasattr(mod, "scaling") and "default" in mod.scaling)
    # only the LoRA matrices are trainable, and only they get gradients
    named = dict(m.named_parameters())
    assert {id(p) for p in params} == {id(t) for n, t in named.items() if "lora_" in n}
    assert all(t.dtype == torch.float32 for t in params)


def test_bad_block_index_and_unused_rank_pattern_are_clear_errors(tiny):
    m = transformer(tiny)
    with pytest.raises(ValueError, match="lora.double_blocks.*out of range"):
        lora.target_modules(m, Lora(double_blocks=[5]))
    with pytest.raises(ValueError, match="rank_map patterns.*match no targeted module"):
        lora.lora_config(m, Lora(rank_map={"transformer_blocks.9": 2}))


def trained_like(model, seed=0):
    """Give the adapter non-zero B matrices (as after training) so outputs change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_kohya_round_trip_is_exact(tiny):
    m = transformer(tiny)
    lora.add_lora(m, Lora(rank=4, targets="all"))
    trained_like(m)
    state = lora.lora_state_dict(m)
    cfg = dict(m.config)
    kohya = export.to_kohya(state, cfg, {})
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert "lora_unet_double_blocks_0_img_attn_qkv.alpha" in kohya
    assert "lora_unet_single_blocks_1_linear1.lora_down.weight" in kohya
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 12.0  # fused rank 3x4, scale 1
    back, alphas = export.from_kohya(kohya, cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert all(a == 4.0 for a in alphas.values())


def test_kohya_keeps_scale_when_alpha_differs(tiny):
    m = transformer(tiny)
    names = lora.target_modules(m, Lora(single_blocks=[]))
    lora.add_lora(m, Lora(rank=4, alpha=2.0, targets="attention", single_blocks=[]))
    trained_like(m)
    state = lora.lora_state_dict(m)
    kohya = export.to_kohya(state, dict(m.config), {n: 2.0 for n in names})
    assert float(kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == pytest.approx(6.0)  # 12 * 0.5
    assert float(kohya["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == pytest.approx(2.0)


def image(pipe, seed=0):
    out = pipe("a striped field", num_inference_steps=2, height=32, width=32, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(seed), max_sequence_length=16, output_type="np")
    return out.images[0]


def test_exports_load_in_diffusers_and_change_the_output(tiny, tmp_path):
    p = Lora(rank=4, targets="attention", single_blocks=[])  # double blocks: diffusers' kohya reader covers them
    m = transformer(tiny)
    lora.add_lora(m, p)
    trained_like(m)
    lora.save_diffusers(m, tmp_path / "diffusers")
    state = lora.lora_state_dict(m)
    save_file(export.to_kohya(state, dict(m.config), {}), tmp_path / "kohya.safetensors")
    assert all(k.startswith("transformer.") for k in load_file(tmp_path / "diffusers/pytorch_lora_weights.safetensors"))
    # one metadata key, so the file's bytes (its DVC hash) are the same on every save
    assert list(tensorfiles.metadata(tmp_path / "diffusers/pytorch_lora_weights.safetensors")) == \
        ["lora_adapter_metadata"]

    pipe = flux.load_pipeline(Model(base=str(tiny)), device="cpu")
    base = image(pipe)
    pipe.load_lora_weights(tmp_path / "diffusers", adapter_name="d")
    with_diffusers = image(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="k")
    with_kohya = image(pipe)
    assert abs(with_diffusers - base).mean() > 1e-3  # the LoRA changes the picture
    assert abs(with_kohya - with_diffusers).max() < 1e-4  # ... and both formats the same way


def delta_w(state: dict, name: str, scale: float = 1.0) -> torch.Tensor:
    return scale * state[f"{name}.lora_B.weight"].float() @ state[f"{name}.lora_A.weight"].float()


def test_rank_map_splitting_a_fused_module_exports_exactly(tiny):
    """to_q at rank 2 inside linear1 (q, k, v, mlp fused in kohya/ComfyUI) with alpha 3: the kohya
    file carries the same ΔW for every part, read the way ComfyUI reads it (up @ down * alpha/rank)."""
    m = transformer(tiny)
    p = Lora(rank=4, alpha=3.0, targets="attention+ff", rank_map={r"single_transformer_blocks\.0\.attn\.to_q": 2})
    lora.add_lora(m, p)
    trained_like(m)
    state = lora.lora_state_dict(m)
    alphas = lora.module_alphas(m)  # 3.0 everywhere: scale 1.5 on to_q (rank 2), 0.75 elsewhere
    assert len(alphas) > 20 and set(alphas.values()) == {3.0}  # (peft shortens target_modules past 20)
    kohya = export.to_kohya(state, dict(m.config), alphas)
    base = "lora_unet_single_blocks_0_linear1"
    down, up = kohya[base + ".lora_down.weight"], kohya[base + ".lora_up.weight"]
    fused = up @ down * float(kohya[base + ".alpha"]) / down.shape[0]
    inner = m.config.num_attention_heads * m.config.attention_head_dim
    parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    rows = [0, inner, 2 * inner, 3 * inner, fused.shape[0]]
    for j, part in enumerate(parts):
        name = f"single_transformer_blocks.0.{part}"
        rank = 2 if part == "attn.to_q" else 4
        assert torch.allclose(fused[rows[j]:rows[j + 1]], delta_w(state, name, 3.0 / rank), atol=1e-6)
    back, back_alphas = export.from_kohya(kohya, dict(m.config))
    for name in alphas:
        rank = back[f"{name}.lora_A.weight"].shape[0]
        assert torch.allclose(delta_w(back, name, back_alphas[name] / rank),
                              delta_w(state, name, alphas[name] / state[f"{name}.lora_A.weight"].shape[0]),
                              atol=1e-6)
    assert back["single_transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == 2  # padding dropped


def test_diffusers_file_folds_alpha_so_scale_1_is_the_trained_strength(tiny, tmp_path):
    """alpha 2, rank 4: ComfyUI reads a diffusers-format file at scale 1 (no alpha keys), so the file
    must hold 0.5 * B; diffusers, reading the metadata, must give the picture of the trained model."""
    m = transformer(tiny)
    lora.add_lora(m, Lora(rank=4, alpha=2.0, targets="attention", single_blocks=[]))
    trained_like(m)
    state = lora.lora_state_dict(m)
    lora.save_diffusers(m, tmp_path)
    saved = {k.removeprefix("transformer."): v for k, v in
             load_file(tmp_path / "pytorch_lora_weights.safetensors").items()}
    for name in {k.rsplit(".lora_", 1)[0] for k in state}:
        assert torch.allclose(delta_w(saved, name), delta_w(state, name, 0.5), atol=1e-6)

    pipe = flux.load_pipeline(Model(base=str(tiny)), device="cpu")
    pipe.load_lora_weights(tmp_path, adapter_name="d")
    from_file = image(pipe)
    pipe.unload_lora_weights()
    pipe.transformer = m  # the trained model itself, alpha 2 / rank 4 applied by peft
    assert abs(image(pipe) - from_file).max() < 1e-4


def test_train_stage_exports_alpha_of_every_module(workdir):
    """lora.alpha 2 at rank 4 on all 40 modules of the tiny model: peft shortens its target list,
    the kohya file must still carry alpha 2 (scale 0.5) for every module, not the rank."""
    from tests.trainkit import run_train

    run_train(workdir, train__steps=1, lora__targets="all", lora__alpha=2.0, train__checkpoint_every=1)
    kohya = load_file(workdir / "models/lora/lora_kohya.safetensors")
    scales = {k: float(v) / kohya[k.replace(".alpha", ".lora_down.weight")].shape[0]
              for k, v in kohya.items() if k.endswith(".alpha")}
    assert scales and all(s == pytest.approx(0.5) for s in scales.values()), scales


def test_every_kohya_name_is_the_one_diffusers_kohya_reader_expects(tiny):
    """All 10 double-block and the single blocks' linear2 / modulation_lin modules, alpha 2 at rank 4:
    diffusers' own kohya -> diffusers converter (written from sd-scripts' names, independent of
    our maps) gives back every module with the trained ΔW. (Its linear1 split hard-codes FLUX.1-dev's
    widths, so the tiny model's linear1 is checked with ComfyUI's arithmetic in
    test_rank_map_splitting_a_fused_module_exports_exactly.)"""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    m = transformer(tiny)
    lora.add_lora(m, Lora(rank=4, alpha=2.0, targets="all"))
    trained_like(m)
    fused_single = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    state = {k: v for k, v in lora.lora_state_dict(m).items()
             if not (k.startswith("single_transformer_blocks.") and k.split(".", 2)[2].startswith(fused_single))}
    names = {k.rsplit(".lora_", 1)[0] for k in state}
    assert len(names) == 2 * 14 + 2 * 2  # every double-block module, proj_out and norm.linear of each single block
    kohya = export.to_kohya(state, dict(m.config), {n: 2.0 for n in names})
    converted = {k.removeprefix("transformer."): v for k, v in _convert_kohya_flux_lora_to_diffusers(kohya).items()}
    assert {k.rsplit(".lora_", 1)[0] for k in converted} == names
    for name in names:
        assert torch.allclose(delta_w(converted, name), delta_w(state, name, 0.5), atol=1e-6), name


def test_block_indices_are_bounded_deduplicated_and_in_model_order(tiny):
    m = transformer(tiny)
    for key, bad in (("double_blocks", [2]), ("single_blocks", [0, 3])):  # the tiny model has blocks 0 and 1
        with pytest.raises(ValueError, match=rf"^lora.{key}=.*out of range \(the model has 2: 0..1\)$"):
            lora.target_modules(m, Lora(**{key: bad}))
    names = lora.target_modules(m, Lora(double_blocks=[1, 0, 1], single_blocks=[]))
    order = [n for n, _ in m.named_modules()]
    assert names == sorted(set(names), key=order.index) and len(names) == 2 * 4
    with pytest.raises(ValueError, match="^no LoRA targets: lora.double_blocks and lora.single_blocks select no block$"):
        lora.target_modules(m, Lora(double_blocks=[], single_blocks=[]))


def test_rank_map_patterns_are_whole_names_prefixes_at_a_dot_or_full_regexes_first_wins():
    p = Lora(rank=4, rank_map={"transformer_blocks.1": 8, r"single_transformer_blocks\.\d+\.attn\.to_q": 2,
                               "single_transformer_blocks.0": 16})
    assert lora.rank_of("transformer_blocks.1.attn.to_q", p) == 8
    assert lora.rank_of("transformer_blocks.1", p) == 8
    assert lora.rank_of("transformer_blocks.10.attn.to_q", p) == 4  # a prefix counts at a dot only
    assert lora.rank_of("single_transformer_blocks.0.attn.to_q", p) == 2  # the first matching pattern wins
    assert lora.rank_of("single_transformer_blocks.1.attn.to_q_x", p) == 4  # a regex must match the whole name
    assert lora.rank_of("single_transformer_blocks.0.attn.to_k", p) == 16


def test_lora_config_alpha_dropout_and_gaussian_init(tiny):
    m = transformer(tiny)
    names = lora.target_modules(m, Lora())
    block0 = [n for n in names if n.startswith("transformer_blocks.0.")]
    cfg = lora.lora_config(m, Lora(rank=4, dropout=0.25, rank_map={"transformer_blocks.0": 8}))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 4, 0.25)
    assert cfg.rank_pattern == {n: 8 for n in block0} and cfg.alpha_pattern == {n: 8.0 for n in block0}  # scale 1
    cfg = lora.lora_config(m, Lora(rank=4, alpha=2.0, rank_map={"transformer_blocks.0": 8}))
    assert cfg.lora_alpha == 2.0 and cfg.alpha_pattern == {}  # alpha 2 for every module, whatever its rank
    lora.add_lora(m, Lora(rank=4, alpha=2.0, rank_map={"transformer_blocks.0": 8}))
    assert lora.scales(m) == {n: (0.25 if n in block0 else 0.5) for n in names}
    assert lora.module_alphas(m) == {n: 2.0 for n in names}
    a = torch.cat([p.flatten() for n, p in m.named_parameters() if "lora_A" in n and "transformer_blocks.1." in n])
    assert abs(a.std().item() - 1 / 4) < 0.03  # peft's gaussian init: N(0, 1/rank)


def test_a_state_that_does_not_fit_the_adapter_is_refused(tiny):
    m = transformer(tiny)
    lora.add_lora(m, Lora(rank=4, single_blocks=[]))
    state = {k: v.clone() for k, v in lora.lora_state_dict(m).items()}  # (on CPU: views of the parameters)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    lora.set_lora_state_dict(m, {k: v + 1 for k, v in state.items()})
    assert all(torch.equal(v, state[k] + 1) for k, v in lora.lora_state_dict(m).items())
    with pytest.raises(ValueError, match="does not fit the adapter: unexpected keys"):
        lora.set_lora_state_dict(m, {**state, "transformer_blocks.0.ff.net.2.lora_A.weight": torch.zeros(4, 32)})


def test_fold_alpha_moves_each_scale_into_b_and_sets_alpha_to_the_rank():
    state = {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.ones(3, 2),
             "b.lora_A.weight": torch.ones(8, 3), "b.lora_B.weight": torch.ones(3, 8)}
    cfg = {"r": 2, "lora_alpha": 1.0, "rank_pattern": {"b": 8}, "alpha_pattern": {"b": 1.0}, "other": "kept"}
    out, new = lora.fold_alpha(state, {"a": 0.5, "b": 1.0}, cfg)
    assert torch.equal(out["a.lora_B.weight"], torch.full((3, 2), 0.5)) and torch.equal(out["a.lora_A.weight"], state["a.lora_A.weight"])
    assert torch.equal(out["b.lora_B.weight"], state["b.lora_B.weight"])
    assert new == {**cfg, "lora_alpha": 2, "alpha_pattern": {"b": 8.0}}
    assert lora.fold_alpha({}, {}, {"r": 4, "lora_alpha": 2.0, "rank_pattern": None})[1]["alpha_pattern"] == {}


def test_a_key_outside_the_flux_transformer_is_refused():
    with pytest.raises(ValueError, match=r"^not a Flux transformer LoRA key: text_encoder\.q\.lora_A\.weight$"):
        export.to_kohya({"text_encoder.q.lora_A.weight": torch.zeros(1, 1)}, {}, {})


def test_fused_parts_of_one_rank_with_different_alphas_keep_each_scale(tiny):
    """rank 4 everywhere, alpha 2 on to_q only (scale 0.5, the others 1): one fused module cannot
    carry two scales in its alpha, so each part's ΔW must still come out right (ComfyUI's reading)."""
    m = transformer(tiny)
    lora.add_lora(m, Lora(rank=4, targets="attention", double_blocks=[]))
    trained_like(m)
    state = lora.lora_state_dict(m)
    kohya = export.to_kohya(state, dict(m.config), {"single_transformer_blocks.0.attn.to_q": 2.0})
    base = "lora_unet_single_blocks_0_linear1"
    down, up = kohya[base + ".lora_down.weight"], kohya[base + ".lora_up.weight"]
    fused = up @ down * float(kohya[base + ".alpha"]) / down.shape[0]
    inner = m.config.num_attention_heads * m.config.attention_head_dim
    for j, (part, scale) in enumerate((("attn.to_q", 0.5), ("attn.to_k", 1.0), ("attn.to_v", 1.0))):
        name = f"single_transformer_blocks.0.{part}"
        assert torch.allclose(fused[j * inner:(j + 1) * inner], delta_w(state, name, scale), atol=1e-6), part


def test_a_fused_module_with_parts_missing_and_a_file_without_alphas(tiny):
    """Only to_q and the MLP of linear1 adapted (as a LoRA from another trainer may be): the fused module
    gets zeros for k and v, and reads back as to_q and proj_mlp alone. A kohya file without ``.alpha``
    keys means scale 1 (alpha = rank)."""
    m = transformer(tiny)
    lora.add_lora(m, Lora(rank=4, targets="attention+ff", double_blocks=[], single_blocks=[0]))
    trained_like(m)
    state = {k: v for k, v in lora.lora_state_dict(m).items() if ".attn.to_q." in k or ".proj_mlp." in k}
    kohya = export.to_kohya(state, dict(m.config), {})
    base = "lora_unet_single_blocks_0_linear1"
    fused = kohya[base + ".lora_up.weight"] @ kohya[base + ".lora_down.weight"]
    inner = m.config.num_attention_heads * m.config.attention_head_dim
    assert torch.allclose(fused[:inner], delta_w(state, "single_transformer_blocks.0.attn.to_q"), atol=1e-6)
    assert not fused[inner:3 * inner].any()
    assert torch.allclose(fused[3 * inner:], delta_w(state, "single_transformer_blocks.0.proj_mlp"), atol=1e-6)
    back, alphas = export.from_kohya({k: v for k, v in kohya.items() if not k.endswith(".alpha")}, dict(m.config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert alphas == {"single_transformer_blocks.0.attn.to_q": 4.0, "single_transformer_blocks.0.proj_mlp": 4.0}
    only_q = {k: v for k, v in state.items() if ".attn.to_q." in k}  # one part alone
    back, _ = export.from_kohya(export.to_kohya(only_q, dict(m.config), {}), dict(m.config))
    assert back.keys() == only_q.keys() and all(torch.equal(back[k], only_q[k]) for k in only_q)


def test_an_untrained_adapter_round_trips(tiny):
    """B = 0 everywhere (step 0): every module still comes back, with its A."""
    m = transformer(tiny)
    lora.add_lora(m, Lora(rank=4, targets="attention"))
    state = lora.lora_state_dict(m)
    back, _ = export.from_kohya(export.to_kohya(state, dict(m.config), {}), dict(m.config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_a_kohya_trained_fused_module_with_one_shared_down_reads_back_exactly(tiny):
    """sd-scripts trains qkv as one layer: one down (rank 4, no multiple of the 3 parts) shared by q, k
    and v; each part gets that down whole and its rows of up. Its up is zero exactly where a rank-1
    block diagonal would be checked, so only the rank's divisibility tells the two layouts apart."""
    cfg = dict(transformer(tiny).config)
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, inner, generator=g), torch.randn(3 * inner, 4, generator=g)
    for j in range(3):
        up[j * inner:(j + 1) * inner, [k for k in range(3) if k != j]] = 0
    base = "lora_unet_double_blocks_0_img_attn_qkv"
    kohya = {base + ".lora_down.weight": down, base + ".lora_up.weight": up, base + ".alpha": torch.tensor(2.0),
             "lora_te1_text_model_q.lora_down.weight": torch.zeros(1, 1)}  # not the transformer's: ignored
    back, alphas = export.from_kohya(kohya, cfg)
    assert {k.rsplit(".lora_", 1)[0] for k in back} == {f"transformer_blocks.0.attn.to_{p}" for p in "qkv"}
    for j, p in enumerate("qkv"):
        name = f"transformer_blocks.0.attn.to_{p}"
        assert torch.allclose(delta_w(back, name, alphas[name] / 4), 0.5 * up[j * inner:(j + 1) * inner] @ down,
                              atol=1e-5), p


def test_targets_that_are_not_linear_layers_are_named_five_at_most(tiny):
    """A transformer whose target layers were replaced (another architecture, a wrapper): the error
    names the first five of them, in model order."""
    m = transformer(tiny)
    gone = [f"transformer_blocks.{b}.attn.{p}" for b in (0, 1) for p in ("to_q", "to_k", "to_v")]
    for name in gone:
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent), child, torch.nn.Identity())
    with pytest.raises(ValueError) as err:
        lora.target_modules(m, Lora(rank=4))
    assert str(err.value) == f"LoRA targets not found as linear layers in the transformer: {gone[:5]}"


def test_an_unused_rank_map_pattern_is_named_with_a_target_name_to_copy(tiny):
    m = transformer(tiny)
    p = Lora(rank=4, rank_map={"no_such_block": 8})
    first = lora.target_modules(m, p)[0]
    with pytest.raises(ValueError) as err:
        lora.lora_config(m, p)
    assert str(err.value) == f"lora.rank_map patterns ['no_such_block'] match no targeted module (targets look like {first!r})"


def test_add_lora_leaves_only_the_adapter_trainable(tiny):
    m = transformer(tiny)
    m.requires_grad_(True)
    params = lora.add_lora(m, Lora(rank=4))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable) and len(trainable) == len(params)


def test_a_state_with_foreign_keys_names_the_first_three(tiny):
    m = transformer(tiny)
    lora.add_lora(m, Lora(rank=4))
    state = lora.lora_state_dict(m)
    foreign = {f"transformer_blocks.0.attn.extra{i}.lora_A.weight": torch.zeros(4, 8) for i in range(5)}
    with pytest.raises(ValueError) as err:
        lora.set_lora_state_dict(m, {**state, **foreign})
    msg = str(err.value)
    assert msg.startswith("LoRA state does not fit the adapter: unexpected keys [") and msg.endswith("]")
    assert msg.count("extra") == 3


def test_fold_alpha_scales_lora_b_by_two_when_alpha_is_twice_the_rank():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    out, cfg = lora.fold_alpha({"m.lora_A.weight": a, "m.lora_B.weight": b}, {"m": 2.0}, {"r": 4, "lora_alpha": 8})
    assert torch.equal(out["m.lora_A.weight"], a) and torch.equal(out["m.lora_B.weight"], b * 2.0)
    assert cfg["lora_alpha"] == 4
