"""Token generation: KV-cache prefill and decoding, sampling, lower-precision weights."""
