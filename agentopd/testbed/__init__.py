"""Testbeds that run on a laptop CPU: ``tiny`` (an untrained Llama built from a config, for tests)
and ``micro`` (a 1.1M-parameter model warm-started on procedural code and math, shipped)."""
