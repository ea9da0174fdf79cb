"""Weights into a Megatron model from a NeMo 2 checkpoint: ``plan`` (the checks before any read),
``direct`` (plain tensors read straight into the model), ``reader`` (the DCP reader for the rest),
``report`` (what a load did), ``load`` (the entry point)."""

from bioconf.runtime.weights.load import load_weights_sharded_inplace_nemo2_to_mcore, read_dcp_metadata
from bioconf.runtime.weights.report import LoadReport

__all__ = ["LoadReport", "load_weights_sharded_inplace_nemo2_to_mcore", "read_dcp_metadata"]
