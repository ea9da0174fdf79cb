"""What one rank's weight load did."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LoadReport:
    """What one rank's load did. Keys are the model's state-dict keys (without NeMo's ``module.``;
    ``model_<i>.`` in front for virtual pipeline chunk i > 0)."""

    checkpoint: str
    """The weights folder read."""
    loaded: list[str] = field(default_factory=list)
    """Keys whose values now come from the checkpoint."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Key -> the skip prefix that matched it."""
    missing: list[str] = field(default_factory=list)
    """Keys the checkpoint does not have, left as they were (``strict=False`` only)."""
    cast: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Key -> (checkpoint dtype, model dtype), where the values were converted."""
    bytes_read: int = 0
    """Bytes this rank read from the weights files (zip records and the gaps read between rows included)."""
    bytes_kept: int = 0
    """Bytes of the checkpoint's tensors this rank keeps (0 when megatron's load path ran)."""
    stock_reads: int = 0
    """Stored items read through ``torch.load`` because the direct reader does not parse them."""
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1

    @property
    def throughput(self) -> float:
        """Bytes read per second."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throughput": self.throughput}

    def __str__(self) -> str:
        lines = [
            f"{self.checkpoint}: loaded {len(self.loaded)} tensors, {self.bytes_read / 1e6:,.1f} MB in "
            f"{self.seconds:.2f} s ({self.throughput / 1e9:.2f} GB/s)"
            + (f" on rank {self.rank} of {self.world_size}" if self.world_size > 1 else "")
        ]
        by_prefix: dict[str, int] = {}
        for prefix in self.skipped.values():
            by_prefix[prefix] = by_prefix.get(prefix, 0) + 1
        lines += [f"skipped {n} tensors by prefix {prefix!r}" for prefix, n in by_prefix.items()]
        if self.missing:
            lines.append(f"not in the checkpoint, left as initialized: {', '.join(self.missing)}")
        lines += [f"cast {src} -> {dst}" for src, dst in sorted(set(self.cast.values()))]
        return "\n".join(lines)
