"""Loading checkpoint weights: in place, checked before anything is touched, reported, every layout.

Everything runs on CPU against the real megatron-core and torch.distributed (gloo); the layout tests
run two processes under torchrun (tests/dist_scripts/layouts.py).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT
from dist_scripts.layouts import build, gathered, same
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from bioconf.checkpoint.shapes import shaped_by
from bioconf.errors import CheckpointError, CheckpointNotFoundError, WeightsError
from bioconf.runtime import OVERRIDE_BIONEMO_CONFIG_DEFAULTS, GPTModelConfig, materialize
from bioconf.runtime.initialize import init_checkpoint
from bioconf.runtime.parallel import ensure_parallel_state
from bioconf.runtime.weights import LoadReport, direct, load_weights_sharded_inplace_nemo2_to_mcore
from bioconf.runtime.weights import load as load_module
from bioconf.runtime.weights.direct import _fast_layout
from bioconf.runtime.weights.reader import _DirectReader, _item_layout, _ItemFile, _read_direct, progress_bar
from bioconf.schema import ModelConfig

GPT = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return init_checkpoint(GPT, tmp_path_factory.mktemp("ckpt") / "gpt", seed=7)


def stored(ckpt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by checkpoint key without ``module.``, read by megatron's stock loader."""
    plain = dist_checkpointing.load_plain_tensors(str(ckpt / "weights"))
    return {key.removeprefix("module."): value for key, value in plain.items() if torch.is_tensor(value)}


def tensors(model) -> dict[str, torch.Tensor]:
    return {key.removeprefix("module."): value for key, value in gathered(model).items()}


# ---- loading and the report ---------------------------------------------------------------------


def test_load_is_in_place_and_bit_exact(parallel, ckpt):
    model = build(GPT, seed=1)
    parameters = {name: p.data_ptr() for name, p in model.named_parameters()}
    start = time.perf_counter()
    report = load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, [])
    elapsed = time.perf_counter() - start
    assert same(tensors(model), stored(ckpt))
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == parameters
    assert isinstance(report, LoadReport)
    assert report.checkpoint == str(ckpt / "weights")
    assert len(report.loaded) == sum(1 for key in model.state_dict() if "_extra_state" not in key)
    assert (report.skipped, report.missing, report.cast, report.stock_reads) == ({}, [], {}, 0)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights <= report.bytes_read < 1.2 * weights
    assert 0 < report.seconds <= elapsed  # the load's own clock, within the caller's
    data = json.loads(json.dumps(report.to_dict()))  # plain data
    assert data["bytes_read"] == report.bytes_read and data["throughput"] >= weights / elapsed
    assert f"loaded {len(report.loaded)} tensors" in str(report)


@pytest.mark.parametrize("threads", [1, 3])
def test_several_streams_load_exactly(parallel, ckpt, monkeypatch, threads):
    """The regions cut into one stream per reader thread (the loading thread reads the first, the
    pool the others): bit-exact, each stored byte read once."""
    monkeypatch.setattr(load_module, "_reader_threads", lambda: threads)
    model = build(GPT, seed=1)
    report = load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, [])
    assert same(tensors(model), stored(ckpt))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.bytes_kept == weights and weights <= report.bytes_read < 1.2 * weights


def test_streams_are_contiguous_in_file_order_and_balanced():
    """Regions sorted by file and offset, cut into at most one stream per thread, each a contiguous
    run of about equal stored bytes."""
    regions = [
        SimpleNamespace(where=f"shard{i // 5}", item=SimpleNamespace(offset=(i % 5) * 100, length=100))
        for i in range(10)
    ]
    streams = direct._streams(list(reversed(regions)), 3)
    assert [region for stream in streams for region in stream] == regions
    assert [len(stream) for stream in streams] == [4, 3, 3]
    assert direct._streams(regions[:2], 8) == [[regions[0]], [regions[1]]]
    assert direct._streams([], 2) == []


def test_a_weights_folder_is_accepted_too(parallel, ckpt):
    model = build(GPT, seed=1)
    load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt / "weights", set())
    assert same(tensors(model), stored(ckpt))


