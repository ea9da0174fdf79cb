"""Converting between bioconf's NeMo 2 checkpoints and other formats: Hugging Face's ESM-2
(``EsmForMaskedLM``) both ways (``bioconf.convert.esm2``; ``bioconf convert hf-to-nemo`` and
``bioconf convert nemo-to-hf``). Runs after the runtime layer: it builds and loads models with it."""
