"""Weight quantization that keeps the nesting: every budget's prefix is whole quantization groups.

- :mod:`flexc.ir.quant.scheme`: the schemes (``w8a16``, ``w4a16``) as compressed-tensors' quantization
  arguments, symmetric int, one scale per group of input channels.
- :mod:`flexc.ir.quant.nested`: round-to-nearest and a GPTQ-style error-compensating quantizer whose
  compensation never crosses a width a budget can cut at, so each budget's prefix is the
  quantization of that budget's own weights.

The ``quantize`` pass (:mod:`flexc.passes.quantize`) applies them to a compile's routed experts.
"""
