"""Precedence when starting from a checkpoint: both policies, sources, the shape rule, the CLI.

Checkpoints are real NeMo 2 contexts written by ``write_checkpoint_context`` (no weights are needed:
the shape rule runs before any weight is touched). One test builds tiny megatron-core models in a
fresh process to check the field -> weight-prefix table against megatron's real state-dict keys.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import ROOT, run_cli
from pydantic import ValidationError

from bioconf.checkpoint.context import read_checkpoint_config, write_checkpoint_context
from bioconf.checkpoint.shapes import SHAPE_PREFIXES, shaped_weights
from bioconf.errors import (
    CheckpointError,
    CheckpointMismatchError,
    InvalidMergeError,
    UsageError,
)
from bioconf.resolve import keep_list, resolve
from bioconf.schema import OVERRIDE_BIONEMO_CONFIG_DEFAULTS, ModelConfig

BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128, "seq_length": 32}


def _config(**fields: Any) -> ModelConfig:
    return ModelConfig.model_validate(fields)


def _checkpoint(tmp_path: Path, name: str = "ckpt", **fields: Any) -> Path:
    path = tmp_path / name
    write_checkpoint_context(_config(**{**BASE, **fields}), path)
    return path


def _edit_checkpoint(
    ckpt: Path, *, class_module: str | None = None, add: dict[str, Any] | None = None
) -> None:
    """Rename the checkpoint's config class, or add arguments bioconf does not model."""
    path = ckpt / "context" / "io.json"
    document = json.loads(path.read_text())
    objects = document["objects"]
    node = next(n for n in objects.values() if "<root>.model.config" in n.get("paths", ()))
    metadata = dict(objects[node["metadata"]["key"]]["items"])
    if class_module is not None:
        metadata["Attr(name='fn_or_cls')"]["module"] = class_module
    names = objects[metadata["Attr(name='argument_names')"]["key"]]["items"]
    for name, value in (add or {}).items():
        node["items"].append([f"Attr(name={name!r})", {"type": "leaf", "value": value}])
        names.append([f"Index(index={len(names)})", name])
    path.write_text(json.dumps(document))


def _mismatched_fields(error: CheckpointMismatchError) -> set[str]:
    return {issue.field for issue in error.issues}


# ---- the two policies ---------------------------------------------------------------------------------


def test_seed_takes_the_checkpoints_value_explicit_keeps_the_users(tmp_path):
    ckpt = _checkpoint(tmp_path, hidden_dropout=0.1)
    finetune = _config(**BASE, hidden_dropout=0.2, initial_ckpt_path=str(ckpt))

    seed = resolve(finetune, policy="seed")
    assert seed.config.hidden_dropout == 0.1
    assert seed.sources["hidden_dropout"] == "checkpoint"
    assert seed.notes == [
        "hidden_dropout: this config sets 0.2, but the checkpoint's 0.1 is used "
        "(policy 'seed' keeps only override_parent_fields)"
    ]

    explicit = resolve(finetune)  # the default policy, checkpoint from initial_ckpt_path
    assert explicit.policy == "explicit"
    assert explicit.config.hidden_dropout == 0.2
    assert explicit.sources["hidden_dropout"] == "user"
    assert explicit.notes == []
    assert explicit.checkpoint.path == ckpt / "context" / "io.json"


def test_keep_list_per_policy(tmp_path):
    config = _config(
        **BASE,
        bf16=True,
        params_dtype="bf16",
        hidden_dropout=0.0,
        override_parent_fields=["model_cls", "bf16", "train_metric"],
    )
    seed = keep_list(config, "seed")
    assert seed == ("model_cls", "bf16", "train_metric")
    explicit = keep_list(config)
    extra = [n for n in ModelConfig.model_fields if n in config.model_fields_set and n != "bf16"]
    assert explicit == (*seed, *extra)
    assert explicit[3:6] == ("params_dtype", "num_layers", "hidden_size")  # schema order
    assert len(set(explicit)) == len(explicit)

    ckpt = _checkpoint(tmp_path, params_dtype="float16", hidden_dropout=0.3)
    resolved = resolve(config, ckpt, policy="seed")
    assert resolved.keep == seed  # what the runtime gets as override_parent_fields
    assert (resolved.config.bf16, resolved.sources["bf16"]) == (True, "user")
    assert (resolved.config.params_dtype, resolved.sources["params_dtype"]) == ("float16", "checkpoint")
    assert (resolved.config.hidden_dropout, resolved.sources["hidden_dropout"]) == (0.3, "checkpoint")
    with pytest.raises(UsageError, match="policy"):
        keep_list(config, "newest")  # type: ignore[arg-type]


