"""Prefill/decode disaggregation: moving a request's KV from a prefill server to a decode server."""
