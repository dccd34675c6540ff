"""GPU kernels: cuDNN fused attention where it applies (``attention``)."""
