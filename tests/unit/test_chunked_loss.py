"""train.loss_chunks (finetune.chunked_loss): the causal-LM loss taken in chunks of label tokens, never over the full
logits, equals the model's own loss and every gradient within 1e-6 in fp32; where it cannot be exact the run keeps
the model's own loss, and an explicit setting there is a one-line config error."""

from __future__ import annotations

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


class LargestLogits(TorchDispatchMode):
    """Records the most logit rows (token positions) that any operation's output holds, forward and backward alike:
    tensors over the vocabulary other than the head's weight (or its transpose) and its gradient."""

    def __init__(self, head_weight: torch.Tensor) -> None:
        super().__init__()
        self.vocab, self.weight_shapes = head_weight.shape[0], {tuple(head_weight.shape), tuple(head_weight.shape[::-1])}
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[-1] == self.vocab and tuple(value.shape) not in self.weight_shapes:
                self.rows = max(self.rows, value.numel() // self.vocab)
        return out


def first_step(tmp_path, args: list[str], chunks: str) -> tuple[float, dict[str, torch.Tensor], int, int, int]:
    """(loss, gradients by name, the most logit rows any tensor held, batch x tokens, tokens per chunk) of one training
    step through build_run and the plugin's forward_backward, with train.loss_chunks=`chunks`."""
    from finetune.data import batches_forever, build_data, load_splits
    from finetune.faults import Faults
    from finetune.chunked_loss import chunk_tokens_of
    from finetune.model import build_model
    from finetune.packing import packed_attention
    from finetune.preference import attach_reference, stores_reference
    from finetune.run import build_run

    cfg = load_config([*args, f"train.loss_chunks={chunks}", "lora.dropout=0", "train.batch_size=4", "data.max_length=48", f"output_dir={tmp_path / 'out'}"], world_size=1)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    model, tokenizer = build_model(cfg.model, cfg.train.seed)
    data = build_data(cfg.data, tokenizer, splits)
    run, dataloader = build_run(cfg, world_size=1, device=torch.device("cpu"), task=splits.task, model=model, pending=None, samples=data.train,
                                pad_token_id=tokenizer.pad_token_id, faults=Faults(""), preemption=None, packed=packed_attention(model) if cfg.data.packing else "")  # fmt: skip
    if stores_reference(run.objective):
        attach_reference(cfg, run.model, run.layout, data.train, 4, tokenizer.pad_token_id, torch.device("cpu"))
    trained = run.model.unwrap(unwrap_peft=False)
    generator = torch.Generator().manual_seed(1)
    for name, parameter in trained.named_parameters():
        if "lora_B" in name:  # a fresh adapter is the identity and lora_A's gradient zero: give it weights
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    _, micro_batches = next(batches_forever(dataloader, 1, run.steps_per_epoch))
    with LargestLogits(trained.get_output_embeddings().weight) as largest:
        loss = run.plugin.forward_backward(run, micro_batches)
    grads = {name: p.grad.clone() for name, p in trained.named_parameters() if p.requires_grad}
    return loss, grads, largest.rows, micro_batches[0]["input_ids"].numel(), chunk_tokens_of(run.model)


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


@pytest.mark.parametrize(
    "task, method, model",
    [
        ("instruction", "lora", "tiny-llama"),
        ("instruction", "full", "tiny-gpt2"),
        ("summarization", "full", "tiny-llama"),
        ("instruction-packed", "lora", "tiny-llama"),  # data.packing: position ids and a block mask (Llama's own attention)
        ("instruction-packed", "full", "tiny-gpt2"),  # data.packing through our GPT-2 attention function
        ("chat", "lora", "tiny-gpt2"),
        ("preference", "lora", "tiny-gpt2"),  # DPO, the reference: the same model with its adapters off
        ("preference", "full", "tiny-llama"),  # DPO, the reference log-probabilities stored per pair
    ],
)
def test_chunked_loss_equals_the_models_own_loss_and_every_gradient(task, method, model, one_rank, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    args = [*task_args(tmp_path, task), f"model.name={model}", f"method={method}"]
    loss, grads, logit_rows, positions, chunk = first_step(tmp_path, args, "off")
    assert chunk == 0 and logit_rows == positions  # today's path: the (batch x tokens x vocab) logits exist
    chunked_loss, chunked_grads, logit_rows, _, chunk = first_step(tmp_path, args, str(CHUNK))
    assert chunk == CHUNK and logit_rows == CHUNK  # one chunk's logits at a time, forward and backward
    assert abs(chunked_loss - loss) <= 1e-6 * max(1.0, abs(loss)), (chunked_loss, loss)
    assert grads.keys() == chunked_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.abs().max() > 0, f"{name}: no gradient, the comparison would prove little"
        assert torch.allclose(chunked_grads[name], grad, atol=1e-6, rtol=0), f"{name}: gradient differs by {(chunked_grads[name] - grad).abs().max()}"


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
        ("auto", "hybrid_parallel", "instruction", 0),  # keeps today's path
        ("auto", "torch_ddp", "classification", 0),  # no LM head
    ],
)
def test_the_chunk_size_each_run_gets(setting, plugin, task, tokens):
    args = [f"train.loss_chunks={setting}", f"plugin.name={plugin}", f"task={task}", "model.name=tiny-gpt2"]
    assert loss_chunk_tokens(build_config(parse_args(args))) == tokens


@pytest.mark.parametrize(
    "args, problem",
    [
        (["train.loss_chunks=256", "plugin.name=hybrid_parallel", "plugin.tp_size=2"], "train.loss_chunks=256: plugin hybrid_parallel keeps the full-logits loss: shardformer replaces the model's forward"),
        (["train.loss_chunks=256", "task=classification", "data.train_path=chatterbot-corpus:topics"], "train.loss_chunks=256: task=classification has no language-model head"),
        (["train.loss_chunks=many"], "train.loss_chunks: must be auto, off or a positive number of tokens per chunk, got 'many'"),
        (["train.loss_chunks=0"], "train.loss_chunks: must be auto, off or a positive number of tokens per chunk, got '0'"),
    ],
)
def test_explicit_chunks_where_they_cannot_run_are_one_line_errors(args, problem):
    with pytest.raises(ConfigError) as err:
        load_config(["model.name=tiny-gpt2", *args], world_size=2)
    assert str(err.value).startswith(problem) and "\n" not in str(err.value), str(err.value)
