"""A stand-in for the few names of the `sglang` package that SGLang's OpenAI-server test files import.

Nothing here is SGLang code: each name is written from scratch for radixserve, so that those test files
can run unchanged against `python -m radixserve.launch_server` (see tests/sglang_compat/README.md).
"""

__version__ = "0.0.0+radixserve-compat-shim"