def test_skipped_keys_keep_their_values_and_are_reported(parallel, ckpt):
    model = build(GPT, seed=1)
    before = tensors(model)
    report = load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, {"output_layer.", "decoder.final_"})
    after, source = tensors(model), stored(ckpt)
    assert report.skipped == {
        "output_layer.weight": "output_layer.",
        "decoder.final_layernorm.weight": "decoder.final_",
        "decoder.final_layernorm.bias": "decoder.final_",
    }
    for key in after:
        expected = before if key.startswith(("output_layer.", "decoder.final_")) else source
        assert torch.equal(after[key], expected[key]), key
    assert "skipped 1 tensors by prefix 'output_layer.'" in str(report)


def test_missing_keys_are_an_error_before_anything_changes(parallel, tmp_path):
    no_bias = init_checkpoint(GPT.with_overrides({"add_bias_linear": False}), tmp_path / "nobias")
    model = build(GPT, seed=1)
    before = tensors(model)
    with pytest.raises(WeightsError) as caught:
        load_weights_sharded_inplace_nemo2_to_mcore(model, no_bias, [])
    assert same(tensors(model), before)
    missing = {issue.field for issue in caught.value.issues}
    assert "decoder.layers.0.self_attention.linear_proj.bias" in missing
    assert all(issue.type == "missing_in_checkpoint" for issue in caught.value.issues)
    assert all(issue.source == str(no_bias / "weights") for issue in caught.value.issues)

    report = load_weights_sharded_inplace_nemo2_to_mcore(model, no_bias, [], strict=False)
    assert set(report.missing) == missing
    after, source = tensors(model), stored(no_bias)
    assert all(torch.equal(after[key], source[key]) for key in source)


def test_an_unused_skip_prefix_names_the_nearest_keys(parallel, ckpt):
    model = build(GPT, seed=1)
    with pytest.raises(WeightsError) as caught:
        load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, ["outputlayer.", "embedding."])
    (issue,) = caught.value.issues
    assert (issue.type, issue.field, issue.input) == (
        "unused_skip_prefix",
        "initial_ckpt_skip_keys_with_these_prefixes",
        "outputlayer.",
    )
    assert "nearest keys: output_layer." in issue.message


def test_a_shape_mismatch_names_key_shapes_and_fields(parallel, ckpt):
    bigger_vocab = GPT.with_overrides({"vocab_size": 256})
    model = build(bigger_vocab, seed=1)
    before = tensors(model)
    with pytest.raises(WeightsError) as caught:
        load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, [])
    assert same(tensors(model), before)
    by_key = {issue.field: issue for issue in caught.value.issues}
    assert set(by_key) == {"embedding.word_embeddings.weight", "output_layer.weight"}
    issue = by_key["embedding.word_embeddings.weight"]
    assert issue.input == {"checkpoint": [128, 64], "model": [256, 64]}
    assert "'module.embedding.word_embeddings.weight'" in issue.message
    assert "hidden_size=64, vocab_size=256" in issue.message

    load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, ["embedding.word_embeddings.", "output_layer."])


@pytest.mark.parametrize(
    ("key", "fields"),
    [
        ("module.embedding.word_embeddings.weight", ("hidden_size", "vocab_size")),
        (
            "module.decoder.layers.self_attention.linear_qkv.weight",  # stacked layers: a layer axis
            (
                "hidden_size",
                "num_layers",
                "num_attention_heads",
                "num_query_groups",
                "kv_channels",
                "attention_output_gate",
            ),
        ),
        (
            "module.decoder.layers.3.mlp.linear_fc1.weight",
            ("hidden_size", "ffn_hidden_size", "gated_linear_unit"),
        ),
        ("module.decoder.final_layernorm.weight", ("hidden_size",)),
    ],
)
def test_shaped_by_reads_the_shape_table(key, fields):
    assert shaped_by(key, GPT) == fields
    moe = GPT.with_overrides({"num_moe_experts": 4})
    assert "num_moe_experts" in shaped_by("decoder.layers.mlp.experts.linear_fc1.weight", moe)
    assert "num_moe_experts" not in shaped_by("decoder.layers.mlp.linear_fc1.weight", GPT)  # None: no experts


