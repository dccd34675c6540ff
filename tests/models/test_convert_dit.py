"""DiT: diffusers DiTTransformer2DModel / Transformer2DModel and the original state dict <-> diffax DiT."""

import json

import diffusers
import jax
import numpy as np
import pytest
import torch

from diffax import models, pretrained
from diffax.models.convert import dit as dit_convert
from diffax.models.convert import table
from tests.models import diffusers_reference as ref

# facebook/DiT-XL-2-256's transformer config, narrowed (28 -> 3 blocks, 16 x 72 -> 4 x 16 channels).
XL_CONFIG = dit_convert.DIT_XL_2_256_CONFIG
DIT_CONFIG = dict(XL_CONFIG, num_attention_heads=4, attention_head_dim=16, num_layers=3, sample_size=8)
STEPS, LABELS = [0, 999], [7, 1000]  # the second label is the null class (classifier-free guidance)


def _tie_embedders(model):
    with torch.no_grad():
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model


def _inputs(channels=4, size=8):
    x = np.random.default_rng(0).standard_normal((2, size, size, channels)).astype(np.float32)
    return x, (np.asarray(STEPS, np.float32) + 1) / 1000, np.asarray(LABELS, np.int32)


def _expected(model, x):
    with torch.no_grad():
        out = model(ref.nchw(x), torch.tensor(STEPS), torch.tensor(LABELS))
    return ref.nhwc(out.sample if hasattr(out, "sample") else out)


def _apply(module, params, x, t, labels):
    with ref.highest_precision():
        return jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, t, y))(params, x, t, labels)


@pytest.fixture(scope="module")
def dit_model():
    torch.manual_seed(0)
    return ref.randomize(diffusers.DiTTransformer2DModel.from_config(DIT_CONFIG), seed=3)


def test_per_block_embedders_match_diffusers(dit_model, tmp_path):
    module, params = models.from_diffusers(ref.save(dit_model, tmp_path))
    assert module.block_embedders and module.learned_variance and module.mlp_norm_eps == 1e-5
    x, t, labels = _inputs()
    ref.assert_close_to_scale(
        _apply(module, params, x, t, labels), _expected(dit_model, x), what="DiT output"
    )


def test_shared_embedders_match_and_round_trip(dit_model, tmp_path):
    model = _tie_embedders(dit_model)
    module, params = models.from_diffusers(ref.save(model, tmp_path / "dit"))
    assert not module.block_embedders  # the published layout: one embedder, copied into every block
    x, t, labels = _inputs()
    ref.assert_close_to_scale(_apply(module, params, x, t, labels), _expected(model, x), what="DiT output")
    models.to_diffusers(module, params, tmp_path / "back")
    reloaded = ref.strict_reload(diffusers.DiTTransformer2DModel, tmp_path / "back")
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    # The older Transformer2DModel config (facebook/DiT-XL-2-256 as first published) loads the same tensors.
    legacy = dict(
        json.loads((tmp_path / "dit" / "config.json").read_text()),
        _class_name="Transformer2DModel",
        cross_attention_dim=None,
        num_vector_embeds=None,
        only_cross_attention=False,
        double_self_attention=False,
        use_linear_projection=False,
        upcast_attention=False,
        norm_num_groups=32,
    )
    (tmp_path / "dit" / "config.json").write_text(json.dumps(legacy))
    _, legacy_params = models.from_diffusers(tmp_path / "dit")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(legacy_params), strict=True):
        np.testing.assert_array_equal(a, b)


def _original_state_dict(model):
    """diffusers' DiT renamed to the original release's keys (the inverse of diffusers'
    scripts/convert_dit_to_diffusers.py), with the original's fixed position table."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    emb = "transformer_blocks.0.norm1.emb"
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd[f"{emb}.timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[f"{emb}.timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[f"{emb}.timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[f"{emb}.timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd[f"{emb}.class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    grid, width = 4, sd["pos_embed.proj.weight"].shape[0]
    out["pos_embed"] = torch.from_numpy(models.dit.sincos_pos_embed(grid, grid, width)).float()[None]
    for i in range(len(model.transformer_blocks)):
        b, o = f"transformer_blocks.{i}", f"blocks.{i}"
        for leaf in ("weight", "bias"):
            out[f"{o}.attn.qkv.{leaf}"] = torch.cat([sd[f"{b}.attn1.to_{n}.{leaf}"] for n in "qkv"])
            for src, dst in (
                ("attn1.to_out.0", "attn.proj"),
                ("norm1.linear", "adaLN_modulation.1"),
                ("ff.net.0.proj", "mlp.fc1"),
                ("ff.net.2", "mlp.fc2"),
            ):
                out[f"{o}.{dst}.{leaf}"] = sd[f"{b}.{src}.{leaf}"]
    return out


def test_original_checkpoint_matches_original_semantics(tmp_path):
    # The original DiT: diffusers' network with shared embedders, frequencies over half (shift 0) and
    # LayerNorm eps 1e-6 everywhere. Width 384 (DiT-S: 6 heads).
    torch.manual_seed(1)
    config = dict(DIT_CONFIG, num_attention_heads=6, attention_head_dim=64, num_layers=2, norm_eps=1e-6)
    model = _tie_embedders(ref.randomize(diffusers.DiTTransformer2DModel.from_config(config), seed=4))
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    torch.save(_original_state_dict(model), tmp_path / "DiT-S-2.pt")
    module, params = models.from_dit_checkpoint(tmp_path / "DiT-S-2.pt")
    assert (module.num_heads, module.depth, module.time_freq_shift, module.mlp_norm_eps) == (6, 2, 0.0, 1e-6)
    x, t, labels = _inputs()
    ref.assert_close_to_scale(_apply(module, params, x, t, labels), _expected(model, x), what="DiT output")
    with pytest.raises(models.ConversionError, match="latent DiT; pass --vae"):  # generate --pretrained=X.pt
        pretrained.load(tmp_path / "DiT-S-2.pt")
    state = torch.load(tmp_path / "DiT-S-2.pt", weights_only=True)
    state["pos_embed"] = state["pos_embed"] * 2
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(models.ConversionError, match="'pos_embed' differs"):
        models.from_dit_checkpoint(tmp_path / "bad.pt")


def test_dit_xl_2_layout_and_parameter_count():
    """DiT-XL/2's diffusers tensors (a meta-device model: nothing allocated) are exactly the table's, and the
    converted network has the paper's 675M parameters."""
    with torch.device("meta"):
        model = diffusers.DiTTransformer2DModel.from_config(XL_CONFIG)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    module = models.DiT(**{**models.PRESETS["dit_xl_2"][1], "time_freq_shift": 1.0, "pos_embed_base": 16})
    shapes = table.param_shapes(
        lambda: module.init(jax.random.key(0), *dit_convert._init_args(module, 4))["params"]
    )
    assert table.source_shapes(dit_convert.table(module, shapes), shapes) == expected
    count = sum(int(np.prod(s)) for s in shapes.values())
    # Peebles & Xie 2023, Table 1: 675M. The original's parameter list adds the fixed position table
    # (256 x 1152 = 294,912 values): 675,129,632.
    assert count == 674_834_720 and round((count + 256 * 1152) / 1e6) == 675