def test_every_field_has_a_source(tmp_path):
    ckpt = _checkpoint(tmp_path, attention_dropout=0.05, ffn_hidden_size=192)
    keep = [*OVERRIDE_BIONEMO_CONFIG_DEFAULTS, "hidden_dropout"]
    resolved = resolve(_config(**BASE, hidden_dropout=0.2, override_parent_fields=keep), ckpt, policy="seed")
    sources = resolved.sources
    assert sources.keys() == ModelConfig.model_fields.keys()
    assert sources["hidden_dropout"] == "user"
    assert sources["attention_dropout"] == sources["num_layers"] == "checkpoint"
    assert (resolved.config.ffn_hidden_size, sources["ffn_hidden_size"]) == (192, "checkpoint")
    assert sources["layernorm_epsilon"] == sources["moe_ffn_hidden_size"] == "default"
    # Derived: shown with their value, left None in the config so megatron derives them.
    assert resolved.derived == {"kv_channels": 16, "num_query_groups": 4}
    assert sources["kv_channels"] == sources["num_query_groups"] == "derived"
    assert resolved.config.kv_channels is None and resolved.config.num_query_groups is None
    assert resolved.config.model_fields_set == {n for n, s in sources.items() if s in ("user", "checkpoint")}


def test_derived_values_come_from_the_final_values(tmp_path):
    ckpt = _checkpoint(tmp_path)  # hidden_size 64
    finetune = _config(**{**BASE, "hidden_size": 128})
    resolved = resolve(finetune, ckpt, policy="seed")  # hidden_size is not kept: 64 wins
    assert resolved.config.hidden_size == 64
    assert resolved.derived["ffn_hidden_size"] == 256
    assert resolved.derived["kv_channels"] == 16
    assert "hidden_size: this config sets 128, but the checkpoint's 64 is used" in resolved.notes[0]


def test_checkpoint_left_to_default_is_a_default(tmp_path):
    # Under "seed" a field the config sets but does not keep falls to the checkpoint, which left it
    # to its default: the default wins, and the note says so.
    resolved = resolve(_config(**BASE, layernorm_epsilon=1e-6), _checkpoint(tmp_path), policy="seed")
    assert (resolved.config.layernorm_epsilon, resolved.sources["layernorm_epsilon"]) == (1e-5, "default")
    assert resolved.notes == [
        "layernorm_epsilon: this config sets 1e-06, but the default 1e-05 is used "
        "(policy 'seed' keeps only override_parent_fields)"
    ]


# ---- the shape rule ------------------------------------------------------------------------------------


def test_kept_shape_field_that_does_not_fit_is_an_error(tmp_path):
    ckpt = _checkpoint(tmp_path)
    finetune = _config(**{**BASE, "hidden_size": 128})
    with pytest.raises(CheckpointMismatchError) as raised:
        resolve(finetune, ckpt)
    assert raised.value.exit_code == 3 and raised.value.status == 409
    # hidden_size, and the sizes megatron derives from it
    assert _mismatched_fields(raised.value) == {"hidden_size", "ffn_hidden_size", "kv_channels"}
    issue = next(i for i in raised.value.issues if i.field == "hidden_size")
    assert issue.input == {"config": 128, "checkpoint": 64}
    assert issue.message.startswith("128 here (from this config) but 64 in the checkpoint")
    assert (
        "not skipped: embedding.word_embeddings., embedding.position_embeddings., decoder." in issue.message
    )
    ffn = next(i for i in raised.value.issues if i.field == "ffn_hidden_size")
    assert "512 here (derived) but 256" in ffn.message
    assert "decoder.layers.{0..1}.mlp." in ffn.message


def test_effective_values_compare_after_derivation(tmp_path):
    ckpt = _checkpoint(tmp_path)  # ffn_hidden_size, kv_channels, num_query_groups: None
    same = _config(**BASE, ffn_hidden_size=256, kv_channels=16, num_query_groups=4)
    resolved = resolve(same, ckpt)
    assert resolved.config.ffn_hidden_size == 256 and resolved.sources["ffn_hidden_size"] == "user"
    assert resolved.notes == []
    with pytest.raises(CheckpointMismatchError) as raised:
        resolve(_config(**BASE, num_query_groups=2), ckpt)
    assert _mismatched_fields(raised.value) == {"num_query_groups"}


