"""A bioconf-built model's forward pass on CPU, its full-vocabulary logits on every rank, and a
checksum of them, so a loaded model can be checked (the same logits under every parallel layout,
before and after a save).

megatron-core's local-spec (pure PyTorch) GPT and BERT models are built on CPU but cannot run
forward there: a few places reach for CUDA whatever the model's device. ``cpu_forward()`` patches
exactly those for its duration (megatron's files are not changed) and puts every attribute back on
exit, exception or not:

``megatron.core.utils.GlobalMemoryBuffer.get_tensor``
    The attention's score buffer (``DotProductAttention``: the ``baddbmm`` input) and the
    sequence-parallel all-gather buffers come from megatron's global memory buffer, which allocates
    on ``torch.cuda.current_device()``. Patched to return a fresh CPU tensor (the buffer only saves
    CUDA allocations; a fresh tensor also rules out two callers sharing one).
``megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding.get_emb``
    Moves ``inv_freq`` to ``torch.cuda.current_device()`` on its first call. Patched to compute the
    same frequencies where ``inv_freq`` is (``tests/test_forward.py`` checks the result equals
    megatron's own). ``RotaryEmbedding.forward`` is an ``lru_cache``: embeddings computed in the
    scope stay cached for that module, on CPU, which is where its model is.
``megatron.core.fusions.fused_softmax.get_default_causal_mask`` (and ``get_sliding_window_causal_mask``)
    The softmax's PyTorch path (the one CPU takes) builds the causal mask GPT attends with, when the
    caller passes none, with ``device="cuda"``; the sliding-window mask likewise. Patched where
    ``fused_softmax`` looks them up (it imported them by name) with the same masks on CPU.
``megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER`` (and ``..._INITIALIZED``)
    The attention dropout (and under sequence parallelism the embedding dropout) runs inside
    ``get_cuda_rng_tracker().fork()`` even in eval mode; megatron's tracker holds CUDA generator
    states, which a CPU-only process cannot make. Every ``get_cuda_rng_tracker`` (wherever it was
    imported) returns this global, so swapping it reaches every call site. The replacement,
    ``CpuRNGStatesTracker``, forks the CPU generator instead, seeded as megatron's
    ``model_parallel_cuda_manual_seed`` seeds its states (tensor-parallel ranks draw different
    attention dropout, as on GPUs), so training-mode dropout works too.

Each entry saves what it finds and restores it on exit, so scopes nest (an inner scope gets its own
RNG tracker, seeded by its own ``seed``); the patches are process-wide, so one thread at a time.

Pipeline stages pass activations with plain ``torch.distributed`` send/recv: megatron's schedules
(``get_forward_backward_func``) cannot run on CPU (their p2p buffers are allocated on
``torch.cuda.current_device()``, and they count tokens in a ``device="cuda"`` tensor).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.fusions import fused_softmax
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.models.common.embeddings import rotary_pos_embedding
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import random as tp_random
from megatron.core.utils import GlobalMemoryBuffer

from bioconf.errors import UsageError
from bioconf.runtime.parallel import model_chunks

# ---- the scope --------------------------------------------------------------------------------------


class CpuRNGStatesTracker(tp_random.CudaRNGStatesTracker):
    """megatron's RNG state tracker with CPU generator states: ``fork(name)`` runs its body on the
    CPU default generator set to ``name``'s state and puts the caller's state back after."""

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer_name, outer_state = self._current_state_name, torch.get_rng_state()
        if outer_name != "default-rng":  # a fork inside a fork: keep the outer state's progress
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            self._current_state_name = outer_name
            torch.set_rng_state(self.states_[outer_name] if outer_name != "default-rng" else outer_state)


def cpu_rng_tracker(seed: int) -> CpuRNGStatesTracker:
    """A CPU tracker with the three states megatron's ``model_parallel_cuda_manual_seed(seed)`` adds,
    each from the seed megatron gives this rank."""
    initialized = parallel_state.model_parallel_is_initialized()
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if initialized else 0
    ep_rank = parallel_state.get_expert_model_parallel_rank() if initialized else 0
    etp_rank = parallel_state.get_expert_tensor_parallel_rank() if initialized else 0
    tracker = CpuRNGStatesTracker()
    tracker.add(tp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(tp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    return tracker


def _cpu_buffer_tensor(
    self: GlobalMemoryBuffer,
    tensor_shape: Sequence[int],
    dtype: torch.dtype,
    name: str,
    mem_alloc_context=None,
) -> torch.Tensor:
    """``GlobalMemoryBuffer.get_tensor`` on CPU: a fresh (uninitialized) tensor of that shape."""
    return torch.empty(tuple(tensor_shape), dtype=dtype, requires_grad=False)


def _rotary_emb_in_place(self: Any, max_seq_len: int, offset: int = 0) -> torch.Tensor:
    """``RotaryEmbedding.get_emb`` without moving ``inv_freq`` to CUDA: [seq, 1, 1, dim]."""
    freqs = self.get_freqs_non_repeated(max_seq_len, offset)
    if self.rotary_interleaved:
        emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb[:, None, None, :]


def _causal_mask(sq: int) -> torch.Tensor:
    """``get_default_causal_mask`` on CPU: True above the diagonal (the future is masked)."""
    return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


def _sliding_window_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """``get_sliding_window_causal_mask`` on CPU: True outside the window."""
    allowed = torch.ones(sq, skv, dtype=torch.bool).triu(skv - sq - window_size[0])
    return ~allowed.tril(skv - sq + window_size[1])


def patched_attributes() -> list[tuple[Any, str]]:
    """(owner, attribute name) of everything ``cpu_forward`` replaces."""
    return [
        (GlobalMemoryBuffer, "get_tensor"),
        (rotary_pos_embedding.RotaryEmbedding, "get_emb"),
        (fused_softmax, "get_default_causal_mask"),
        (fused_softmax, "get_sliding_window_causal_mask"),
        (tp_random, "_CUDA_RNG_STATE_TRACKER"),
        (tp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED"),
    ]


_ABSENT = object()


@contextlib.contextmanager
def cpu_forward(seed: int | None = None) -> Iterator[CpuRNGStatesTracker]:
    """Run megatron-core GPT/BERT forward passes on CPU for the duration (see the module docstring
    for what is patched and why); yields the RNG tracker. ``seed`` seeds the tracker's states as
    megatron's ``model_parallel_cuda_manual_seed`` would (default: ``torch.initial_seed()``); it
    matters only for dropout in training mode. Enter it after megatron's parallel state is set up,
    so each tensor-parallel rank gets its own attention-dropout seed. Dropout outside the tracker
    (hidden dropout) draws from the CPU default generator, which megatron expects to be the same on
    every tensor-parallel rank: seed torch alike on every rank for training mode at TP > 1."""
    tracker = cpu_rng_tracker(torch.initial_seed() if seed is None else seed)
    replacements = {
        (GlobalMemoryBuffer, "get_tensor"): _cpu_buffer_tensor,
        (rotary_pos_embedding.RotaryEmbedding, "get_emb"): _rotary_emb_in_place,
        (fused_softmax, "get_default_causal_mask"): _causal_mask,
        (fused_softmax, "get_sliding_window_causal_mask"): _sliding_window_mask,
        (tp_random, "_CUDA_RNG_STATE_TRACKER"): tracker,
        (tp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED"): True,
    }
    # vars(), not getattr: a class attribute is saved as stored (the function, not a bound method)
    saved = [(owner, name, vars(owner).get(name, _ABSENT)) for owner, name in patched_attributes()]
    try:
        for (owner, name), value in replacements.items():
            setattr(owner, name, value)
        yield tracker
    finally:
        for owner, name, value in reversed(saved):
            if value is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


# ---- the whole model's logits -----------------------------------------------------------------------


def synthetic_batch(
    vocab_size: int, batch_size: int = 2, seq_length: int = 16, seed: int = 0
) -> dict[str, Any]:
    """A fixed batch (the same on every rank and machine for the same arguments): token ids from
    ``seed``, and an attention mask of ones whose last sequence has its final quarter padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_length), generator=generator)
    attention_mask = torch.ones(batch_size, seq_length, dtype=torch.long)
    attention_mask[-1, seq_length - seq_length // 4 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _send(tensor: torch.Tensor, dst: int) -> None:
    """``tensor`` to global rank ``dst``: its header (dtype, rank, shape), then its values."""
    header = [_DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
    dist.send(torch.tensor([len(header)], dtype=torch.int64, device=tensor.device), dst)
    dist.send(torch.tensor(header, dtype=torch.int64, device=tensor.device), dst)
    dist.send(tensor.contiguous(), dst)


def _recv(src: int, device: torch.device) -> torch.Tensor:
    size = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(size, src)
    header = torch.empty(int(size.item()), dtype=torch.int64, device=device)
    dist.recv(header, src)
    tensor = torch.empty(tuple(header[2:].tolist()), dtype=_DTYPES[int(header[0])], device=device)
    dist.recv(tensor, src)
    return tensor


def _run_chunk(
    chunk: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: Any
) -> Any:
    if isinstance(chunk, GPTModel):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = gpt_attention_mask(attention_mask)
        return chunk(input_ids, position_ids, attention_mask)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    output = chunk(input_ids, attention_mask)  # BertModel
    return output[0] if isinstance(output, tuple) else output  # (lm logits, binary logits)


def gpt_attention_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """A [b, s] padding mask (1: token, 0: padding) as the mask megatron's GPT attention takes:
    [b, 1, s, s] boolean, True where a query may not look (a later position, or padding)."""
    seq = padding_mask.shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=padding_mask.device).triu(diagonal=1)
    padded = (padding_mask < 0.5)[:, None, None, :]
    return future[None, None] | padded


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Tensor-parallel vocabulary shards (the last dimension) concatenated in rank order."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return logits
    shards = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)


