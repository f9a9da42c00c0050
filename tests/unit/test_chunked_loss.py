"""train.loss_chunks (finetune.chunked_loss): the causal-LM loss taken in chunks of label tokens, never over the full
logits, equals the model's own loss and every gradient within 1e-6 in fp32 (in bf16 as closely as bf16 itself
allows); a frozen head's chunks are never recomputed in backward; where it cannot be exact the run keeps the
model's own loss, and an explicit setting there is a one-line config error."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.config import ConfigError, build_config, load_config, parse_args
from finetune.core.loss_chunks import DEFAULT_CHUNK_TOKENS, loss_chunk_tokens
from tests.conftest import write_instruction_file, write_pairs, write_summarization_file
from tests.unit.test_gpu_paths import one_rank  # noqa: F401 (a fixture: one in-process gloo rank)

# Tokens per chunk in the tests: every batch takes several chunks, the last one partial. (Below 16 rows, CPU
# matmul kernels sum the head's backward in another order: gradients then differ by a few 1e-6, not by 1e-7.)
CHUNK = 16


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class HeadWatch(TorchDispatchMode):
    """Watches the LM head's work, forward and backward alike: the most logit rows (token positions) that any
    operation's output holds (tensors over the vocabulary other than the head's weight, its transpose and its
    gradient), the matmuls with the head's weight or into its gradient, and the logits recomputed (matmuls into the
    vocabulary while the autograd engine runs a backward pass)."""

    def __init__(self, head_weight: torch.Tensor) -> None:
        super().__init__()
        self.vocab, self.weight_shapes = head_weight.shape[0], {tuple(head_weight.shape), tuple(head_weight.shape[::-1])}
        self.rows = self.head_matmuls = self.recomputed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[-1] == self.vocab and tuple(value.shape) not in self.weight_shapes:
                self.rows = max(self.rows, value.numel() // self.vocab)
                self.recomputed += func in MATMULS and torch._C._current_graph_task_id() != -1
        if func in MATMULS and any(isinstance(t, torch.Tensor) and tuple(t.shape) in self.weight_shapes for t in (*args, out)):
            self.head_matmuls += 1
        return out


def first_step(tmp_path, args: list[str], chunks: str, world_size: int = 1) -> tuple[float, dict[str, torch.Tensor], HeadWatch | None, int, int]:
    """(loss, gradients by name, what the head did, batch x tokens, tokens per chunk) of one training step through
    build_run and the plugin's forward_backward, with train.loss_chunks=`chunks`, on this rank of `world_size` (a
    pipeline: the loss on its last stage, 0.0 elsewhere; the gradients of the parameters this stage holds; the head
    watched where it is held, None elsewhere)."""
    from finetune.data import batches_forever, build_data, load_splits
    from finetune.faults import Faults
    from finetune.chunked_loss import chunk_tokens_of
    from finetune.model import build_model
    from finetune.packing import packed_attention
    from finetune.parallel import PLUGINS
    from finetune.preference import attach_reference, stores_reference
    from finetune.run import build_run

    cfg = load_config([*args, f"train.loss_chunks={chunks}", "lora.dropout=0", "train.batch_size=4", "data.max_length=48", f"output_dir={tmp_path / 'out'}"], world_size=world_size)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    model, tokenizer = build_model(cfg.model, cfg.train.seed, shardformer=PLUGINS[cfg.plugin.name].shardformer)  # its attention, as finetune.train builds it
    data = build_data(cfg.data, tokenizer, splits)
    run, dataloader = build_run(cfg, world_size=world_size, device=torch.device("cpu"), task=splits.task, model=model, pending=None, samples=data.train,
                                pad_token_id=tokenizer.pad_token_id, faults=Faults(""), preemption=None, packed=packed_attention(model) if cfg.data.packing else "")  # fmt: skip
    if stores_reference(run.objective):
        attach_reference(cfg, run.model, run.layout, data.train, 4, tokenizer.pad_token_id, torch.device("cpu"), run.plugin.row_logps(run), run.padding)
    trained = run.model.unwrap(unwrap_peft=False)
    generator = torch.Generator().manual_seed(1)
    for name, parameter in trained.named_parameters():
        if "lora_B" in name:  # a fresh adapter is the identity and lora_A's gradient zero: give it weights
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    _, micro_batches = next(batches_forever(dataloader, 1, run.steps_per_epoch))
    head_weight = trained.get_output_embeddings().weight
    head = HeadWatch(head_weight) if head_weight is not None and head_weight.numel() else None  # a pipeline's other stages release it
    with head or contextlib.nullcontext():
        loss = run.plugin.forward_backward(run, micro_batches)
    held = lambda p: p.grad is not None or not run.layout.pipeline  # noqa: E731 (a stage has no gradient of another's parameters)
    grads = {name: p.grad.clone() for name, p in trained.named_parameters() if p.requires_grad and held(p)}
    return loss, grads, head, micro_batches[0]["input_ids"].numel(), chunk_tokens_of(run.model)


def task_args(tmp_path, task: str) -> list[str]:
    """A task's training data, written under tmp_path (chat: the built-in corpus)."""
    files = {
        "instruction": lambda: write_instruction_file(tmp_path / "train.jsonl"),
        "summarization": lambda: write_summarization_file(tmp_path / "train.json"),
        "chat": lambda: "chatterbot-corpus:chat",
        "preference": lambda: write_pairs(tmp_path / "pairs.jsonl"),
    }
    task, _, packed = task.partition("-")
    return [f"task={task}", f"data.train_path={files[task]()}", f"data.packing={bool(packed)}".lower()]


