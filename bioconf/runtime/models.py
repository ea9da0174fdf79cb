"""The model pieces the BioNeMo families need beyond megatron-core's own: ESM-2's embedding behaviour
and its query scaling. Both add no parameters, so the module tree and its state-dict keys stay
megatron's BertModel's (what BioNeMo's ``MegatronBioBertModel`` and ``ESM2Model`` build too).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.transformer.transformer_config import TransformerConfig

ESM2_MASK_RATIO_TRAIN = 0.15 * 0.8
"""The share of tokens ESM-2's training replaced by <mask> (15% chosen, 80% of those masked): token
dropout rescales embeddings as if that share were dropped."""


class QueryScaling(torch.nn.Module):
    """ESM's attention scaling: the query divided by sqrt(head size) before the rotary embedding (ESM
    scales there; with ``softmax_scale=1.0`` the attention then computes what ESM computes). Built in
    the place of the query layernorm, whose constructor arguments it takes."""

    def __init__(self, hidden_size: int, config: TransformerConfig, eps: float = 0.0) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(hidden_size)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        return query * self.scale


class ESM2Model(BertModel):
    """megatron's BertModel with ESM-2's embedding: token dropout (mask tokens zeroed, the rest scaled
    by how many were masked) and padding positions zeroed, per ``config.token_dropout`` and
    ``config.use_attention_mask``. Both act on the word embeddings and need the attention mask, which
    megatron's BertModel does not hand its embedding: ``forward`` keeps it for the embedding's hook."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._attention_mask: torch.Tensor | None = None
        if self.pre_process:
            self.embedding.word_embeddings.register_forward_hook(self._esm_embeddings)
            if self.embedding.add_position_embedding:
                self.embedding.register_forward_hook(self._zero_padding_after_positions)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        self._attention_mask = attention_mask
        try:
            return super().forward(input_ids, attention_mask, *args, **kwargs)
        finally:
            self._attention_mask = None

    def _esm_embeddings(self, module: Any, args: tuple[Any, ...], embeddings: torch.Tensor) -> torch.Tensor:
        """[b, s, h] word embeddings of ``args[0]`` (the input ids), as ESM-2 changes them."""
        mask = self._attention_mask
        if mask is None:
            return embeddings
        input_ids = args[0]
        if self.config.token_dropout:
            is_mask = (input_ids == self.config.mask_token_id).unsqueeze(-1)
            embeddings = embeddings.masked_fill(is_mask, 0.0)
            observed = is_mask.sum((-2, -1)).to(embeddings.dtype) / mask.sum(-1)
            scale = (1 - ESM2_MASK_RATIO_TRAIN) / (1 - observed)
            embeddings = (embeddings * scale[:, None, None]).to(embeddings.dtype)
        if self.config.use_attention_mask:
            embeddings = (embeddings * mask.unsqueeze(-1)).to(embeddings.dtype)
        return embeddings

    def _zero_padding_after_positions(self, module: Any, args: Any, embeddings: torch.Tensor) -> torch.Tensor:
        """With learned positions ESM zeroes padding again after adding them ([s, b, h] here)."""
        mask = self._attention_mask
        if mask is None or not self.config.use_attention_mask:
            return embeddings
        return (embeddings * mask.transpose(0, 1).unsqueeze(-1)).to(embeddings.dtype)
