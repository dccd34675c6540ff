"""Backend-specific kernels, apart from the layers that call them.

``cpu/``: C++ kernels behind XLA's foreign function interface (``ffi``) and the Winograd convolution
(``winograd``), with the XLA formulations they are checked against.
"""
