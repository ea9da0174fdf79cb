"""Hugging Face ESM-2 <-> NeMo 2 esm2 checkpoints (``bioconf convert``), against transformers' own
EsmForMaskedLM: small models made here with random weights (LayerNorms and biases included, so a
mis-mapped tensor shows), nothing downloaded."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from conftest import run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from bioconf.errors import CheckpointError, OutputExistsError  # noqa: E402

ESM2_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
"""The 33 tokens of ESM-2's vocabulary, in id order (<mask> is 32)."""

PROTEINS = (
    "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWSTPSELGHAGLNGDILVWNPVLEDAFELSSMGIRVDADTLKHQLALTGDEDRLELEWHQALLRGEMPQTIGGGIGQSRLTMLLLQLPHIGQVQCGVWPAACRESVPALL",
    "MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTFSYGVQCFSRYPDHMKQHDFFKSAMPEGYVQERTIFFKDDGNYKTRAEVKFEGDTLVNRIELKGIDFKEDGNILGHKLEYNYNSHNVYIMADKQKNGIKVNFKIRHNIEDGSVQLADHYQQNTPIGDGPVLLPDNHYLSTQSALSKDPNEKRDHMVLLEFVTAAGITHGMDELYK",
    "MALWMRLLPLLALLALWGPDPAAAFVNQHLCGSHLVEALYLVCGERGFFYTPKTRREAEDLQVGQVELGGGPGAGSLQPLALEGSLQKRGIVEQCCTSICSLYQLENYCN",
    "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHVDDMPNALSALSDLHAHKL",
)
"""Real protein sequences (GFP, insulin, hemoglobin alpha, ...), cut to the test's length below."""


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, LayerNorm weights and biases included (a mis-mapping cannot hide
    behind ones and zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(noise + 1.0 if "LayerNorm" in name or "layer_norm" in name else noise)
            if name.endswith("weight") and "LayerNorm" not in name and "layer_norm" not in name:
                param.mul_(0.5)


def make_hf_esm2(folder: Path, seed: int = 0, **changes) -> Path:
    """A small random ESM-2 masked LM saved as the public releases are (config.json + model.safetensors)."""
    options = dict(
        vocab_size=33,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        position_embedding_type="rotary",
        token_dropout=True,
        emb_layer_norm_before=False,
        mask_token_id=32,
        pad_token_id=1,
        max_position_embeddings=130,
        layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    options.update(changes)
    config = transformers.EsmConfig(**options)
    model = transformers.EsmForMaskedLM(config)
    _randomize(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def esm_tokenizer(tmp: Path):
    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(ESM2_VOCAB) + "\n")
    return transformers.EsmTokenizer(vocab_file=str(vocab))


def protein_batch(tokenizer, length: int = 48) -> dict[str, torch.Tensor]:
    """The proteins cut to different lengths (so the batch has padding), two residues of each
    replaced by <mask> (so token dropout acts), ESM's <cls> ... <eos> around each."""
    sequences = [protein[: length - 8 * i] for i, protein in enumerate(PROTEINS)]
    batch = tokenizer(sequences, padding=True, return_tensors="pt")
    batch["input_ids"][:, 5] = tokenizer.mask_token_id
    batch["input_ids"][0, 9] = tokenizer.mask_token_id
    return batch


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """An HF model, its NeMo checkpoint and the HF folder converted back (the Python API)."""
    from bioconf.convert.esm2 import hf_to_nemo, nemo_to_hf

    tmp = tmp_path_factory.mktemp("convert")
    hf = make_hf_esm2(tmp / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nemo = hf_to_nemo(hf, tmp / "nemo")
        back = nemo_to_hf(nemo, tmp / "back")
    return {"tmp": tmp, "hf": hf, "nemo": nemo, "back": back}


def test_round_trip_is_bit_exact(converted):
    original = safetensors_torch.load_file(converted["hf"] / "model.safetensors")
    back = safetensors_torch.load_file(converted["back"] / "model.safetensors")
    not_carried = {"esm.contact_head.regression.weight", "esm.contact_head.regression.bias"}
    assert set(original) - set(back) == not_carried
    assert set(back) <= set(original)
    for name, tensor in back.items():
        assert tensor.dtype == original[name].dtype, name
        assert torch.equal(tensor, original[name]), name  # inv_freq included: computed as HF does


def test_bfloat16_round_trip_is_bit_exact(converted, tmp_path):
    """A bfloat16 model stays bfloat16 (megatron's float32 layernorms are written back in it)."""
    from bioconf.convert.esm2 import hf_to_nemo, nemo_to_hf

    model = transformers.EsmForMaskedLM.from_pretrained(converted["hf"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = nemo_to_hf(hf_to_nemo(tmp_path / "hf", tmp_path / "nemo"), tmp_path / "back")
    original = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    for name, tensor in safetensors_torch.load_file(back / "model.safetensors").items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, original[name]), name


def test_a_checkpoint_written_for_bionemos_class_converts_with_vocab_size(converted, tmp_path):
    """A checkpoint whose io.json names BioNeMo's ESM2Config (no vocab_size, as BioNeMo writes):
    the padded embedding rows are what the checkpoint tells; ``vocab_size`` trims them."""
    from bioconf.checkpoint.context import read_checkpoint_config
    from bioconf.convert.esm2 import nemo_to_hf
    from bioconf.runtime.build import build_model
    from bioconf.runtime.config import materialize
    from bioconf.runtime.parallel import ensure_parallel_state
    from bioconf.runtime.save import save_checkpoint
    from bioconf.runtime.weights import load_weights_sharded_inplace_nemo2_to_mcore

    config = read_checkpoint_config(converted["nemo"]).config
    runtime = materialize(config)
    runtime.use_cpu_initialization = True
    with warnings.catch_warnings(), ensure_parallel_state(runtime):
        warnings.simplefilter("ignore")
        model = build_model(runtime)
        load_weights_sharded_inplace_nemo2_to_mcore(model, converted["nemo"], quiet=True)
        bionemo = save_checkpoint(model, config, tmp_path / "bionemo", config_class=BIONEMO_ESM2)
    assert "vocab_size" not in read_checkpoint_config(bionemo).config.model_fields_set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padded = nemo_to_hf(bionemo, tmp_path / "padded")
        back = nemo_to_hf(bionemo, tmp_path / "back", vocab_size=33)
    assert json.loads((padded / "config.json").read_text())["vocab_size"] == 128
    original = safetensors_torch.load_file(converted["hf"] / "model.safetensors")
    for name, tensor in safetensors_torch.load_file(back / "model.safetensors").items():
        assert torch.equal(tensor, original[name]), name


BIONEMO_ESM2 = "bionemo.esm2.model.model:ESM2Config"


def test_converted_config_reads_back_in_transformers(converted):
    original = transformers.EsmConfig.from_pretrained(converted["hf"])
    back = transformers.EsmConfig.from_pretrained(converted["back"])
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "position_embedding_type",
        "layer_norm_eps",
        "token_dropout",
        "mask_token_id",
        "pad_token_id",
        "emb_layer_norm_before",
    ):
        assert getattr(back, name) == getattr(original, name), name


def test_nemo_checkpoint_is_an_esm2_config(converted):
    from bioconf.checkpoint.context import read_checkpoint_config

    config = read_checkpoint_config(converted["nemo"]).config
    assert config.model_cls == "esm2"
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size, config.vocab_size) == (
        2,
        64,
        128,
        33,
    )
    assert config.bias_activation_fusion is False  # megatron's fused bias-gelu is tanh-approximate
    assert config.layernorm_epsilon == 1e-5


def hf_logits(folder: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.EsmForMaskedLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def megatron_logits(checkpoint: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """bioconf's esm2 model, built from the checkpoint's own config and loaded, on CPU in fp32."""
    from bioconf.checkpoint.context import read_checkpoint_config
    from bioconf.runtime.build import build_model
    from bioconf.runtime.config import materialize
    from bioconf.runtime.forward import cpu_forward, forward_logits
    from bioconf.runtime.parallel import ensure_parallel_state
    from bioconf.runtime.weights import load_weights_sharded_inplace_nemo2_to_mcore

    runtime = materialize(read_checkpoint_config(checkpoint).config)
    runtime.use_cpu_initialization = True
    with ensure_parallel_state(runtime):
        model = build_model(runtime)
        load_weights_sharded_inplace_nemo2_to_mcore(model, checkpoint, quiet=True)
        with cpu_forward():
            logits = forward_logits(model, batch["input_ids"], attention_mask=batch["attention_mask"])
    return logits[..., : runtime.vocab_size]


def hf_logits_one_by_one(folder: Path, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """transformers' logits of each sequence run alone, without padding: transformers 4.57's
    EsmModel does not hand the attention mask to its embeddings, so in a padded batch its token
    dropout divides by the padded length, not the sequence's (huggingface/transformers#44162, fixed
    by #44163); run alone, the two lengths are the same and it computes what ESM-2 computes."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    return [
        hf_logits(folder, {name: tensor[i : i + 1, :n] for name, tensor in batch.items()})[0]
        for i, n in enumerate(lengths)
    ]


def test_megatron_logits_match_transformers(converted):
    """fp32 on CPU: bioconf's megatron model on a padded batch with <mask> tokens and transformers'
    EsmForMaskedLM agree within 1e-4 on every real token (padding positions are not compared:
    neither model defines their output)."""
    batch = protein_batch(esm_tokenizer(converted["tmp"]))
    assert batch["attention_mask"].sum(-1).unique().numel() == len(PROTEINS)  # padding is exercised
    ours = megatron_logits(converted["nemo"], batch)
    theirs = hf_logits_one_by_one(converted["hf"], batch)
    diff = max((ours[i, : len(t)] - t).abs().max().item() for i, t in enumerate(theirs))
    print(f"max abs logits diff (fp32, CPU): {diff:.3g}")
    assert diff <= 1e-4


def test_megatron_logits_match_a_padded_transformers_batch_without_masks(converted):
    """Padding alone (no <mask> token, so transformers' token-dropout scale is 1 either way): the
    batch logits agree as they are."""
    batch = protein_batch(esm_tokenizer(converted["tmp"]))
    batch["input_ids"][batch["input_ids"] == 32] = ESM2_VOCAB.index("A")
    real = batch["attention_mask"].bool()
    diff = (hf_logits(converted["hf"], batch) - megatron_logits(converted["nemo"], batch)).abs()[real].max()
    assert diff.item() <= 1e-4


def test_converted_back_folder_gives_transformers_the_same_logits(converted):
    batch = protein_batch(esm_tokenizer(converted["tmp"]))
    assert torch.equal(hf_logits(converted["back"], batch), hf_logits(converted["hf"], batch))


# ---- refusals ------------------------------------------------------------------------------------


def _refusal(folder: Path) -> CheckpointError:
    from bioconf.convert.esm2 import hf_to_nemo

    with pytest.raises(CheckpointError) as caught:
        hf_to_nemo(folder, folder.parent / f"{folder.name}-out")
    assert not (folder.parent / f"{folder.name}-out").exists()
    return caught.value


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def hf_copy(converted, tmp_path) -> Path:
    return Path(shutil.copytree(converted["hf"], tmp_path / "hf"))


def test_refuses_a_folder_without_config_json(hf_copy):
    (hf_copy / "config.json").unlink()
    error = _refusal(hf_copy)
    assert "no config.json" in str(error) and str(hf_copy / "config.json") in str(error)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_type", "bert"),
        ("position_embedding_type", "absolute"),
        ("emb_layer_norm_before", True),
        ("is_folding_model", True),
        ("hidden_size", "64"),
        ("num_attention_heads", 5),
    ],
)
def test_refuses_a_config_that_is_not_esm2(hf_copy, field, value):
    _edit_config(hf_copy, **{field: value})
    error = _refusal(hf_copy)
    issue = error.issues[0]
    assert issue.loc == (field,) and issue.source == str(hf_copy / "config.json"), str(error)


def test_refuses_missing_and_unknown_tensors(hf_copy):
    weights = safetensors_torch.load_file(hf_copy / "model.safetensors")
    del weights["esm.encoder.layer.1.attention.self.key.bias"]
    safetensors_torch.save_file(weights, hf_copy / "model.safetensors", metadata={"format": "pt"})
    error = _refusal(hf_copy)
    assert "missing tensors esm.encoder.layer.1.attention.self.key.bias" in str(error)
    weights["esm.encoder.layer.1.attention.self.key.bias"] = torch.zeros(64)
    weights["esm.embeddings.position_embeddings.weight"] = torch.zeros(130, 64)
    safetensors_torch.save_file(weights, hf_copy / "model.safetensors", metadata={"format": "pt"})
    assert "esm.embeddings.position_embeddings.weight" in str(_refusal(hf_copy))


def test_refuses_a_tensor_of_the_wrong_shape(hf_copy):
    weights = safetensors_torch.load_file(hf_copy / "model.safetensors")
    weights["lm_head.dense.weight"] = torch.zeros(64, 32)
    safetensors_torch.save_file(weights, hf_copy / "model.safetensors", metadata={"format": "pt"})
    assert _refusal(hf_copy).issues[0].loc == ("lm_head.dense.weight",)


def test_refuses_a_damaged_safetensors_file(hf_copy):
    path = hf_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    error = _refusal(hf_copy)
    assert str(path) in str(error)


def test_refuses_a_non_esm2_nemo_checkpoint(tmp_path, small_gpt):
    from bioconf.convert.esm2 import nemo_to_hf
    from bioconf.runtime.initialize import init_checkpoint
    from bioconf.schema.model import ModelConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt = init_checkpoint(ModelConfig(**small_gpt), tmp_path / "gpt")
    with pytest.raises(CheckpointError) as caught:
        nemo_to_hf(gpt, tmp_path / "out")
    assert caught.value.issues[0].loc == ("model_cls",)
    assert not (tmp_path / "out").exists()


def test_refuses_an_existing_output(converted):
    from bioconf.convert.esm2 import nemo_to_hf

    with pytest.raises(OutputExistsError):
        nemo_to_hf(converted["nemo"], converted["back"])


# ---- the command line ------------------------------------------------------------------------------


def test_cli_converts_both_ways(converted, tmp_path):
    done = run_cli("convert", "hf-to-nemo", str(converted["hf"]), str(tmp_path / "nemo"))
    assert done.returncode == 0, done.stderr.decode()
    done = run_cli("convert", "nemo-to-hf", str(tmp_path / "nemo"), str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr.decode()
    original = safetensors_torch.load_file(converted["hf"] / "model.safetensors")
    back = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(back[name], original[name]) for name in back)


def test_cli_refusal_is_an_error_message_not_a_traceback(hf_copy):
    _edit_config(hf_copy, position_embedding_type="absolute")
    done = run_cli("convert", "hf-to-nemo", str(hf_copy), str(hf_copy.parent / "out"))
    assert done.returncode == 2
    stderr = done.stderr.decode()
    assert "Traceback" not in stderr
    assert f"{hf_copy / 'config.json'}: position_embedding_type:" in stderr
