"""Quantization: bit-exact NVFP4 / FP8 codecs, recipes, weight-only quantized linears, fake-quant for training."""
