"""LPIPS (VGG16) against a float64 PyTorch implementation of the lpips package's network on random
weights saved under its state-dict names; loading errors; the perceptual term in the autoencoder loss."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import train_state
from diffax.autoencoding import losses, lpips, system
from diffax.models.autoencoder import sample_posterior
from diffax.models.convert import ConversionError

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


class _TorchLPIPS(torch.nn.Module):
    """``lpips.LPIPS(net="vgg", version="0.1")`` as that package builds it: torchvision's VGG16
    ``features`` cut into five slices after each stage's last relu, a dropout + 1×1 convolution head per
    slice (``lin{k}.model.1``), and the ``scaling_layer`` buffers."""

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for stage, widths in enumerate(lpips.VGG16_STAGES):
            if stage:
                layers.append(torch.nn.MaxPool2d(2, 2))
            for width in widths:
                layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU()]
                channels = width
        cuts = (0, 4, 9, 16, 23, 30)  # torchvision indices of the slices' ends
        self.net = torch.nn.Module()
        for k in range(5):
            piece = torch.nn.Sequential()
            for i in range(cuts[k], cuts[k + 1]):
                piece.add_module(str(i), layers[i])
            setattr(self.net, f"slice{k + 1}", piece)
            head = torch.nn.Module()  # lpips.NetLinLayer
            head.model = torch.nn.Sequential(
                torch.nn.Dropout(), torch.nn.Conv2d(widths_of(k), 1, 1, bias=False)
            )
            setattr(self, f"lin{k}", head)
        self.scaling_layer = torch.nn.Module()
        self.scaling_layer.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
        )
        self.scaling_layer.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x, y):  # NCHW in [-1, 1]
        def features(h):
            h = (h - self.scaling_layer.shift) / self.scaling_layer.scale
            out = []
            for k in range(5):
                h = getattr(self.net, f"slice{k + 1}")(h)
                out.append(h / (torch.sqrt(torch.sum(h**2, dim=1, keepdim=True)) + 1e-10))
            return out

        total = 0
        for k, (a, b) in enumerate(zip(features(x), features(y), strict=True)):
            total = total + getattr(self, f"lin{k}").model((a - b) ** 2).mean(dim=(2, 3))
        return total[:, 0]


def widths_of(stage):
    return lpips.VGG16_STAGES[stage][-1]


@functools.cache
def _reference():
    torch.manual_seed(0)
    model = _TorchLPIPS().eval()
    with torch.no_grad():  # positive heads, as trained LPIPS keeps them
        for k in range(5):
            getattr(model, f"lin{k}").model[1].weight.abs_()
    return model


def _save(tmp_path, state, suffix=".safetensors"):
    path = str(tmp_path / f"lpips{suffix}")
    state = {k: v.contiguous() for k, v in state.items()}
    (safetensors_torch.save_file if suffix == ".safetensors" else torch.save)(state, path)
    return path


def _images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def test_distances_equal_the_torch_network_in_float64(tmp_path):
    """Grey digits-sized images (repeated to RGB for the reference); zero on equal inputs; symmetric."""
    model = _reference()
    params = lpips.load(_save(tmp_path, model.state_dict()))
    x, y = _images((2, 16, 16, 1), 1), _images((2, 16, 16, 1), 2)
    rgb = lambda a: torch.from_numpy(np.repeat(a, 3, -1)).double().permute(0, 3, 1, 2)
    with torch.no_grad():
        want = model.double()(rgb(x), rgb(y)).numpy()
        model.float()
    distance = jax.jit(lpips.distance)
    got = np.asarray(distance(params, x, y))
    np.testing.assert_allclose(got, want, rtol=2e-4)
    assert np.all(want > 0)
    np.testing.assert_array_equal(distance(params, x, x), np.zeros(2, np.float32))
    np.testing.assert_allclose(distance(params, y, x), got, rtol=1e-6)


def test_a_pth_file_loads_the_same_and_bad_files_name_the_tensor(tmp_path):
    state = _reference().state_dict()
    pth = lpips.load(_save(tmp_path, state, ".pth"))
    for a, b in zip(jax.tree.leaves(pth), jax.tree.leaves(lpips.load(_save(tmp_path, state))), strict=True):
        np.testing.assert_array_equal(a, b)
    cases = {
        "stray": ({**state, "extra.weight": torch.zeros(1)}, "'extra.weight'"),
        "missing": ({k: v for k, v in state.items() if k != "lin2.model.1.weight"}, "'lin2.model.1.weight'"),
        "shape": ({**state, "net.slice3.12.weight": torch.zeros(256, 128, 3, 3)}, "'net.slice3.12.weight'"),
        "buffer": ({**state, "scaling_layer.shift": torch.zeros(1, 3, 1, 1)}, "'scaling_layer.shift'"),
    }
    for case, (bad, name) in cases.items():
        (tmp_path / case).mkdir()
        with pytest.raises(ConversionError, match=name):
            lpips.load(_save(tmp_path / case, bad))
    with pytest.raises(ConversionError, match="no file"):
        lpips.load(str(tmp_path / "nowhere.safetensors"))


def _autoencoder_config(weights=""):
    from test_autoencoder_losses import _tiny_config  # this directory is on sys.path under pytest

    config = _tiny_config()
    config.input.image_size = 16
    config.loss.perceptual_weight = 0.7
    config.loss.lpips_weights = weights
    return config


def test_the_perceptual_term_enters_the_train_step_as_in_the_reference(tmp_path):
    """nll = Σ_pixels (|x − x̂| + w_p · LPIPS(x, x̂)) / e^logvar + logvar over the batch, in the train
    step's metrics; a missing weights file is one line naming the field, before anything compiles."""
    config = _autoencoder_config()
    with pytest.raises(ValueError, match=r"^config.loss.lpips_weights: perceptual_weight > 0 needs") as e:
        system.check(config)
    assert "\n" not in str(e.value)
    config.loss.lpips_weights = str(tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match=r"^config.loss.lpips_weights: lpips.load: no file"):
        system.check(config)
    config = _autoencoder_config(_save(tmp_path, _reference().state_dict()))
    system.check(config)
    parts = train_state.build(config)
    state = jax.jit(lambda: nn.meta.unbox(train_state.state_initializer(config, parts)()))()
    x = jnp.asarray(_images((4, 16, 16, 1), 3))
    perceptual_params = lpips.load(config.loss.lpips_weights)

    @jax.jit
    def step_and_reference(state):
        _, metrics = system.make_train_step(config, parts)(state, {"image": x})
        key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))[0]
        ae = {"params": state.params["autoencoder"]}
        mean, logvar_z = parts.module.apply(ae, x, True, method="encode")
        x_rec = parts.module.apply(ae, sample_posterior(mean, logvar_z, key), True, method="decode")
        p = lpips.distance(perceptual_params, x, x_rec)
        logvar = state.params["logvar"]
        with_p = losses.reconstruction_nll(x, x_rec, logvar, perceptual=p, perceptual_weight=0.7)
        return metrics["nll"], with_p, losses.reconstruction_nll(x, x_rec, logvar)

    got, want, without = step_and_reference(state)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(want - without) > 1.0  # the term is there: 0.7 · Σ_pixels LPIPS
