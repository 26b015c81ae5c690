"""Nothing under tests/sglang_compat is a pytest test: the shim and the runner drive SGLang's own test files,
which live outside the repository (see README.md). Keep `python -m pytest` from the repo root out of here."""

collect_ignore_glob = ["*"]
