"""NeMo 2 checkpoints as data: ``layout`` (where their parts lie), ``context`` (the model config in
``context/io.json``, read and written without importing anything it names), ``unpickling`` (the one
allow-list for every pickle a checkpoint holds), ``weights_index`` (the tensor index of
``weights/.metadata``), ``shapes`` (which weights each config field shapes) and ``inspection``
(``bioconf inspect``).

Imports pydantic, orjson and PyYAML only, like ``bioconf.schema``: no torch, megatron, fiddle or
nemo. The modules are not imported here, so a caller pays only for the ones it uses.
"""
