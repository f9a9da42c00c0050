"""The causal-LM loss without the full logits (train.loss_chunks): the decoder body runs to its last hidden states,
and the head and cross-entropy are taken only at the positions whose shifted label counts, a chunk of tokens at a
time. No chunk's logits are kept for backward:

- a frozen head (LoRA, QLoRA: the head and, tied, the embedding do not train): each chunk's forward also takes the
  gradient of every token's log-probability with respect to its hidden state, and keeps only that ([tokens, hidden],
  the size of the hidden states gathered); backward scales it by the upstream gradient (FrozenHeadLogps). The head
  runs twice per chunk (logits, then their gradient), as over the full logits, and backward needs no weight. The
  chunk's log-softmax, softmax and onehot - softmax are formed in one fp32 buffer (_log_softmax_in_place), autograd's
  values without its three fp32 tensors of the vocabulary;
- a head that trains (full fine-tuning, lm_head among the LoRA targets): each chunk under torch.utils.checkpoint, its
  logits recomputed in backward, where the head's weight gradient is formed from the per-token upstream gradient
  (DPO's differs per token, so no weight gradient can be formed in forward).

No (batch x tokens x vocab) tensor exists in forward or backward: at most one chunk's logits, their fp32
log-softmax and their gradient (under a frozen head one fp32 buffer for all three). The values are those of the model's own loss (the same head, the same fp32
log-softmax per token under the same autocast, the same autograd formulas), summed in another order.

Under tensor parallelism (shardformer's vocab-parallel head: each rank's head computes its slice of the vocabulary,
VocabSplit) each chunk stays split: the log-softmax over the whole vocabulary comes from the max and the sum of
exponentials all-reduced over the tensor-parallel group, the target's logit from the rank that owns it (as
ColossalAI's dist_cross_entropy takes it over the full split logits). The head's own backward (Linear1D_Col) sums
the hidden states' gradient over the group, and its padded vocabulary rows never reach the logits.

install() gives a causal LM a forward that does this whenever it is called with labels; the plugins' wrappers
(DDP, ZeRO, FSDP) and peft call that forward as they call any, so the training step, the evaluation and the
preference objective get it by asking the model for its loss (or, for pairs, its per-sequence log-probabilities).
Under hybrid_parallel shardformer replaces that forward with its own where its policy has one (a pipeline stage's,
which on the last stage applies the head and takes the loss; the vocab-parallel one under tensor parallelism; GPT-2's
own even on one rank): chunked_policy() wraps that one instead (stage_forward), so one mechanism serves tp, pp and
tp x pp, the head's vocabulary split wherever tensor parallelism splits it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import ModelOutput

from finetune.architectures import architecture
from finetune.core.loss_chunks import LOG_SOFTMAX_ROWS
from finetune.data import IGNORE_INDEX, NON_PAD_TOKENS, REFERENCE


@dataclass
class ChunkedLMOutput(ModelOutput):
    """A causal LM's output under the chunked loss: no logits; the loss as HF computes it (mean over label tokens),
    and each row's summed log-probability of its label tokens with their count (what preference objectives read)."""

    loss: torch.Tensor | None = None
    sequence_logps: torch.Tensor | None = None
    label_counts: torch.Tensor | None = None


@dataclass(frozen=True)
class VocabSplit:
    """A vocabulary-parallel head's share under tensor parallelism: its logits are those of token ids offset, offset + 1, ...
    (as many as it returns: shardformer's padded rows cut off), the rest on the other ranks of `group`."""

    group: dist.ProcessGroup
    offset: int


def vocab_split(head: nn.Module) -> VocabSplit | None:
    """How `head` splits the vocabulary: a shardformer column-parallel head (VocabParallelLMHead1D, Linear1D_Col) that keeps
    its output split (parallel_output) holds an equal share of the (padded) rows per rank; None: it returns every logit."""
    group = getattr(head, "process_group", None)
    if group is None or getattr(head, "gather_output", True) or dist.get_world_size(group) == 1:
        return None
    return VocabSplit(group, dist.get_rank(group) * head.weight.shape[0])


