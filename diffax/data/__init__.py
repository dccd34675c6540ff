"""Input pipelines: tfds datasets and built-in sources (digits, Gaussian mixture, text corpus, Markov source)
→ global batches."""

from diffax.data import markov, text
from diffax.data.digits import load_digits
from diffax.data.mixture import mixture_means, mixture_sample
from diffax.data.pipeline import (
    BUILTIN_DATASETS,
    ArrayPipeline,
    MixturePipeline,
    Pipeline,
    finish_batch,
    image_shape,
    make_pipeline,
    to_global,
)

__all__ = [
    "BUILTIN_DATASETS",
    "ArrayPipeline",
    "MixturePipeline",
    "Pipeline",
    "finish_batch",
    "image_shape",
    "load_digits",
    "markov",
    "make_pipeline",
    "mixture_means",
    "mixture_sample",
    "text",
    "to_global",
]