# LoRA with the head among its targets: peft wraps the head, which then trains.
HEAD_ADAPTED = ["lora.target_modules=[q_proj,v_proj,lm_head]"]


@pytest.mark.parametrize(
    "task, method, model, extra, head_trains",
    [
        ("instruction", "lora", "tiny-llama", [], False),
        ("instruction", "full", "tiny-gpt2", [], True),
        ("summarization", "full", "tiny-llama", [], True),
        ("instruction-packed", "lora", "tiny-llama", [], False),  # data.packing: position ids and a block mask (Llama's own attention)
        ("instruction-packed", "full", "tiny-gpt2", [], True),  # data.packing through our GPT-2 attention function
        ("chat", "lora", "tiny-gpt2", [], False),  # GPT-2's head is its (frozen) input embedding, tied
        ("preference", "lora", "tiny-gpt2", [], False),  # DPO, the reference: the same model with its adapters off
        ("preference", "full", "tiny-llama", [], True),  # DPO, the reference log-probabilities stored per pair
        ("instruction", "lora", "tiny-llama", HEAD_ADAPTED, True),
        ("instruction", "full", "tiny-llama", ["plugin.name=hybrid_parallel"], True),  # one stage, no TP: shardformer gives Llama no forward, install()'s stays
        # one stage, no TP: shardformer still replaces GPT-2's forward with its own (parallel_output), which is wrapped
        ("instruction", "full", "tiny-gpt2", ["plugin.name=hybrid_parallel"], True),
    ],
)
def test_chunked_loss_equals_the_models_own_loss_and_every_gradient(task, method, model, extra, head_trains, one_rank, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    args = [*task_args(tmp_path, task), f"model.name={model}", f"method={method}", *extra]
    loss, grads, head, positions, chunk = first_step(tmp_path, args, "off")
    assert chunk == 0 and head.rows == positions  # today's path: the (batch x tokens x vocab) logits exist
    chunked_loss, chunked_grads, head, _, chunk = first_step(tmp_path, args, str(CHUNK))
    assert chunk == CHUNK and head.rows == CHUNK  # one chunk's logits at a time, forward and backward
    # A frozen head's chunks take their hidden-state gradient in forward; a head that trains recomputes its logits.
    assert bool(head.recomputed) == head_trains, f"{head.recomputed} logit matmuls in backward"
    assert abs(chunked_loss - loss) <= 1e-6 * max(1.0, abs(loss)), (chunked_loss, loss)
    assert grads.keys() == chunked_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.abs().max() > 0, f"{name}: no gradient, the comparison would prove little"
        assert torch.allclose(chunked_grads[name], grad, atol=1e-6, rtol=0), f"{name}: gradient differs by {(chunked_grads[name] - grad).abs().max()}"


@pytest.mark.parametrize(
    "grad, head_trains, per_chunk",
    [
        (True, False, 2),  # logits and the hidden-state gradient, both in forward; backward scales it
        (True, True, 4),  # logits, recomputed in backward, then the gradients of the hidden states and of the weight
        (False, False, 1),  # no_grad (eval, a reference pass): the logits alone
        (False, True, 1),
    ],
)
def test_the_head_runs_once_per_chunk_and_gradient(grad, head_trains, per_chunk):
    """The head's matmuls per chunk, by path (finetune.chunked_loss.chunk_logps_function decides it from the head)."""
    from finetune.chunked_loss import chunked_output

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(head_trains)
    hidden = torch.randn(3, 20, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 20))
    labels[:, :5] = -100  # 3 x 15 counted targets: 3 chunks of 16 tokens, the last one partial
    with HeadWatch(head.weight) as watch, torch.set_grad_enabled(grad):
        loss = chunked_output(hidden, head, labels, CHUNK).loss
        if grad:
            loss.backward()
    assert watch.head_matmuls == 3 * per_chunk and watch.recomputed == (3 if grad and head_trains else 0)


