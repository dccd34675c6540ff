"""CPU kernels: the C++ FFI kernels (``ffi``: attention, GroupNorm, Winograd transforms) and the
Winograd convolution built on them (``winograd``)."""