def test_a_fp32_checkpoint_is_cast_into_a_bf16_model(parallel, ckpt):
    model = build(GPT.with_overrides({"params_dtype": "bf16", "bf16": True}), seed=1)
    report = load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, [])
    assert set(report.cast.values()) == {("torch.float32", "torch.bfloat16")}
    loaded = tensors(model)  # megatron keeps norms and position embeddings in fp32
    assert loaded["decoder.layers.self_attention.linear_qkv.weight"].dtype == torch.bfloat16
    assert same(loaded, {key: value.to(loaded[key].dtype) for key, value in stored(ckpt).items()})


def test_a_folder_that_is_not_a_checkpoint(parallel, tmp_path):
    model = build(GPT, seed=1)
    with pytest.raises(CheckpointNotFoundError, match="no such folder"):
        load_weights_sharded_inplace_nemo2_to_mcore(model, tmp_path / "nothing", [])
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no metadata\.json"):
        load_weights_sharded_inplace_nemo2_to_mcore(model, tmp_path, [])


class _RunsACommand:
    """A pickle that calls os.system when loaded with a plain unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_weight_index_is_refused_and_nothing_runs(parallel, ckpt, tmp_path):
    """torch's FileSystemReader.read_metadata is a plain pickle.load: the loader never calls it."""
    hostile = tmp_path / "hostile"
    shutil.copytree(ckpt, hostile)
    marker = tmp_path / "ran"
    (hostile / "weights" / ".metadata").write_bytes(pickle.dumps(_RunsACommand(marker)))
    with pytest.raises(CheckpointError, match=r"refused to load global 'posix\.system'"):
        load_weights_sharded_inplace_nemo2_to_mcore(build(GPT, seed=1), hostile, [])
    assert not marker.exists()


# ---- the direct reader --------------------------------------------------------------------------


def test_direct_reader_matches_the_stock_reader(parallel, tmp_path):
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    saved = {
        "contiguous": base.clone(),
        "transposed": base.t(),  # torch.save keeps the view: strides (1, 8)
        "view": base[2:5, 1:7],  # DCP stores a copy of a view into a larger storage
        "bf16": base.to(torch.bfloat16),
        "int64": torch.arange(5),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "complex": torch.ones(3, dtype=torch.complex64),  # not parsed: the stock path reads it
    }
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(tmp_path))
    reader = dcp.FileSystemReader(tmp_path)
    metadata = reader.read_metadata()
    layouts = {}
    for index, info in metadata.storage_data.items():
        if index.fqn != "complex":
            with open(tmp_path / info.relative_path, "rb") as handle:
                layouts[index.fqn] = _item_layout(_ItemFile(handle.fileno(), info.offset, info.length))
    assert layouts["transposed"].stride == (1, 8)

    targets = {key: torch.full_like(value, 7) for key, value in saved.items()}
    targets["bf16"] = torch.zeros(6, 8, dtype=torch.float32)  # cast on the way in
    direct = _DirectReader(tmp_path, metadata, progress_bar(False, ""), threads=2)
    dcp.load(targets, storage_reader=direct)
    for key, value in saved.items():
        assert torch.equal(targets[key], value.to(targets[key].dtype)), key
    assert direct.stock_reads == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("offsets", "lengths"),
    [((0, 0), (3, 6)), ((1, 0), (2, 6)), ((0, 2), (3, 3)), ((2, 5), (1, 1))],  # whole, rows, columns, one
)
def test_direct_read_of_a_region_of_a_strided_view(tmp_path, dtype, offsets, lengths):
    """What resharding asks of a stored item: a region of it, from a tensor torch.save kept as a view
    at an offset into a larger storage; into a target of the same or another dtype."""
    view = torch.arange(48, dtype=torch.float32).reshape(6, 8)[2:5, 1:7]
    archive = io.BytesIO()
    torch.save(view, archive)
    padding = b"x" * 100
    (tmp_path / "item").write_bytes(padding + archive.getvalue())
    req = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex("x"),
        dest_offsets=torch.Size([0, 0]),
        storage_index=MetadataIndex("x"),
        storage_offsets=torch.Size(offsets),
        lengths=torch.Size(lengths),
    )
    target = torch.zeros(lengths, dtype=dtype)
    with open(tmp_path / "item", "rb") as handle:
        item = _ItemFile(handle.fileno(), len(padding), len(archive.getvalue()))
        layout = _item_layout(item)
        assert layout.storage_offset == 17 and layout.stride == (8, 1)
        read = _read_direct(handle.fileno(), layout, req, target)
    expected = view[offsets[0] : offsets[0] + lengths[0], offsets[1] : offsets[1] + lengths[1]]
    assert torch.equal(target, expected.to(dtype))
    assert read < 48 * 4  # only the span the region covers