class NewVocabTensors(TorchDispatchMode):
    """Records the dtype of every tensor an operation newly allocates over the vocabulary with at least `rows` rows
    (outputs that alias an input, such as an in-place operation's, are not new)."""

    def __init__(self, vocab: int, rows: int) -> None:
        super().__init__()
        self.vocab, self.rows, self.dtypes = vocab, rows, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (value.shape[0], self.vocab) and value.shape[0] >= self.rows:
                if value.untyped_storage().data_ptr() not in inputs:
                    self.dtypes.append(value.dtype)
        return out


@pytest.mark.parametrize("dtype, allocated", [(torch.float32, [torch.float32]), (torch.bfloat16, [torch.bfloat16, torch.float32])])
def test_a_frozen_heads_chunk_is_one_fp32_buffer_of_the_vocabulary(dtype, allocated):
    """Under a frozen head a chunk's log-softmax, softmax and onehot - softmax are formed in place: the only tensors of the
    chunk's size over the vocabulary are the head's logits and, for half logits, their fp32 copy (the estimator's 4 or 6
    bytes x vocabulary a token, not autograd's 12); log_softmax's output is 64 rows at a time. Forward and backward."""
    from finetune.chunked_loss import chunked_output

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 300, bias=False).to(dtype).requires_grad_(False)
    hidden = torch.randn(2, 101, 8, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 300, (2, 101))
    with NewVocabTensors(vocab=300, rows=65) as watch:  # 200 targets, one chunk
        chunked_output(hidden, head, labels, 256).loss.backward()
    assert watch.dtypes == allocated
    with NewVocabTensors(vocab=300, rows=65) as full_logits:  # what autograd's cross-entropy allocates over the same chunk
        torch.nn.functional.cross_entropy(head(hidden[:, :-1].reshape(-1, 8)).float(), labels[:, 1:].reshape(-1)).backward()
    assert len(full_logits.dtypes) > len(allocated) + 1


def test_a_frozen_head_in_bf16_is_as_close_as_bf16_allows():
    """bf16 weights, frozen head: the chunked loss rounds the same quantities in bf16 as the full logits in another order
    (the upstream gradient applied after the head's backward, not before it), so its gradients are about as far from
    the fp32 ones as the full-logits path's: the two bf16 results are at most twice that distance apart, per tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune import chunked_loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attn_implementation="eager")  # fmt: skip
    model = LlamaForCausalLM(config)
    model.lm_head.requires_grad_(False)
    ids = torch.randint(0, 1000, (4, 40))
    labels = ids.clone()
    labels[:, :10] = -100

    def loss_and_grads(m):
        m.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.item(), {name: p.grad.float() for name, p in m.named_parameters() if p.requires_grad}

    exact, exact_grads = loss_and_grads(model)  # fp32: the reference both bf16 results are measured against
    model.to(torch.bfloat16)
    full, full_grads = loss_and_grads(model)
    chunked_loss.install(model, CHUNK)
    with HeadWatch(model.lm_head.weight) as watch:
        chunked, chunked_grads = loss_and_grads(model)
    assert watch.rows == CHUNK and watch.recomputed == 0 and watch.head_matmuls == 2 * 8  # 4 x 30 targets: 8 chunks
    assert abs(chunked - full) <= 2 * abs(full - exact), (chunked, full, exact)
    for name, want in exact_grads.items():
        bf16_error = (full_grads[name] - want).norm()
        assert 0 < bf16_error and (chunked_grads[name] - full_grads[name]).norm() <= 2 * bf16_error, name


def test_soft_capped_logits_follow_the_architecture_record():
    """Gemma-2 caps its final logits (finetune.architectures: logit_softcap): the chunked loss caps them the same way."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from finetune import chunked_loss

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, final_logit_softcapping=2.0, attn_implementation="eager")  # fmt: skip
    model = Gemma2ForCausalLM(config)
    ids = torch.randint(0, 300, (2, 12))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt: never reaches the vocabulary
    expected = model(input_ids=ids, labels=labels).loss
    (want,) = torch.autograd.grad(expected, model.model.embed_tokens.weight)
    chunked_loss.install(model, 5)
    got = model(input_ids=ids, labels=labels).loss
    (grad,) = torch.autograd.grad(got, model.model.embed_tokens.weight)
    assert abs(got.item() - expected.item()) <= 1e-6 and torch.allclose(grad, want, atol=1e-6, rtol=0)
    assert model(input_ids=ids).logits.shape == (2, 12, 300)  # without labels (generation): the model's own forward


