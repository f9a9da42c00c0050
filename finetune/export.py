"""Export a run or a checkpoint as a plain Hugging Face model directory.

    python -m finetune.export outputs/run1 outputs/run1-merged                       # a run's final/
    python -m finetune.export outputs/run1/checkpoints/step_00000040 outputs/merged  # one checkpoint
    python -m finetune.export outputs/run1 --gguf run1.gguf [--gguf-type f16|q8_0]   # one GGUF file (Llama)
    python -m finetune.export RUN_DIR OUT_DIR --trust-remote-code --allow-pickle      # opt-ins, see below

A LoRA/QLoRA adapter is merged into a full-precision base (for QLoRA too: merging into 4/8-bit
weights would round the update away), a full fine-tune's (sharded) checkpoint becomes one HF dir.
Either way the result loads with `AutoModelForCausalLM.from_pretrained` (classification and reward runs, with
their head: `AutoModelForSequenceClassification`), which the export checks: it reloads what it wrote and
compares its logits with the in-memory merged model on a test input.
With --gguf, a Llama-architecture run becomes one GGUF file for llama.cpp instead (finetune.gguf_export).

A run dir may come from someone else, so its config.yaml cannot opt into running code: its
model.trust_remote_code and model.allow_pickle are ignored (with a note), and only this command's own
--trust-remote-code (the base model's code) and --allow-pickle (pickle-only weights, CVE-2025-32434) apply.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

# bitsandbytes' notice that the optional `kernels` package (a faster CPU 4-bit matmul) is missing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from finetune.errors import run_command
from finetune.export_source import ExportError, add_opt_in_arguments, locate, merged_model, opt_in_flags  # noqa: F401 (ExportError: the error this command raises)
from finetune.outputs import staged_output
from finetune.tasks import TASKS

LOGITS_TOLERANCE = 1e-4


def export(source: Path, out: Path, flags: set[str] = frozenset()) -> dict:
    """Write the merged HF model dir `out` (atomically) and check it reloads to the same logits.

    Args:
        flags: this command's opt-ins (OPT_INS); the run's own config cannot set them.
    """
    import transformers

    with staged_output(out, directory=True) as staging:  # refused now if out holds anything, before the model is built
        cfg, weights = locate(source, flags)
        model, tokenizer = merged_model(cfg, weights)
        model.eval()
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        auto_model = getattr(transformers, TASKS[cfg.task].auto_model)  # the run's head: a causal LM, or a sequence classifier
        reloaded = auto_model.from_pretrained(staging, torch_dtype=torch.float32, use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code).eval()
        probe = torch.randint(0, min(1000, model.config.vocab_size), (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            difference = (model(input_ids=probe).logits - reloaded(input_ids=probe).logits).abs().max().item()
        if difference > LOGITS_TOLERANCE:
            raise ExportError(f"the exported model's logits differ from the merged model's by {difference:.2e} (> {LOGITS_TOLERANCE}); nothing was written")
    report = {"source": str(weights), "out": str(out), "merged_adapter": (weights / "adapter_config.json").is_file(), "max_logit_difference": difference}
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_cli(argv: list[str]):
    """The export command line: SOURCE OUT_DIR, or SOURCE --gguf OUT.gguf [--gguf-type f16|q8_0]."""
    import argparse

    from finetune.gguf_export import GGUF_TYPES

    parser = argparse.ArgumentParser(prog="python -m finetune.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a run directory or a checkpoint directory")
    parser.add_argument("out", type=Path, nargs="?", help="the new HF model directory")
    parser.add_argument("--gguf", type=Path, metavar="OUT.gguf", help="write one GGUF file instead (Llama-architecture causal LMs)")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, help="the GGUF weight type (default f16)")
    add_opt_in_arguments(parser)
    args = parser.parse_args(argv)
    if (args.out is None) == (args.gguf is None):
        parser.error("give either OUT_DIR or --gguf OUT.gguf")
    if args.gguf is None and args.gguf_type is not None:
        parser.error("--gguf-type goes with --gguf")
    args.flags = opt_in_flags(args)
    return args


def export_command(args: argparse.Namespace) -> int:
    """Export the run (or its GGUF file) and say what was written and how well it reloaded."""
    if args.gguf is not None:
        from finetune.gguf_export import export_gguf

        report = export_gguf(args.source, args.gguf, args.gguf_type or "f16", args.flags)
    else:
        report = export(args.source, args.out, args.flags)
    what = "adapter merged into the full-precision base" if report["merged_adapter"] else "full weights"
    form = f"GGUF {report['gguf_type']} " if "gguf_type" in report else ""
    scale = f" (largest logit {report['max_logit']:.2f})" if "max_logit" in report else ""
    print(f"exported {report['source']} ({what}) to {form}{report['out']}; reloaded logits match within {report['max_logit_difference']:.1e}{scale}")
    return 0


def main(argv: list[str]) -> int:
    return run_command(argv, parse_cli, export_command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
