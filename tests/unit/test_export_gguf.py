"""GGUF out (`python -m finetune.export RUN --gguf OUT.gguf`): a tiny random Llama with a merged LoRA
adapter, written as f16 and q8_0 and read back by transformers' GGUF loader; refusals and the round-trip
guard. The runs are built without training: a peft adapter with random weights in a run-like dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from finetune.export import main as export_main


def write_run(root: Path, model_name: str, task: str = "instruction") -> Path:
    """A run-like dir that finetune.export reads: config.yaml and final/ (an adapter with non-zero LoRA B)."""
    from peft import LoraConfig, get_peft_model

    from finetune.config import ModelConfig
    from finetune.model import build_model

    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": task, "method": "lora", "model": {"name": model_name}}))
    if task == "instruction" and "gpt2" not in model_name:
        base, _ = build_model(ModelConfig(name=model_name), seed=42)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        torch.manual_seed(0)
        # init_lora_weights=False: B is random too, so the merged model differs from the base
        get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).save_pretrained(run / "final")
    else:
        (run / "final").mkdir()
    return run


@pytest.fixture(scope="module")
def smollm_tokenized_llama(tmp_path_factory) -> Path:
    """A tiny random Llama dir (untied output head, larger init than the default) with the SmolLM2 tokenizer from its GGUF: 49,152 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune import assets

    root = tmp_path_factory.mktemp("gguf")
    tokenizer = assets.tokenizer_from_gguf(assets.package_file(*assets._SMOLLM2_GGUF))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        initializer_range=0.1,  # sharp enough attention that a wrong Q/K row order shows in the logits
    )  # fmt: skip
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return write_run(root, str(root / "base"))


def merged(run: Path) -> torch.nn.Module:
    from finetune.export import locate, merged_model

    model, _ = merged_model(*locate(run))
    return model.eval()


def reload(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()


# |logit difference| / largest |logit|; measured 1.3e-3 (f16) and 2.9e-2 (q8_0), a wrong Q/K order 0.8
@pytest.mark.parametrize("gguf_type, tolerance", [("f16", 5e-3), ("q8_0", 6e-2)])
def test_llama_run_exports_to_gguf_and_reads_back(smollm_tokenized_llama, tmp_path, gguf_type, tolerance):
    import gguf

    out = tmp_path / f"model-{gguf_type}.gguf"
    assert export_main([str(smollm_tokenized_llama), "--gguf", str(out), "--gguf-type", gguf_type]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no .partial left
    reader = gguf.GGUFReader(str(out))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    matrix_type = {"f16": "F16", "q8_0": "Q8_0"}[gguf_type]
    assert kinds["blk.0.attn_q.weight"] == kinds["output.weight"] == matrix_type and kinds["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    tokens = torch.tensor([[1, 504, 3458, 282, 1345, 30, 216, 33, 34, 2]])
    expected = merged(smollm_tokenized_llama)
    with torch.no_grad():
        got, want = reload(out)(input_ids=tokens).logits, expected(input_ids=tokens).logits
        difference = (got - want).abs().max() / want.abs().max()
        assert 0 < difference < tolerance  # the file's own (rounded) weights, in the right layout
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(smollm_tokenized_llama.parent / "base").eval()
        assert (got - base(input_ids=tokens).logits).abs().max() / want.abs().max() > 5 * tolerance  # the adapter is merged in


def test_gpt2_tokenizer_round_trips_and_an_existing_output_is_kept(tmp_path):
    """tiny-llama's tokenizer (GPT-2's BPE, no digit splitting) written alone, read back by finetune.assets."""
    import gguf

    from finetune import assets
    from finetune.gguf_export import add_tokenizer

    tokenizer = assets.gpt2_tokenizer()
    writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    add_tokenizer(writer, tokenizer, vocab_size=50260)  # 3 embedding rows beyond the tokenizer: placeholders
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fields = gguf.GGUFReader(str(tmp_path / "vocab.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2" and fields["tokenizer.ggml.tokens"].contents()[-1] == "[PAD50259]"
    text = "GGUF out: 12 tokens, <|endoftext|> and café"
    assert assets.tokenizer_from_gguf(tmp_path / "vocab.gguf")(text).input_ids == tokenizer(text).input_ids
    out = tmp_path / "taken.gguf"
    out.write_bytes(b"mine")
    assert export_main([str(tmp_path), "--gguf", str(out)]) == 2  # never overwritten (checked first)
    assert out.read_bytes() == b"mine"


@pytest.mark.parametrize("model_name, task, reason", [("tiny-gpt2", "instruction", "gpt2 model"), ("tiny-roberta", "classification", "task=classification: a classification head"), ("tiny-llama", "reward", "task=reward: a classification head")])
def test_refused_before_any_model_is_built(tmp_path, monkeypatch, capsys, model_name, task, reason):
    import finetune.gguf_export

    def must_not_build(*args):
        raise AssertionError("a model was built before the refusal")

    monkeypatch.setattr(finetune.gguf_export, "merged_model", must_not_build)
    run = write_run(tmp_path, model_name, task)
    assert export_main([str(run), "--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and reason in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("x.gguf*"))


def test_a_round_trip_mismatch_fails_and_leaves_no_file(smollm_tokenized_llama, tmp_path, monkeypatch, capsys):
    import finetune.gguf_export

    monkeypatch.setattr(finetune.gguf_export, "_permute", lambda weights, n_head: weights)  # HF's Q/K row order, unconverted
    assert export_main([str(smollm_tokenized_llama), "--gguf", str(tmp_path / "bad.gguf")]) == 2
    assert "logits differ" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_usage_errors(tmp_path):
    # usage errors: argparse's message, exit code 2 (returned, so `python -m finetune.export` exits 2)
    assert export_main([str(tmp_path), "--gguf", str(tmp_path / "a.gguf"), "--gguf-type", "q4_0"]) == 2
    for argv in ([str(tmp_path), str(tmp_path / "dir"), "--gguf", str(tmp_path / "a.gguf")], [str(tmp_path), str(tmp_path / "dir"), "--gguf-type", "f16"]):
        assert export_main(argv) == 2
    assert export_main([str(tmp_path), "--gguf", str(tmp_path / "a.txt")]) == 2