@pytest.mark.parametrize(
    ("model_cls", "shared", "skips", "fits"),
    [
        ("gpt", False, [], False),
        ("gpt", False, ["embedding.word_embeddings."], False),
        ("gpt", False, ["embedding.", "output_layer."], True),
        ("gpt", True, ["embedding.word_embeddings."], True),  # the output layer is the embedding
        ("bert", True, ["embedding.word_embeddings."], False),  # BERT keeps output_layer.bias
        ("bert", True, ["embedding.word_embeddings.", "output_layer."], True),
    ],
)
def test_vocab_size_is_excused_when_all_its_weights_are_skipped(tmp_path, model_cls, shared, skips, fits):
    arch = {"model_cls": model_cls, "share_embeddings_and_output_weights": shared}
    ckpt = _checkpoint(tmp_path, **arch)
    finetune = _config(
        **{**BASE, "vocab_size": 256}, **arch, initial_ckpt_skip_keys_with_these_prefixes=skips
    )
    if fits:
        resolved = resolve(finetune, ckpt)
        assert resolved.config.vocab_size == 256
        assert resolved.notes == [
            "vocab_size: 256 here (from this config) but 128 in the checkpoint: fine, every weight it "
            "shapes is skipped"
        ]
    else:
        with pytest.raises(CheckpointMismatchError) as raised:
            resolve(finetune, ckpt)
        assert _mismatched_fields(raised.value) == {"vocab_size"}


def test_hidden_size_needs_every_weight_skipped(tmp_path):
    ckpt = _checkpoint(tmp_path)
    wider = {**BASE, "hidden_size": 128}
    with pytest.raises(CheckpointMismatchError) as raised:
        resolve(_config(**wider, initial_ckpt_skip_keys_with_these_prefixes=["embedding.", "decoder."]), ckpt)
    # the derived ffn_hidden_size and kv_channels shape only decoder weights: those are excused
    assert _mismatched_fields(raised.value) == {"hidden_size"}
    assert "(not skipped: output_layer.)" in str(raised.value)
    everything = ["embedding.", "decoder.", "output_layer."]
    resolved = resolve(_config(**wider, initial_ckpt_skip_keys_with_these_prefixes=everything), ckpt)
    assert resolved.config.hidden_size == 128
    assert [note.split(":")[0] for note in resolved.notes] == [
        "hidden_size",
        "kv_channels",
        "ffn_hidden_size",
    ]
    assert all(note.endswith("fine, every weight it shapes is skipped") for note in resolved.notes)


def test_per_layer_skips(tmp_path):
    ckpt = _checkpoint(tmp_path)
    wider_mlp = {**BASE, "ffn_hidden_size": 512}
    with pytest.raises(CheckpointMismatchError, match=r"not skipped: decoder\.layers\.1\.mlp\.\)"):
        resolve(
            _config(**wider_mlp, initial_ckpt_skip_keys_with_these_prefixes=["decoder.layers.0.mlp."]), ckpt
        )
    skips = ["decoder.layers.0.", "decoder.layers.1.mlp."]
    assert resolve(_config(**wider_mlp, initial_ckpt_skip_keys_with_these_prefixes=skips), ckpt)
    deeper = {**BASE, "num_layers": 3}
    with pytest.raises(CheckpointMismatchError, match=r"not skipped: decoder\.layers\.\)"):
        resolve(_config(**deeper), ckpt)
    assert resolve(_config(**deeper, initial_ckpt_skip_keys_with_these_prefixes=["decoder.layers."]), ckpt)


def test_weights_the_built_model_lacks_do_not_matter(tmp_path):
    learned = _checkpoint(tmp_path, "learned")
    rope = _config(**{**BASE, "seq_length": 64}, position_embedding_type="rope")
    resolved = resolve(rope, learned)  # no position embeddings to load; seq_length shapes nothing
    assert resolved.notes == [
        "position_embedding_type: 'rope' here (from this config) but 'learned_absolute' in the "
        "checkpoint: fine, the model built has none of the weights it shapes"
    ]
    # The other way round the model needs embedding.position_embeddings. that the checkpoint lacks.
    rope_ckpt = _checkpoint(tmp_path, "rope", **rope.explicit_fields())
    learned = {**BASE, "position_embedding_type": "learned_absolute"}
    with pytest.raises(CheckpointMismatchError) as raised:
        resolve(_config(**learned), rope_ckpt)
    assert _mismatched_fields(raised.value) == {"position_embedding_type", "seq_length"}
    skip = ["embedding.position_embeddings."]
    resolved = resolve(_config(**learned, initial_ckpt_skip_keys_with_these_prefixes=skip), rope_ckpt)
    assert len(resolved.notes) == 2