def split_log_softmax_at(logits: torch.Tensor, targets: torch.Tensor, split: VocabSplit) -> torch.Tensor:
    """log-softmax over the whole vocabulary at each target, from this rank's slice of the fp32 logits [tokens, share]:
    the max and the sum of exponentials all-reduced over the group, the target's logit from the rank owning it.
    Backward: the reductions pass their gradient through unchanged (every rank holds the same loss), so each rank's
    logits get their own share of softmax - onehot."""
    from colossalai.shardformer.layer._operation import reduce_forward

    peak = logits.detach().max(-1).values  # a shift only: the log-softmax does not depend on it
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=split.group)
    shifted = logits - peak[:, None]
    sum_exp = reduce_forward(shifted.exp().sum(-1), split.group)
    local = targets - split.offset
    owned = (local >= 0) & (local < logits.shape[-1])
    mine = shifted.gather(-1, local.clamp(0, logits.shape[-1] - 1)[:, None]).squeeze(-1)
    return reduce_forward(torch.where(owned, mine, 0.0), split.group) - sum_exp.log()


def _logits_logps(logits: torch.Tensor, targets: torch.Tensor, softcap: float, split: VocabSplit | None) -> torch.Tensor:
    """Log-probability of each target from the head's logits: capped as the model does, fp32 log-softmax (over the
    vocabulary split across the tensor-parallel ranks where the head splits it)."""
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if split is not None:
        return split_log_softmax_at(logits.float(), targets, split)
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def _target_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """Log-probability of each target under the head: logits in the compute dtype, then _logits_logps (without a soft-cap
    or a vocabulary split, and without a graph to record (eval, nothing trains): in one fp32 buffer, _log_softmax_in_place)."""
    split, logits = vocab_split(head), head(hidden)
    if softcap or split is not None or logits.requires_grad:
        return _logits_logps(logits, targets, softcap, split)
    logps, _ = _log_softmax_in_place(logits, targets)
    return logps


