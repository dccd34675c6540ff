"""DiT-MoE trains through the one training loop with its experts spread over 8 (fake) devices."""

import jax
import numpy as np

from diffax import train
from experiments import mixture


def test_dit_moe_trains_in_the_mixture_experiment_over_eight_expert_devices(tmp_path):
    config = mixture.get_config("dit")  # its one-block DiT of width 16, with 8 experts, 2 active
    config.model.name = "dit_moe_s_2_8e2a"
    config.mesh.data, config.mesh.fsdp, config.mesh.expert = 1, 1, 8
    config.total_steps = 2
    config.log.every_steps = 1
    state = train.train_and_evaluate(config, str(tmp_path))
    kernel = state.params["block_0"]["moe"]["experts"]["gate"]
    assert kernel.sharding.spec[0] == "expert" and len(kernel.addressable_shards) == 8
    assert int(state.step) == 2
    assert np.all(np.isfinite(jax.device_get(kernel)))