@pytest.mark.parametrize(
    "setting, plugin, task, tokens",
    [
        ("auto", "torch_ddp", "instruction", DEFAULT_CHUNK_TOKENS),
        ("auto", "low_level_zero", "preference", DEFAULT_CHUNK_TOKENS),
        ("512", "torch_fsdp", "chat", 512),
        ("off", "torch_ddp", "instruction", 0),
        ("auto", "hybrid_parallel", "instruction", DEFAULT_CHUNK_TOKENS),  # tensor (and data) parallel: the vocabulary stays split per chunk
        ("auto", "hybrid_parallel", "preference", DEFAULT_CHUNK_TOKENS),
        ("auto", "hybrid_parallel plugin.pp_size=2 plugin.num_microbatches=2", "instruction", DEFAULT_CHUNK_TOKENS),  # the last stage's loss in chunks
        ("512", "hybrid_parallel plugin.pp_size=2 plugin.num_microbatches=2", "preference", 512),
        ("auto", "hybrid_parallel plugin.tp_size=2", "instruction", DEFAULT_CHUNK_TOKENS),  # vocab-parallel head: the chunks keep the vocabulary split
        ("auto", "hybrid_parallel plugin.tp_size=2 plugin.pp_size=2 plugin.num_microbatches=2", "preference", DEFAULT_CHUNK_TOKENS),  # both, on the last stage
        ("auto", "hybrid_parallel plugin.sp_size=2", "instruction", 0),  # the loss of each rank's part of the sequence
        ("auto", "hybrid_parallel plugin.pp_size=2 plugin.num_microbatches=2", "classification", 0),
        ("auto", "torch_ddp", "classification", 0),  # no LM head
    ],
)
def test_the_chunk_size_each_run_gets(setting, plugin, task, tokens):
    name, *options = plugin.split()
    args = [f"train.loss_chunks={setting}", f"plugin.name={name}", *options, f"task={task}", "model.name=tiny-gpt2"]
    assert loss_chunk_tokens(build_config(parse_args(args))) == tokens


@pytest.mark.parametrize(
    "options, tokens",
    [
        (["plugin.tp_size=2"], DEFAULT_CHUNK_TOKENS),
        (["plugin.tp_size=2", "plugin.zero_stage=1", "train.precision=bf16"], DEFAULT_CHUNK_TOKENS),
        (["plugin.pp_size=2", "plugin.num_microbatches=2"], DEFAULT_CHUNK_TOKENS),  # on the pipeline's last stage (stage_forward)
        (["plugin.tp_size=2", "plugin.pp_size=2", "plugin.num_microbatches=2"], DEFAULT_CHUNK_TOKENS),  # there, the vocabulary split
        (["plugin.tp_size=2", "plugin.sp_mode=split_gather"], 0),  # each rank's loss covers its part of the sequence
        (["plugin.sp_size=2"], 0),
    ],
)
def test_the_chunk_size_under_hybrid_parallel(options, tokens):
    args = ["plugin.name=hybrid_parallel", "model.name=tiny-llama", *options]
    assert loss_chunk_tokens(build_config(parse_args(args))) == tokens


@pytest.mark.parametrize(
    "args, problem",
    [
        (["train.loss_chunks=256", "model.name=tiny-llama", "plugin.name=hybrid_parallel", "plugin.tp_size=2", "plugin.sp_mode=split_gather"],
         "train.loss_chunks=256: plugin hybrid_parallel keeps the full-logits loss: under sequence parallelism"),
        (["train.loss_chunks=256", "task=classification", "data.train_path=chatterbot-corpus:topics"], "train.loss_chunks=256: task=classification has no language-model head"),
        (["train.loss_chunks=many"], "train.loss_chunks: must be auto, off or a positive number of tokens per chunk, got 'many'"),
        (["train.loss_chunks=0"], "train.loss_chunks: must be auto, off or a positive number of tokens per chunk, got '0'"),
    ],
)
def test_explicit_chunks_where_they_cannot_run_are_one_line_errors(args, problem):
    with pytest.raises(ConfigError) as err:
        load_config(["model.name=tiny-gpt2", *args], world_size=2)
    assert str(err.value).startswith(problem) and "\n" not in str(err.value), str(err.value)