def test_progress_bar_only_on_a_terminal_and_only_when_enabled(monkeypatch):
    assert progress_bar(True, "loading x").disable  # stderr is not a terminal under pytest
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert not progress_bar(True, "loading x").disable
    assert progress_bar(False, "loading x").disable  # quiet, or a rank other than 0


# ---- the config's entry points ------------------------------------------------------------------


def test_configure_model_loads_settings_then_weights(parallel, tmp_path):
    source = GPT.with_overrides({"hidden_dropout": 0.25})
    ckpt = init_checkpoint(source, tmp_path / "src", seed=3)
    config = GPTModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        initial_ckpt_path=str(ckpt),
        initial_ckpt_skip_keys_with_these_prefixes=["output_layer."],
        use_cpu_initialization=True,  # kept: the checkpoint's settings would turn it off
        override_parent_fields=[*OVERRIDE_BIONEMO_CONFIG_DEFAULTS, "use_cpu_initialization"],
    )
    model = config.configure_model()
    assert (config.hidden_dropout, config.vocab_size) == (0.25, 128)  # from the checkpoint
    loaded, expected = tensors(model), stored(ckpt)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected if not k.startswith("output_layer."))
    assert not torch.equal(loaded["output_layer.weight"], expected["output_layer.weight"])

    config.initial_ckpt_path_ignore_weights = True
    fresh = config.configure_model()
    assert not torch.equal(
        tensors(fresh)["embedding.word_embeddings.weight"], expected["embedding.word_embeddings.weight"]
    )

    report = config.update_model_from_checkpoint(fresh, str(ckpt))
    assert report.skipped == {"output_layer.weight": "output_layer."}
    assert torch.equal(
        tensors(fresh)["embedding.word_embeddings.weight"], expected["embedding.word_embeddings.weight"]
    )


def test_the_seed_loader_and_bioconf_agree(parallel, ckpt):
    """The seed's path: megatron's stock load with ``module.`` added to every key."""
    seed_model, model = build(GPT, seed=1), build(GPT, seed=2)
    sharded = {}
    for key, value in seed_model.sharded_state_dict().items():
        if "_extra_state" not in key:
            if isinstance(value, ShardedTensor):
                value.key = f"module.{value.key}"
            sharded[f"module.{key}"] = value
    dist_checkpointing.load(sharded, str(ckpt / "weights"))
    load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, [])
    assert same(tensors(seed_model), tensors(model))


# ---- layouts: several processes -----------------------------------------------------------------


def test_every_layout_loads_every_other_bit_exactly(tmp_path):
    """TP=1 -> TP=2, PP=2, PP=2 with virtual pipeline; TP=2 -> TP=1, PP=2; MoE EP=1 -> EP=2 and
    EP=2 -> TP=2/ETP=1; skip prefixes across pipeline stages. Context parallelism needs Transformer
    Engine's attention, so it cannot be built on CPU."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port per run
            "--nproc_per_node=2",
            str(ROOT / "tests" / "dist_scripts" / "layouts.py"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.split() == [
        word
        for case in (
            "tp1->tp2",
            "tp1->pp2",
            "tp1->pp2vpp2",
            "pp2-skip-prefixes",
            "tp2->tp1",
            "tp2->pp2",
            "moe-ep1->ep2",
            "moe-ep2->tp2etp1",
        )
        for word in ("ok", case)
    ]


DIRECT_TP2 = r"""
import sys, warnings
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import torch, torch.distributed as dist
from megatron.core import parallel_state
from layouts import build, gathered, layout, save_source, same
from bioconf.runtime.weights import direct, load_weights_sharded_inplace_nemo2_to_mcore
from bioconf.schema import ModelConfig

warnings.filterwarnings("ignore")
dist.init_process_group("gloo")
parallel_state.initialize_model_parallel()
# hidden 256: a row-parallel weight's rows are 1 KiB, a rank keeps 512 B of each
GPT = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, vocab_size=128, seq_length=32,
                  pipeline_dtype="float32")
