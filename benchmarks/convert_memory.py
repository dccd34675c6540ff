"""Peak host memory of converting DiT-XL/2 (2.7 GB of float32) from the diffusers layout.

    python benchmarks/convert_memory.py [--dir=/tmp/dit-xl-2]

Writes a ``DiTTransformer2DModel`` folder with DiT-XL/2's published config and random weights
(embedder copies identical, as in the published file) tensor by tensor, without ever holding the
model, then runs ``diffax.models.from_diffusers`` in a fresh process and reports its peak resident
memory (``ru_maxrss``) next to the checkpoint's size. Needs torch (the key list and shapes come from
a meta-device diffusers model, which allocates nothing).
"""

import argparse
import json
import pathlib
import re
import resource
import subprocess
import sys
import time

import numpy as np


def write_checkpoint(folder: pathlib.Path) -> int:
    import diffusers
    import torch

    from diffax.models.convert import files
    from diffax.models.convert.dit import DIT_XL_2_256_CONFIG as XL

    with torch.device("meta"):
        model = diffusers.DiTTransformer2DModel.from_config(XL)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def tensors():
        for name, shape in shapes.items():
            # The embedders' copies share a seed, so every block holds the same values (published layout).
            seed = abs(hash(re.sub(r"transformer_blocks\.\d+\.norm1\.emb", "emb", name))) % 2**32
            yield name, (0.02 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / files.CONFIG_NAME).write_text(json.dumps(XL))
    files.write_safetensors(folder / files.WEIGHTS_NAME, tensors(), shapes)
    return (folder / files.WEIGHTS_NAME).stat().st_size


def convert(folder: str) -> None:
    """Child process: the conversion alone; prints JSON with the peak RSS before and after."""
    import jax

    import diffax.models as models

    jax.numpy.zeros(1).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    module, params = models.from_diffusers(folder)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(before=before, peak=peak, seconds=seconds, params=models.count_params(params))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/dit-xl-2")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        return convert(args.dir)
    folder = pathlib.Path(args.dir)
    size = write_checkpoint(folder)
    out = subprocess.run(
        [sys.executable, __file__, "--child", f"--dir={folder}"], check=True, capture_output=True, text=True
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    gib = 2**30
    print("| checkpoint | parameters | RSS before | peak RSS | peak / checkpoint | seconds |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {size / gib:.2f} GiB | {r['params']:,} | {r['before'] / gib:.2f} GiB | {r['peak'] / gib:.2f} GiB "
        f"| {r['peak'] / size:.2f} | {r['seconds']:.0f} |"
    )


if __name__ == "__main__":
    main()
