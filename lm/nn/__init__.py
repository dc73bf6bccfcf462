"""The network: layers (norms, RoPE, attention and its kernels, mixture of experts, low-precision
kernels, the block), the models built from them, and muP."""