root = Path(sys.argv[1])
CASES = (
    ("tp1->tp2", {}, {"tensor": 2}, 0),
    ("tp1->tp2-coalesced", {}, {"tensor": 2}, None),
    ("tp2->tp1", {"tensor": 2}, {}, 0),
)
for case, source, target, gap in CASES:
    ckpt, reference = save_source(case.split("->")[0] + "-" + case, root, GPT, seed=1, **source)
    model = build(layout(GPT, **target), seed=99)
    if gap is not None:  # every row of a row-parallel part read on its own, no gap read
        direct.ROW_READS_FROM_GAP = gap
    report = load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, [], quiet=True)
    direct.ROW_READS_FROM_GAP = 64 << 10
    assert same(gathered(model), reference), case
    kept = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.bytes_kept == kept and report.stock_reads == 0, (case, report)
    if dist.get_rank() == 0:
        print(case, report.bytes_read, report.bytes_kept, len(report.loaded), flush=True)
dist.destroy_process_group()
"""


def test_at_tp2_each_rank_reads_only_what_it_keeps(tmp_path):
    """TP=1 -> TP=2 through the direct path (no factories: no gated linear unit): each rank reads
    the bytes it keeps plus the zip records of the items it touches (2 KiB each at most), not a
    row-parallel weight's whole stored span, when told to read row by row; by default (small gaps),
    at most the span. Bit-exact."""
    script = tmp_path / "direct_tp2.py"
    script.write_text(DIRECT_TP2)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
            *(str(script), str(tmp_path), str(ROOT / "tests" / "dist_scripts")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = {line.split()[0]: [int(n) for n in line.split()[1:]] for line in result.stdout.splitlines()}
    assert rows.keys() == {"tp1->tp2", "tp1->tp2-coalesced", "tp2->tp1"}, result.stdout
    for case in ("tp1->tp2", "tp2->tp1"):  # two items per tensor at TP2->TP1
        read, kept, tensors = rows[case]
        assert kept <= read <= kept + 2048 * tensors * 2, (case, read, kept)  # the records of each item
    # by default the 512 B gaps between a row-parallel weight's row spans are read too, and no more
    exact, kept, tensors = rows["tp1->tp2"]
    full = sum(path.stat().st_size for path in (tmp_path / "tp1-tp1->tp2" / "weights").glob("*.distcp"))
    assert exact < rows["tp1->tp2-coalesced"][0] < full


def test_the_fast_zip_parse_agrees_with_zipfile(tmp_path):
    """The direct path's parse of an item's first and last KiB gives _item_layout's answer for what
    torch.save writes, and declines (None: zipfile decides) a damaged record or pickle."""
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    saved = {
        "contiguous": base.clone(),
        "transposed": base.t(),
        "view": base[2:5, 1:7],
        "bf16": base.bfloat16(),
    }
    saved |= {"int64": torch.arange(5), "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4)}
    dcp.save(saved, storage_writer=dcp.FileSystemWriter(tmp_path))
    metadata = dcp.FileSystemReader(tmp_path).read_metadata()
    for index, info in metadata.storage_data.items():
        raw = (tmp_path / info.relative_path).read_bytes()
        head, tail = raw[info.offset : info.offset + 1024], raw[: info.offset + info.length][-1024:]
        head, tail = head[: info.length], tail[-info.length :]
        with open(tmp_path / info.relative_path, "rb") as handle:
            expected = _item_layout(_ItemFile(handle.fileno(), info.offset, info.length))
        assert _fast_layout(head, tail, info.offset, info.length) == expected, index.fqn
        damaged = bytearray(head)
        damaged[100] ^= 0xFF  # inside the pickle: its CRC no longer matches
        assert _fast_layout(bytes(damaged), tail, info.offset, info.length) is None, index.fqn


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weights_go_straight_to_the_gpu(ckpt):
    with ensure_parallel_state():
        runtime = materialize(GPT)
        from bioconf.runtime.build import build_model

        model = build_model(runtime)
        assert next(model.parameters()).is_cuda
        load_weights_sharded_inplace_nemo2_to_mcore(model, ckpt, [])
        loaded = {key: value.cpu() for key, value in tensors(model).items()}
        assert same(loaded, stored(ckpt))
