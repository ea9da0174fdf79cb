"""bioconf: validated configs for Megatron-Core biological foundation models, and starting them
from NeMo 2 checkpoints.

``bioconf.schema`` validates and serializes configs without torch; ``bioconf.runtime`` turns them
into Megatron configs and models and loads checkpoint weights.
"""

__version__ = "0.1.0"
