"""DiT-MoE trains through the one training loop with its experts spread over 8 (fake) devices."""

import jax
import numpy as np

from diffax import train
from experiments import common


def test_dit_moe_trains_in_the_mixture_experiment_over_eight_expert_devices(mixture_config, tmp_path):
    config = mixture_config
    config.model = common.model(
        "dit_moe_s_2_8e2a",
        depth=1,
        hidden_size=16,
        num_heads=2,
        num_classes=None,
        label_dropout=0.0,
        learned_variance=False,
    )
    config.mesh.data, config.mesh.fsdp, config.mesh.expert = 1, 1, 8
    config.total_steps = 2
    config.log.every_steps = 1
    state = train.train_and_evaluate(config, str(tmp_path))
    kernel = state.params["block_0"]["moe"]["experts"]["gate"]
    assert kernel.sharding.spec[0] == "expert" and len(kernel.addressable_shards) == 8
    assert int(state.step) == 2
    assert np.all(np.isfinite(jax.device_get(kernel)))