def test_ignore_weights_turns_mismatches_into_notes(tmp_path):
    finetune = _config(**{**BASE, "hidden_size": 128}, initial_ckpt_path_ignore_weights=True)
    resolved = resolve(finetune, _checkpoint(tmp_path))
    assert resolved.config.hidden_size == 128
    assert [note.split(":")[0] for note in resolved.notes] == [
        "hidden_size",
        "kv_channels",
        "ffn_hidden_size",
    ]
    assert all("initial_ckpt_path_ignore_weights loads no weights" in note for note in resolved.notes)


def test_model_families_and_user_classes(tmp_path):
    with pytest.raises(CheckpointMismatchError) as raised:
        resolve(_config(**BASE, model_cls="bert"), _checkpoint(tmp_path, "gpt"))
    assert _mismatched_fields(raised.value) == {"model_cls"}
    # A user model class: bioconf cannot tell which weights a field shapes, so skips do not excuse.
    user = {"model_cls": "my_pkg.models:Model"}
    ckpt = _checkpoint(tmp_path, "user", **user)
    finetune = _config(
        **{**BASE, "vocab_size": 256}, **user, initial_ckpt_skip_keys_with_these_prefixes=["embedding."]
    )
    with pytest.raises(CheckpointMismatchError, match=r"my_pkg\.models:Model is not gpt or bert"):
        resolve(finetune, ckpt)
    # ... and a different user class is fine: no weight shape follows from the class name.
    assert resolve(_config(**BASE, model_cls="my_pkg.models:FineTuneModel"), ckpt).notes == []


def test_foreign_checkpoint_class_is_noted_not_guessed(tmp_path):
    ckpt = _checkpoint(tmp_path, "foreign")
    _edit_checkpoint(ckpt, class_module="bionemo.esm2.model.model", add={"train_metric": None})
    # model_cls and ffn_hidden_size are left to the foreign class's own defaults: not checkable.
    resolved = resolve(_config(**BASE, ffn_hidden_size=1024, attention_dropout=0.0), ckpt)
    assert resolved.checkpoint.class_is_bioconf is False
    assert resolved.checkpoint.unknown_fields == {"train_metric": None}
    assert resolved.notes[0].startswith(
        "the checkpoint's config class bionemo.esm2.model.model:GPTModelConfig is not a bioconf class"
    )
    assert resolved.notes[1] == (
        "not checked against the checkpoint: model_cls, ffn_hidden_size (kept here; its class "
        "bionemo.esm2.model.model:GPTModelConfig leaves them to its own defaults)"
    )
    # vocab_size is one the checkpoint sets: checked.
    with pytest.raises(CheckpointMismatchError):
        resolve(_config(**{**BASE, "vocab_size": 33}), ckpt)


def test_invalid_merge_names_the_fields_and_their_sources(tmp_path):
    ckpt = _checkpoint(tmp_path)  # 4 attention heads
    finetune = _config(**{**BASE, "num_attention_heads": 8}, tensor_model_parallel_size=8)
    with pytest.raises(InvalidMergeError) as raised:
        resolve(finetune, ckpt, policy="seed")  # heads from the checkpoint, TP kept
    assert not isinstance(raised.value, CheckpointMismatchError)
    (issue,) = raised.value.issues
    assert issue.field == "num_attention_heads"
    assert "num_attention_heads=4 from the checkpoint" in issue.message
    assert "tensor_model_parallel_size=8 from this config" in issue.message
    assert issue.source == f"merged with {ckpt / 'context' / 'io.json'}"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UsageError) as raised:
        resolve(_config(**BASE))
    assert raised.value.issues[0].field == "initial_ckpt_path"
    with pytest.raises(CheckpointError, match="not a NeMo 2 checkpoint"):
        resolve(_config(**BASE, initial_ckpt_path=str(tmp_path / "nowhere")))