def _log_softmax_in_place(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 log-softmax at each target, softmax) of logits [tokens, vocabulary] in one fp32 tensor of the vocabulary:
    log_softmax's own kernel LOG_SOFTMAX_ROWS rows at a time, written back into that tensor, then its exponential in
    place (the softmax as log_softmax's backward forms it), so the values are autograd's over the full logits. The
    buffer is `logits` itself when they are fp32: they must not be needed after."""
    buffer = logits.float()
    for block in buffer.split(LOG_SOFTMAX_ROWS):
        block.copy_(torch.log_softmax(block, -1))
    return buffer.gather(-1, targets[:, None]).squeeze(-1), buffer.exp_()


def _frozen_head_gradient(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d log-probability / d hidden state, log-probability) of each target under a frozen head without a soft-cap or a
    vocabulary split: onehot - softmax formed in the log-softmax's buffer, in the logits' dtype as autograd hands it to
    the head's backward, which forms the hidden states' gradient (whatever the head module is: Linear, FSDP's, peft's).
    One fp32 tensor of the vocabulary per token, plus the half logits under bf16/fp16, instead of autograd's three."""
    leaf = hidden.detach().requires_grad_()
    logits = head(leaf)  # a head's backward reads its input and weight, not its output: the output's storage is reused
    out = logits.detach()
    logps, grad_logits = _log_softmax_in_place(out, targets)
    grad_logits.neg_().scatter_add_(-1, targets[:, None], torch.ones_like(grad_logits[:, :1]))
    if grad_logits.data_ptr() != out.data_ptr():  # half logits: their gradient in their own storage, as autograd casts it
        out.copy_(grad_logits)
        del grad_logits
    (grad,) = torch.autograd.grad(logits, leaf, out)
    return grad, logps


def _split_frozen_head_gradient(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float, split: VocabSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """(d log-probability / d hidden state, log-probability) of each target under a frozen vocab-parallel head: the logits'
    gradient times this rank's rows of the weight, summed over the group, as the head's backward (Linear1D_Col) forms and
    all-reduces it, without the weight gradient that backward always forms too (vocabulary / tp x hidden per chunk)."""
    with torch.no_grad():
        logits = head(hidden)
    leaf = logits.requires_grad_()
    logps = _logits_logps(leaf, targets, softcap, split)
    (grad_logits,) = torch.autograd.grad(logps, leaf, torch.ones_like(logps))
    grad = grad_logits.matmul(head.weight[: leaf.shape[-1]])  # the rows whose logits the head returns: padding cut off
    dist.all_reduce(grad, group=split.group)
    return grad, logps


class FrozenHeadLogps(torch.autograd.Function):
    """_target_logps of a chunk under a head none of whose tensors requires grad, its backward without a recompute: the
    forward takes d(log-probability of token t)/d(hidden state t) ((onehot - softmax) @ W, in the dtypes autograd uses
    over the full logits: in place, _frozen_head_gradient; through a soft-cap's tanh or a vocabulary split by autograd
    over the chunk) and keeps only that."""

    @staticmethod
    def forward(ctx, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:  # noqa: D102
        split = vocab_split(head)
        # Token t's log-probability depends on hidden state t alone: the gradient of their sum holds each one's, row by row.
        with torch.enable_grad():
            if split is not None:
                grad, logps = _split_frozen_head_gradient(head, hidden.detach(), targets, softcap, split)
            elif not softcap:
                grad, logps = _frozen_head_gradient(head, hidden, targets)
            else:
                leaf = hidden.detach().requires_grad_()
                logps = _target_logps(head, leaf, targets, softcap)
                (grad,) = torch.autograd.grad(logps, leaf, torch.ones_like(logps))
        ctx.save_for_backward(grad)
        return logps.detach()

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:  # noqa: D102
        (grad,) = ctx.saved_tensors
        return None, (grad_logps[:, None] * grad).to(grad.dtype), None, None


def head_trains(head: nn.Module) -> bool:
    """Whether any tensor the head computes with requires grad: its parameters and buffers, and the plain tensors FSDP
    puts in the parameters' place during forward (views of its flat parameter, which requires grad where any of it trains)."""
    plain = (v for m in head.modules() for v in vars(m).values() if isinstance(v, torch.Tensor))
    tensors = [*head.parameters(), *head.buffers(), *plain]
    return any(t.requires_grad for t in tensors)


def chunk_logps_function(head: nn.Module, hidden: torch.Tensor) -> Callable[..., torch.Tensor]:
    """How each chunk's log-probabilities are taken, called as f(head, hidden, targets, softcap): the one place that
    picks the path. Without a gradient to form (no_grad, eval, nothing upstream trains) plainly; under a frozen head
    with the hidden-state gradient formed in forward; under a head that trains checkpointed, recomputed in backward."""
    trains = head_trains(head)
    if not torch.is_grad_enabled() or not (trains or hidden.requires_grad):
        return _target_logps
    if trains:
        return functools.partial(checkpoint, _target_logps, use_reentrant=False)
    return FrozenHeadLogps.apply


def label_logps(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each counted label token, its row) for hidden states [batch, tokens, hidden] under `head`:
    position t predicts labels[t + 1], and only positions whose label is not -100 reach the vocabulary, in chunks."""
    targets = labels[:, 1:]
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    kept, wanted = hidden[rows, positions], targets[rows, positions]  # [counted tokens, hidden], [counted tokens]
    chunk_logps = chunk_logps_function(head, kept)
    pieces = []
    for start in range(0, len(wanted), chunk_tokens) or [0]:  # no counted token: one empty chunk, still a function of the model
        pieces.append(chunk_logps(head, kept[start : start + chunk_tokens], wanted[start : start + chunk_tokens], softcap))
    return torch.cat(pieces), rows


def chunked_output(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int, softcap: float = 0.0) -> ChunkedLMOutput:
    """The loss (mean over label tokens, NaN without any, as HF's) and per-row summed log-probabilities and counts."""
    logps, rows = label_logps(hidden, head, labels, chunk_tokens, softcap)
    batch = labels.shape[0]
    sums = torch.zeros(batch, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    counts = torch.bincount(rows, minlength=batch)
    return ChunkedLMOutput(loss=-logps.sum() / len(logps), sequence_logps=sums, label_counts=counts)


# Keyword arguments HF's causal-LM forwards take for the head or the loss, which the decoder body does not.
_HEAD_ONLY_KWARGS = ("return_dict", "logits_to_keep", "num_items_in_batch")


def _softcap(model: nn.Module) -> float:
    """The final logit soft-cap of `model`'s architecture (Gemma-2), 0.0 for none."""
    arch = architecture(model.config.model_type)
    return float(getattr(model.config, arch.logit_softcap, None) or 0.0) if arch.logit_softcap else 0.0


def install(model: nn.Module, chunk_tokens: int) -> None:
    """Give a Hugging Face causal LM (not wrapped) a forward that, called with labels, returns a ChunkedLMOutput
    computed in chunks of `chunk_tokens`; without labels (generation) it is the model's own forward."""
    arch = architecture(model.config.model_type)
    softcap = _softcap(model)
    own_forward = model.forward

    @functools.wraps(own_forward)  # generate() reads the signature (logits_to_keep)
    def forward(*args, labels: torch.Tensor | None = None, **kwargs):
        if labels is None:
            return own_forward(*args, **kwargs)
        for key in _HEAD_ONLY_KWARGS:
            kwargs.pop(key, None)
        hidden = getattr(model, arch.decoder_body)(*args, **kwargs)[0]
        # Looked up per call: peft may have wrapped the head (lora.target_modules with lm_head) after install.
        return chunked_output(hidden, model.get_output_embeddings(), labels, chunk_tokens, softcap)

    model.forward = forward
    model.loss_chunk_tokens = chunk_tokens


class _HeadReached(Exception):
    """Stops a stage forward at its head, carrying the hidden states it was about to project (stage_forward)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("the head was reached")
        self.hidden = hidden


def _stop_at_head(head: nn.Module, args: tuple) -> None:
    raise _HeadReached(args[0])


def stage_forward(pipeline_forward: Callable, chunk_tokens: int) -> Callable:
    """A causal LM's forward for shardformer to bind in place of `pipeline_forward` (its policy's: one pipeline stage, the
    head and the loss on the last): on the last stage, called with labels and chunk_tokens > 0, the stage runs up to its
    head, whose input (the last hidden states) goes through chunked_output instead, in chunks of `chunk_tokens`. The
    batch keys that are no model input (a pair batch's reference log-probabilities, which the schedule's micro-batches
    carry to the criterion) are dropped on every stage."""
    stage_manager = getattr(pipeline_forward, "keywords", {}).get("stage_manager")

    def forward(self: nn.Module, *args, labels: torch.Tensor | None = None, **kwargs):
        for key in (REFERENCE, NON_PAD_TOKENS):
            kwargs.pop(key, None)
        last_stage = stage_manager is None or stage_manager.is_last_stage()
        if not (chunk_tokens and labels is not None and last_stage):
            return pipeline_forward(self, *args, labels=labels, **kwargs)
        # Looked up per call, as in install(). The pipeline forwards (Llama's, GPT-2's) apply the head right after the
        # decoder body and build nothing after it that the loss needs: a pre-hook that raises ends the stage there.
        head = self.get_output_embeddings()
        hook = head.register_forward_pre_hook(_stop_at_head)
        try:
            pipeline_forward(self, *args, **kwargs)
        except _HeadReached as reached:
            hidden = reached.hidden
        else:
            raise RuntimeError(f"{type(self).__name__}'s pipeline forward never applied its head on the last stage")
        finally:
            hook.remove()
        return chunked_output(hidden, head, labels, chunk_tokens, _softcap(self))

    return forward


def chunked_policy(model: nn.Module, policy, chunk_tokens: int):
    """The shardformer policy for causal LM `model` (`policy`, or ColossalAI's own for it) with its forward replacement,
    if it has one (a pipeline stage's; under tensor parallelism the vocab-parallel one; GPT-2's even on one stage), wrapped
    by stage_forward: chunk_tokens > 0 takes the last stage's loss in chunks, over the vocabulary split across the
    tensor-parallel ranks where the head splits it (VocabSplit). Sequence parallelism splits the sequence, which the
    chunks do not (finetune.core.loss_chunks refuses it). Without a replacement the forward install() gave stays."""
    from colossalai.shardformer.policies.auto_policy import get_autopolicy

    policy = policy or get_autopolicy(model)
    module_policy = policy.module_policy

    def chunked_module_policy():
        descriptions = module_policy()
        description = descriptions.get(type(model))
        replacements = description.method_replacement if description is not None else None
        if replacements and "forward" in replacements:
            replacements["forward"] = stage_forward(replacements["forward"], chunk_tokens)
        return descriptions

    policy.module_policy = chunked_module_policy  # this instance only
    return policy


def chunk_tokens_of(model: nn.Module) -> int:
    """Tokens per chunk of the chunked loss installed in `model` or in the causal LM it wraps; 0: none installed."""
    return next((m.loss_chunk_tokens for m in model.modules() if getattr(m, "loss_chunk_tokens", 0)), 0)