@torch.no_grad()
def forward_logits(
    model: Any,
    input_ids: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    eval_mode: bool = True,
) -> torch.Tensor:
    """The whole model's full-vocabulary logits [batch, seq, vocab] for ``input_ids`` [batch, seq],
    on every rank; every rank of the process group calls it with the same inputs.

    ``model`` is this rank's model or its list of virtual pipeline chunks. Pipeline stages run in
    order, each passing its activations to the next with send/recv; the last stage's
    tensor-parallel vocabulary shards are gathered and broadcast to the other stages.
    ``attention_mask``: [b, s] with 1 for tokens and 0 for padding, None for no padding (GPT adds
    the causal mask; it also takes megatron's own [b, 1, s, s] boolean mask, True: masked).
    ``position_ids`` (GPT): None for 0..s-1. ``eval_mode``: run in eval mode (no dropout: the same
    logits every call), each module's mode restored after; False runs in the mode the model is in.
    On CPU call it inside ``cpu_forward()``.
    """
    chunks = model_chunks(model)
    for chunk in chunks:
        if not isinstance(chunk, (GPTModel, BertModel)):
            raise UsageError.one(
                f"a forward pass runs megatron's GPTModel and BertModel, not {type(chunk).__name__}",
                "unsupported_model",
            )
    modes = [(module, module.training) for chunk in chunks for module in chunk.modules()]
    try:
        if eval_mode:
            for chunk in chunks:
                chunk.eval()
        return _pipeline_logits(chunks, input_ids, position_ids, attention_mask)
    finally:
        for module, training in modes:
            module.training = training
        for chunk in chunks:
            chunk.set_input_tensor(None)  # drop the received activations


