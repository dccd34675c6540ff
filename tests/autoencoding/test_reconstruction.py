"""The digits autoencoder recipe learns: trained briefly at a tiny size, it reconstructs held-out digits.

``experiments/digits_vae.py`` (32×32) takes minutes and is measured in its docstring and the README;
here its loss and optimizer train the tests' tiny autoencoder (``experiments/mixture.py:vae``, kl-f2)
on the digits at 8×8 for 200 steps of the same pure train step ``diffax.train`` runs, and the held-out
PSNR of ``diffax.evaluate`` (all 297 test digits, posterior means) must clear a bar a little below
what it measured.
"""

import flax.linen as nn
import jax

from diffax import data, train_state
from diffax.autoencoding import system
from experiments import digits_vae, mixture

STEPS = 200
# Measured (seed 0, 2-core AMD EPYC): 5.2 dB at step 0 (random weights), 18.08 dB after 200 steps.
PSNR_BAR = 17.5


def test_the_digits_recipe_trains_a_tiny_vae_to_a_held_out_psnr():
    config = digits_vae.get_config()
    config.model = mixture.get_config("vae").model
    config.input.upsample, config.input.image_size, config.input.batch_size = 1, 8, 16
    config.total_steps = STEPS
    parts = train_state.build(config)
    state = jax.jit(lambda: nn.meta.unbox(train_state.state_initializer(config, parts)()))()
    pipeline = data.make_pipeline(config.input, seed=config.seed, process_index=0, process_count=1)
    # Compiled at LLVM's default level: the suite's level 0 (tests/conftest.py) runs these steps 6x slower.
    step = (
        jax.jit(system.make_train_step(config, parts))
        .lower(state, pipeline.get(0))
        .compile({"xla_backend_optimization_level": 2})
    )
    for i in range(STEPS):
        state, _ = step(state, pipeline.get(i))
    psnr = system.make_evaluation(config)(state.params, step=STEPS)["psnr"]
    assert psnr >= PSNR_BAR, psnr
