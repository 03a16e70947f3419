"""The interleaved benchmark of every backend against this CPU's XNNPACK GEMM ceilings: ``benchmark`` (run it, the
result, the CLI), ``timing``, ``backends``, ``discovery``, ``flops``, ``ceilings``, ``targets``."""
