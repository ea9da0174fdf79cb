"""Real BioNeMo checkpoints, end to end: written by BioNeMo's own code (bionemo-llm 2.4.5, ESM-2 and
Geneformer from their last sources) in the separate virtualenv ``make bionemo-env`` makes, where
bioconf is not installed; inspected, resolved, run and saved by bioconf at TP=1 and TP=2; and loaded
back by BioNeMo, every tensor compared by its sha256."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from conftest import ROOT, run_cli

from bioconf.checkpoint.context import read_checkpoint_config
from bioconf.resolve import resolve
from bioconf.runtime.run import run
from bioconf.schema import ModelConfig

FAMILIES = ("esm2", "geneformer", "biobert")
BIONEMO_ENV = ROOT / "tests" / "bionemo_env"
BIONEMO_VENV = ROOT / ".venv-bionemo"
BIONEMO_PYTHON = BIONEMO_VENV / "bin" / "python"
CACHE = ROOT / ".bioconf-cache" / "bionemo"

pytestmark = pytest.mark.skipif(
    not (BIONEMO_VENV / ".installed").exists(),  # written by `make bionemo-env` once it succeeded
    reason=f"no BioNeMo environment in {BIONEMO_VENV}: `make bionemo-env` makes it (it needs the package "
    "index and ../shared/bionemo; `make test` tries it and says so when it cannot)",
)


def bionemo(script: str, *args: str) -> dict[str, Any]:
    """Run a script of tests/bionemo_env with BioNeMo's python; its last stdout line is JSON."""
    result = subprocess.run(
        [str(BIONEMO_PYTHON), str(BIONEMO_ENV / script), *args],
        capture_output=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return orjson.loads(result.stdout.splitlines()[-1])


def _version() -> str:
    """Cached checkpoints are remade when the scripts that write them change."""
    digest = hashlib.sha256()
    for script in sorted(BIONEMO_ENV.glob("*.py")):
        digest.update(script.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def written() -> dict[str, tuple[Path, dict[str, Any]]]:
    """family -> (checkpoint BioNeMo wrote, what it printed: config class, digests, keys). Written once
    (into .bioconf-cache, shared by test workers and runs)."""
    out = {}
    for family in FAMILIES:
        folder = CACHE / _version() / family
        report = folder.with_suffix(".json")
        if not report.exists():
            staging = folder.with_name(f".{family}-{uuid.uuid4().hex[:8]}")
            data = bionemo("write_checkpoint.py", "--family", family, "--out", str(staging))
            try:
                staging.rename(folder)
                report.write_bytes(orjson.dumps(data))  # last: its presence means the folder is whole
            except OSError:  # another worker made it first: wait for its report
                shutil.rmtree(staging, ignore_errors=True)
                for _ in range(600):
                    if report.exists():
                        break
                    time.sleep(0.1)
        out[family] = (folder, orjson.loads(report.read_bytes()))
    return out


def digests(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of each state-dict tensor's raw bytes, keyed as the BioNeMo scripts key them."""
    result = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            result[key] = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    return result


def without(prefix: str, mapping: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in mapping.items() if not key.startswith(prefix)}


@pytest.mark.parametrize("family", FAMILIES)
def test_bioconf_reads_a_bionemo_checkpoint_as_its_family(written, family):
    folder, source = written[family]
    checkpoint = read_checkpoint_config(folder)
    assert checkpoint.class_path.replace(":", ".") == source["config_class"]
    assert checkpoint.config.model_cls == family and checkpoint.bionemo_family in (family, None)
    assert checkpoint.defaults_known == (family != "biobert")  # a BioBERT subclass is the user's own
    assert checkpoint.dropped == {}
    if family == "esm2":  # a class in io.json: read as its name, never imported
        assert checkpoint.unknown_fields["core_attention_override"] == (
            "megatron.core.transformer.dot_product_attention:DotProductAttention"
        )

    result = run_cli("inspect", str(folder), "--format", "json")
    assert result.returncode == 0, result.stderr.decode()
    inspected = orjson.loads(result.stdout)
    assert inspected["config"]["fields"]["num_layers"] == 2
    stored = {t["name"].removeprefix("module."): t["shape"] for t in inspected["weights"]["tensors"]}
    for key, (shape, _) in source["checkpoint_keys"].items():
        if shape != "object":
            assert stored[key.removeprefix("module.")] == shape, key


@pytest.mark.parametrize("family", FAMILIES)
def test_resolve_takes_the_vocabulary_from_the_weights(written, family):
    folder, source = written[family]
    resolved = resolve(ModelConfig(model_cls=family), folder)
    report = resolved.to_dict()
    assert report["fields"]["vocab_size"] == {"value": source["vocab_size"], "source": "checkpoint weights"}
    assert report["fields"]["num_layers"] == {"value": 2, "source": "checkpoint"}
    assert report["fields"]["model_cls"]["source"] == "user"


@pytest.mark.parametrize("family", FAMILIES)
def test_run_loads_bioNeMo_weights_bit_exact_at_tp1(written, family):
    folder, source = written[family]
    report = run(ModelConfig(model_cls=family, initial_ckpt_path=str(folder)), quiet=True)
    (model,) = report.models
    assert digests(model) == source["sha256"]


def test_the_esm2_finetune_of_the_readme_runs(written):
    folder, source = written["esm2"]
    config = ModelConfig.model_validate(
        {
            "model_cls": "esm2",
            "initial_ckpt_path": str(folder),
            "hidden_dropout": 0.1,
            "initial_ckpt_skip_keys_with_these_prefixes": ["lm_head."],
        }
    )
    report = run(config, quiet=True)
    (model,) = report.models
    assert model.config.hidden_dropout == 0.1 and model.config.position_embedding_type == "rope"
    ours = digests(model)
    assert without("lm_head.", ours) == without("lm_head.", source["sha256"])
    assert ours.keys() == source["sha256"].keys()


@pytest.mark.parametrize("family", FAMILIES)
def test_run_at_tp2_saves_what_bioNeMo_loads_back(written, family, tmp_path):
    folder, source = written[family]
    config = tmp_path / "tp2.json"
    config.write_bytes(
        orjson.dumps({"model_cls": family, "initial_ckpt_path": str(folder), "tensor_model_parallel_size": 2})
    )
    saved = tmp_path / "saved"
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "bioconf", "run", str(config), "--save", str(saved), "--format", "json",
        ],
        capture_output=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-3000:]

    back = bionemo("read_back.py", str(saved))
    assert back["config_class"].replace(":", ".") == source["config_class"]  # BioNeMo's class, not bioconf's
    assert back["sha256"] == source["sha256"]
    assert read_checkpoint_config(saved).class_path == read_checkpoint_config(folder).class_path


def test_the_seed_compatible_api_loads_a_bionemo_checkpoint(written, parallel):
    """As BioNeMo's ``ESM2Config(initial_ckpt_path=...).configure_model(tokenizer)``, without BioNeMo."""
    from bioconf.runtime.config import ESM2ModelConfig

    folder, source = written["esm2"]
    config = ESM2ModelConfig(initial_ckpt_path=str(folder), use_cpu_initialization=True)
    built = config.build_and_load(quiet=True)
    assert config.num_layers == 2 and config.vocab_size == source["vocab_size"]  # from the checkpoint
    assert built.settings.class_path == "bionemo.esm2.model.model:ESM2Config"
    assert digests(built.model) == source["sha256"]


def test_a_bionemo_esm2_checkpoint_converts_to_hugging_face_and_back(written, tmp_path):
    """BioNeMo's ESM-2 -> transformers' EsmForMaskedLM folder -> NeMo: every weight comes back (the
    embedding's padding rows aside: HF holds the 33 real tokens, the way back pads with zeros)."""
    transformers = pytest.importorskip("transformers")
    from bioconf.convert.esm2 import hf_to_nemo, nemo_to_hf

    folder, source = written["esm2"]
    hf = nemo_to_hf(folder, tmp_path / "hf", vocab_size=33)
    model = transformers.EsmForMaskedLM.from_pretrained(hf)
    assert model.config.vocab_size == 33 and model.config.num_hidden_layers == 2
    back = hf_to_nemo(hf, tmp_path / "nemo")
    (ours,) = run(ModelConfig(model_cls="esm2", initial_ckpt_path=str(back)), quiet=True).models
    (theirs,) = run(ModelConfig(model_cls="esm2", initial_ckpt_path=str(folder)), quiet=True).models
    vocab = ("embedding.word_embeddings.weight", "output_layer.bias")
    assert {k: v for k, v in digests(ours).items() if k not in vocab} == {
        k: v for k, v in source["sha256"].items() if k not in vocab
    }
    for key in vocab:
        assert torch.equal(ours.state_dict()[key][:33], theirs.state_dict()[key][:33]), key
