"""radixserve's router: `python -m radixserve.launch_router` (SGLang router's flags) in front of
regular or prefill/decode (PD) servers."""
