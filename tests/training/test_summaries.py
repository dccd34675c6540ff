"""TensorBoard scalars: process 0 writes them, TensorBoard reads them back, and TensorFlow stays unloaded."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from conftest import REPO, read_scalars, subprocess_env

from diffax import summaries


def test_scalars_are_read_back_by_tensorboard(tmp_path):
    writer = summaries.scalar_writer(str(tmp_path))
    summaries.write_scalars(writer, 3, {"loss": jnp.float32(0.25), "count": 7})
    summaries.write_scalars(writer, 5, {"loss": np.float64(0.125)})
    writer.close()
    assert read_scalars(tmp_path) == {"loss": [(3, 0.25), (5, 0.125)], "count": [(3, 7.0)]}
    summaries.write_scalars(None, 1, {"loss": 1.0})  # what processes other than 0 hold: writes nothing


def test_training_and_evaluation_modules_do_not_import_tensorflow(tmp_path):
    """TensorFlow (a ~5 s import) loads only for tfds datasets, in diffax.data.tfds_source."""
    code = (
        "import sys; from diffax import evaluate, main, summaries, train;"
        "w = summaries.scalar_writer(sys.argv[1]); summaries.write_scalars(w, 1, {'loss': 1.0}); w.close();"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        env=subprocess_env(1),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    assert read_scalars(tmp_path) == {"loss": [(1, 1.0)]}