def _pipeline_logits(
    chunks: list[Any], input_ids: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: Any
) -> torch.Tensor:
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    device = input_ids.device
    output = None
    for vp, chunk in enumerate(chunks):
        first = vp == 0 and pp_rank == 0
        if not first:  # the previous stage: the rank before, or the last rank's previous chunk
            chunk.set_input_tensor(_recv(parallel_state.get_pipeline_model_parallel_prev_rank(), device))
        output = _run_chunk(chunk, input_ids, position_ids, attention_mask)
        last = vp == len(chunks) - 1 and pp_rank == pp_size - 1
        if not last:
            _send(output, parallel_state.get_pipeline_model_parallel_next_rank())
    if pp_size == 1:
        return _gather_vocab(output)
    # The last stage's logits to every stage: a header (dtype, shape), then the tensor.
    is_last = pp_rank == pp_size - 1
    if is_last:
        logits = _gather_vocab(output)
        header = torch.tensor([_DTYPES.index(logits.dtype), *logits.shape], dtype=torch.int64, device=device)
    else:
        header = torch.empty(4, dtype=torch.int64, device=device)
    group = parallel_state.get_pipeline_model_parallel_group()
    last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(header, last_rank, group=group)
    if not is_last:
        logits = torch.empty(tuple(header[1:].tolist()), dtype=_DTYPES[int(header[0])], device=device)
    dist.broadcast(logits, last_rank, group=group)
    return logits


