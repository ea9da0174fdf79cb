"""The sections of a config form, in order: each field's ``x-group`` names one."""

from __future__ import annotations

from typing import Final

GROUPS: Final[dict[str, str]] = {
    "architecture": "Architecture",
    "attention": "Attention",
    "parallelism": "Parallelism",
    "precision": "Precision",
    "fusions": "Fusions and kernels",
    "moe": "Mixture of experts",
    "outputs": "Model outputs (BioNeMo)",
    "checkpoint": "Starting checkpoint",
    "other": "Other",
}
"""Group name -> title, in the order a form shows them."""
