"""TPU kernels: Pallas flash attention (``attention``)."""