# ---- a checksum to print ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitsChecksum:
    """Cheap fingerprints of a logits tensor. ``total`` and ``sum_of_squares`` (float64 sums) move
    smoothly with the values: compare them with a tolerance across layouts. ``sha256`` hashes the
    values rounded to ``decimals`` places: equal for bit-identical logits (the same layout, build and
    machine), but any difference, however small, may move a value across a rounding boundary and
    change it; it does not prove two layouts agree."""

    shape: tuple[int, ...]
    total: float
    sum_of_squares: float
    sha256: str
    decimals: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "sum": self.total,
            "sum_of_squares": self.sum_of_squares,
            "sha256": self.sha256,
            "decimals": self.decimals,
        }

    def __str__(self) -> str:
        shape = "x".join(map(str, self.shape))
        return f"{shape} sum={self.total:.6g} sumsq={self.sum_of_squares:.6g} sha256:{self.sha256[:16]}"


def logits_checksum(logits: torch.Tensor, decimals: int = 4) -> LogitsChecksum:
    """The ``LogitsChecksum`` of ``logits`` (any dtype; computed in float64 on CPU)."""
    values = logits.detach().to("cpu", torch.float64)
    rounded = torch.round(values * 10**decimals).to(torch.int64).contiguous()
    payload = repr(tuple(values.shape)).encode() + rounded.numpy().astype("<i8").tobytes()
    digest = hashlib.sha256(payload).hexdigest()
    return LogitsChecksum(
        tuple(values.shape), float(values.sum()), float((values * values).sum()), digest, decimals
    )


def forward_checksum(
    model: Any, *, batch_size: int = 2, seq_length: int = 16, seed: int = 0
) -> LogitsChecksum:
    """One small synthetic batch (``synthetic_batch``, vocabulary and length from the model's config)
    through the whole model in eval mode, and the checksum of its logits; every rank calls it and gets
    the same. On CPU it runs inside ``cpu_forward()``; elsewhere on the model's device as it is."""
    chunks = model_chunks(model)
    config = chunks[0].config
    device = next(chunks[0].parameters()).device
    seq_length = min(seq_length, config.seq_length or seq_length)
    batch = synthetic_batch(config.vocab_size, batch_size, seq_length, seed)
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    with cpu_forward() if device.type == "cpu" else contextlib.nullcontext():
        logits = forward_logits(chunks, batch["input_ids"], attention_mask=batch["attention_mask"])
    return logits_checksum(logits)
