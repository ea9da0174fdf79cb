"""Classes a BioBERT test checkpoint names in its ``context/io.json``.

``BioBertConfig`` (bionemo-llm) is documented as "do not use this config directly, define a child config",
and only a leaf that mixes in ``IOMixinWithGettersSetters`` records its init arguments for io.json (as
``GeneformerConfig`` and ``ESM2Config`` do). NeMo's ``io.load_context`` re-imports every class that
io.json names, so these must live in an importable module: put ``tests/bionemo_env`` on ``sys.path``
(the scripts here have it as their own directory) before loading such a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from bionemo.llm.data.label2id_tokenizer import Label2IDTokenizer
from bionemo.llm.model.biobert.model import BioBertConfig, MegatronBioBertModel
from bionemo.llm.utils.iomixin_utils import IOMixinWithGettersSetters
from nemo.lightning import io


@dataclass
class BioBertTestConfig(BioBertConfig, IOMixinWithGettersSetters):
    """The smallest leaf of BioBertConfig: BioNeMo's own BERT model and defaults, nothing overridden
    but what a leaf must name (the model class)."""

    model_cls: type[MegatronBioBertModel] = MegatronBioBertModel


class TinyTokenizer(Label2IDTokenizer, io.IOMixin):
    """A whole-token vocabulary (bionemo-llm's Label2IDTokenizer) made locally, nothing downloaded.
    IOMixin so that NeMo can serialize it as the LightningModule's ``tokenizer`` argument."""

    mask_token = "<mask>"

    def __init__(self, tokens: list[str]) -> None:
        super().__init__()
        self.vocab = {token: i for i, token in enumerate(tokens)}
        self.decode_vocab = {i: token for token, i in self.vocab.items()}

    @property
    def mask_token_id(self) -> int:
        return self.vocab[self.mask_token]