def test_to_dict(tmp_path):
    ckpt = _checkpoint(tmp_path)
    _edit_checkpoint(ckpt, add={"valid_metric": "accuracy"})
    architecture = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    resolved = resolve(_config(**architecture, hidden_dropout=0.2, params_dtype="bf16", bf16=True), ckpt)
    report = orjson.loads(orjson.dumps(resolved.to_dict()))
    assert report["checkpoint"] == {
        "directory": str(ckpt),
        "path": str(ckpt / "context" / "io.json"),
        "class": "bioconf.runtime.config:GPTModelConfig",
        "class_is_bioconf": True,
        "bionemo_family": None,
    }
    assert report["policy"] == "explicit" and report["keep"] == list(resolved.keep)
    assert report["fields"]["params_dtype"] == {"value": "bfloat16", "source": "user"}
    assert report["fields"]["ffn_hidden_size"] == {"value": 256, "source": "derived"}
    assert report["fields"]["vocab_size"] == {"value": 128, "source": "checkpoint"}
    assert "layernorm_epsilon" not in report["fields"]  # defaults are left out
    assert report["unknown_checkpoint_fields"] == {"valid_metric": "accuracy"}
    assert report["notes"] == []
    assert report["fingerprint"] == resolved.config.fingerprint()


# ---- the weight table against megatron-core's real keys ------------------------------------------------

# Each case: a base config and the fields changed from it. A shape field must change the shape or the
# existence of some weight, and only of weights under the prefixes the table gives it; any other
# field must change none.
GPT = {**BASE, "model_cls": "gpt"}
BERT = {**BASE, "model_cls": "bert", "num_tokentypes": 2}
MOE = {
    **GPT,
    "num_moe_experts": 2,
    "moe_ffn_hidden_size": 32,
    "moe_router_score_function": "sigmoid",
    "add_bias_linear": False,
}
CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (GPT, {"hidden_size": 128}),
    (GPT, {"num_layers": 3}),
    (GPT, {"ffn_hidden_size": 128}),
    ({**GPT, "kv_channels": 16}, {"num_attention_heads": 8}),  # else only the head layout changes
    (GPT, {"num_query_groups": 2}),
    (GPT, {"kv_channels": 32}),
    ({**GPT, "add_bias_linear": False}, {"add_qkv_bias": True}),
    (GPT, {"add_bias_linear": False}),
    (GPT, {"gated_linear_unit": True}),
    (GPT, {"normalization": "RMSNorm"}),
    (GPT, {"qk_layernorm": True}),
    (GPT, {"softmax_type": "learnable"}),
    (GPT, {"attention_output_gate": True}),
    (GPT, {"vocab_size": 256}),
    (GPT, {"seq_length": 64}),
    (GPT, {"position_embedding_type": "rope"}),
    (GPT, {"share_embeddings_and_output_weights": True}),
    (GPT, {"num_moe_experts": 2}),
    (MOE, {"moe_ffn_hidden_size": 48}),
    (MOE, {"moe_shared_expert_intermediate_size": 48}),
    ({**MOE, "moe_shared_expert_intermediate_size": 48}, {"moe_shared_expert_gate": True}),
    (MOE, {"moe_router_enable_expert_bias": True}),
    (MOE, {"moe_layer_freq": [1, 0]}),
    (BERT, {"hidden_size": 128}),
    (BERT, {"vocab_size": 256}),
    (BERT, {"num_tokentypes": 0}),
    (BERT, {"add_binary_head": False}),
    (BERT, {"share_embeddings_and_output_weights": True}),
    (BERT, {"normalization": "RMSNorm"}),
    # fields that shape nothing
    (GPT, {"hidden_dropout": 0.0, "attention_dropout": 0.0, "layernorm_epsilon": 1e-6}),
    (
        GPT,
        {
            "activation_func": "silu",
            "init_method_std": 0.01,
            "apply_residual_connection_post_layernorm": True,
        },
    ),
    ({**GPT, "position_embedding_type": "rope"}, {"rotary_percent": 0.5, "rotary_base": 500000}),
    ({**GPT, "position_embedding_type": "rope"}, {"seq_length": 64}),
    (MOE, {"moe_router_topk": 1, "moe_aux_loss_coeff": 0.01}),
    (BERT, {"hidden_dropout": 0.0, "rotary_base": 500}),
]

# Builds each config's model on CPU with megatron-core's local (not Transformer Engine) layer specs
# (GPT's per-layer block spec, which follows moe_layer_freq) and prints, per config,
# {key: shape} of model.sharded_state_dict() (the keys skip prefixes are matched against).
_BUILD = """
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.cuda.current_device = lambda: "cpu"  # softmax_type "learnable" allocates on the current device
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
from megatron.core import parallel_state
parallel_state.initialize_model_parallel()
from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from bioconf.schema.megatron_fields import MEGATRON_FIELD_NAMES

out = []
for fields in json.loads(sys.stdin.read()):
    megatron = {k: v for k, v in fields.items() if k in MEGATRON_FIELD_NAMES}
    config = TransformerConfig(**megatron, use_cpu_initialization=True, perform_initialization=False)
    common = dict(
        vocab_size=fields["vocab_size"],
        max_sequence_length=fields["seq_length"],
        position_embedding_type=fields.get("position_embedding_type", "learned_absolute"),
        rotary_percent=fields.get("rotary_percent", 1.0),
        share_embeddings_and_output_weights=fields.get("share_embeddings_and_output_weights", False),
    )
    if fields["model_cls"] == "gpt":
        spec = get_gpt_decoder_block_spec(config, False, normalization=config.normalization)
        model = GPTModel(config, spec, rotary_base=fields.get("rotary_base", 10000), **common)
    else:
        model = BertModel(
            config, fields.get("num_tokentypes", 0), bert_layer_local_spec,
            add_binary_head=fields.get("add_binary_head", True), **common,
        )
    out.append({
        key: list(getattr(value, "local_shape", ()))
        for key, value in model.sharded_state_dict().items() if "_extra_state" not in key
    })
print(json.dumps(out))
"""


def _differences(base: dict[str, list[int]], changed: dict[str, list[int]]) -> set[str]:
    return {key for key in base.keys() | changed.keys() if base.get(key) != changed.get(key)}


@pytest.mark.skipif(
    importlib.util.find_spec("megatron") is None, reason="needs megatron-core (bioconf[runtime])"
)
def test_weight_table_matches_megatron_keys():
    pairs = [(_config(**base), _config(**{**base, **change})) for base, change in CASES]
    configs = {c.to_json(): c for pair in pairs for c in pair}  # each distinct model built once
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    result = subprocess.run(
        [sys.executable, "-c", _BUILD, port],
        input=json.dumps([c.explicit_fields() for c in configs.values()]),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    keys = dict(zip(configs, json.loads(result.stdout.splitlines()[-1])))
    for config in configs.values():
        # "*": the model's top-level weights, each present, together covering every key
        modules, model_keys = shaped_weights(config, "hidden_size"), keys[config.to_json()]
        assert all(any(k.startswith(m) for m in modules) for k in model_keys), (config, modules)
        assert all(any(k.startswith(m) for k in model_keys) for m in modules), (config, modules)
    for (base, changed), (_, change) in zip(pairs, CASES):
        differences = _differences(keys[base.to_json()], keys[changed.to_json()])
        # the changed shape fields that shape a weight of either model
        shape_fields = [
            n
            for n in change
            if n in SHAPE_PREFIXES and (shaped_weights(base, n) or shaped_weights(changed, n))
        ]
        if not shape_fields:
            assert differences == set(), change
            continue
        assert differences, change
        prefixes = [p for name in shape_fields for c in (base, changed) for p in shaped_weights(c, name)]
        outside = {key for key in differences if not any(key.startswith(p) for p in prefixes)}
        assert outside == set(), (change, outside)


# ---- the CLI --------------------------------------------------------------------------------------------


def test_cli_text_and_json(tmp_path):
    ckpt = _checkpoint(tmp_path, hidden_dropout=0.1)
    config = tmp_path / "finetune.json"
    config.write_text(json.dumps({**BASE, "hidden_dropout": 0.2, "initial_ckpt_path": str(ckpt)}))

    text = run_cli("resolve", str(config), "--set", "attention_dropout=0.3")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.decode().splitlines()
    assert lines[0] == f"checkpoint: {ckpt} (bioconf.runtime.config:GPTModelConfig)"
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["field", "value", "source"]
    rows = {row.split()[0]: row.split()[1:] for row in table[1:]}
    assert rows["hidden_dropout"] == ["0.2", "user"]
    assert rows["attention_dropout"] == ["0.3", "user"]
    assert rows["ffn_hidden_size"] == ["256", "derived"]
    assert "layernorm_epsilon" not in rows
    aligned = {row.index(" user") for row in table[1:] if row.split()[0] in ("num_layers", "hidden_dropout")}
    assert len(aligned) == 1

    seed = run_cli("resolve", str(config), "--policy", "seed", "--checkpoint", str(ckpt), "--format", "json")
    assert seed.returncode == 0, seed.stderr
    report = orjson.loads(seed.stdout)
    assert report["policy"] == "seed"
    assert report["fields"]["hidden_dropout"] == {"value": 0.1, "source": "checkpoint"}
    assert report["notes"][0].startswith("hidden_dropout: this config sets 0.2")


def test_cli_exit_codes(tmp_path):
    ckpt = _checkpoint(tmp_path)
    config = tmp_path / "finetune.json"
    config.write_text(json.dumps({**BASE, "initial_ckpt_path": str(ckpt)}))

    mismatch = run_cli("resolve", str(config), "--set", "vocab_size=256")
    assert mismatch.returncode == 3
    assert "vocab_size: 256 here (from this config) but 128 in the checkpoint" in mismatch.stderr.decode()

    invalid = run_cli(
        "resolve", str(config), "--policy", "seed", "--set", "tensor_model_parallel_size=8",
        "--set", "num_attention_heads=8", "--format", "json",
    )  # fmt: skip
    assert invalid.returncode == 1
    report = orjson.loads(invalid.stdout)
    assert report["exit_code"] == 1 and report["errors"][0]["field"] == "num_attention_heads"

    assert run_cli("resolve", str(config), "--set", "hiden_size=3").returncode == 1
    assert run_cli("resolve", str(config), "--checkpoint", str(tmp_path / "none")).returncode == 2
    assert run_cli("resolve", str(tmp_path / "missing.json")).returncode == 2
    no_checkpoint = run_cli("resolve", str(config), "--set", "initial_ckpt_path=null")
    assert no_checkpoint.returncode == 2
    assert "no checkpoint to start from" in no_checkpoint.stderr.decode()
    assert run_cli("resolve", str(config), "--policy", "newest").returncode == 2


# ---- checkpoint data leniently, user input strictly ----------------------------------------------------


def test_a_checkpoints_own_lists_are_read_leniently(tmp_path):
    ckpt = _checkpoint(tmp_path)
    keep = ["model_cls", "return_only_hidden_states", "bionemo_future_field", "model_cls"]
    skips = ["head.", "no prefix!"]
    lists = {"override_parent_fields": keep, "initial_ckpt_skip_keys_with_these_prefixes": skips}
    _edit_checkpoint(ckpt, add=lists)
    checkpoint = read_checkpoint_config(ckpt)
    assert checkpoint.config.override_parent_fields == ["model_cls", "return_only_hidden_states"]
    assert checkpoint.config.initial_ckpt_skip_keys_with_these_prefixes == ["head."]
    assert checkpoint.dropped == {
        "override_parent_fields": ["bionemo_future_field", "model_cls"],
        "initial_ckpt_skip_keys_with_these_prefixes": ["no prefix!"],
    }
    resolved = resolve(_config(**BASE), ckpt)
    assert resolved.to_dict()["dropped_checkpoint_entries"] == checkpoint.dropped
    assert any("bionemo_future_field" in note for note in resolved.notes)
    with pytest.raises(ValidationError, match="bionemo_future_field"):  # the same from a user: an error
        _config(**BASE, override_parent_fields=["bionemo_future_field"])


def test_a_family_and_a_bert_checkpoint_share_their_weights(tmp_path):
    ckpt = _checkpoint(tmp_path, model_cls="bert", add_binary_head=False)
    unpadded = {**BASE, "model_cls": "biobert", "make_vocab_size_divisible_by": None}
    resolved = resolve(_config(**unpadded), ckpt)
    assert any("model_cls: 'biobert' here, 'bert'" in note for note in resolved.notes)
    with pytest.raises(CheckpointMismatchError) as raised:  # gpt and bert trees differ
        resolve(_config(**BASE), ckpt)
    assert "model_cls" in _mismatched_fields(raised.value)


def test_padded_vocabulary_is_compared_with_the_weights(tmp_path):
    ckpt = _checkpoint(tmp_path, model_cls="biobert", vocab_size=33)  # 128 rows
    resolve(_config(**{**BASE, "model_cls": "biobert", "vocab_size": 100}), ckpt)  # the same 128 rows
    with pytest.raises(CheckpointMismatchError):
        resolve(_config(**{**BASE, "model_cls": "biobert", "vocab_size": 129}), ckpt)  # 256 rows
