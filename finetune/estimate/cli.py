"""Will it fit? Per-rank memory of a fine-tuning run, predicted before any hardware is rented.

    python -m finetune.estimate model=llama2-7b method=lora plugin=zero2 world_size=8 batch_size=4 seq_len=1024 precision=bf16
    python -m finetune.estimate --config booster_configs/fsdp.yaml --config my_run.yaml world_size=16 --json

The estimate is asked for with exactly the run config a user would launch (`--config` files and
`key=value` overrides of finetune.config), plus what only the launch knows:

    world_size=N      processes (default 1)
    seq_len=N         tokens per sample (default data.max_length, the longest a batch can be)
    device=cuda|cpu   where the run lives (default cuda)
    quantization.bits=4|8, quantization.quant_type=nf4|fp4, quantization.double_quant=true|false,
    quantization.compute_dtype=bf16|fp16|fp32   QLoRA's base-weight layout (method=qlora)

and short forms of common keys: model=, plugin= (a booster_configs/ setup such as zero2, or a plugin
name), batch_size=, precision=, optimizer=. With `--fit GiB`, it prints instead whether the run fits
in that many GiB per rank and, when it does not, the cheapest changes that do, ranked (see
`fitting_alternatives`). Parameters are counted on a meta-device model (nothing is
allocated); LoRA adapters are injected into it with the run's own targets.

Per rank, in bytes (P = parameters and Pt = trainable ones, of this rank's tensor/pipeline share):
  weights       P x bytes of the stored dtype (fp32 4; plugins that cast to bf16/fp16 2; LoRA with
                bf16/fp16: the frozen base 2 under every plugin but Gemini, adapters as the plugin keeps
                them; QLoRA 4-bit 0.5 + block absmax on the quantized Linear layers, the rest in the
                compute dtype), divided by the plugin's parameter sharding (FSDP, Gemini), plus the
                unsharded working copy FSDP gathers for compute (the whole model as one unit with
                plugin.auto_wrap=none; with `block`, the default, the root unit and two blocks)
  gradients     Pt x gradient bytes, divided by gradient sharding (ZeRO-2, FSDP, Gemini); DDP holds
                each gradient twice (param.grad and its all-reduce bucket) unless gradient_as_bucket_view
  optimizer     AdamW m + v (2 states), SGD momentum (1 state; train.py builds SGD with momentum 0.9),
                plus the fp32 master copy of half-precision plugins, divided by optimizer sharding
                (ZeRO-1/2, FSDP, Gemini); CPU offload moves them to host memory (reported apart)
  activations   the peak of a training step (see `layer_activation_bytes`), with and without per-layer
                gradient checkpointing, and the peak of an eval batch's forward (its logits); with
                train.activation_offload on CUDA every layer's saved tensors (checkpointing: its input) wait
                in host memory (its own line) and the device holds what is saved outside the layers, the
                loss and, in backward, one layer's at a time (`offloaded_activations`)
  step temporaries  what the optimizer step allocates and frees: fp32 gradient copies of half-precision
                plugins and AdamW's per-tensor temporaries (fused kernel on CUDA, per-tensor loop on
                CPU): twice the largest optimizer tensor
  framework overhead  the process itself (CPU: a measured constant; CUDA: the context, assumed) and
                ZeRO's flat gradient-reduce buffers

Peak = weights + gradients + optimizer + overhead + max(training activations, eval activations, step
temporaries): evaluation and the optimizer step run when backward has freed the activations.
Mixed-precision full fine-tuning with AdamW is the familiar 16 bytes/param: 2 (bf16 weights) + 2
(grads) + 4 (fp32 master) + 4 (m) + 4 (v).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from finetune.config import Config, ConfigError, Plain, build_config, parse_args, validate
from finetune.core.plugins import SPECS
from finetune.errors import FinetuneError, shown
from finetune.estimate.fit import format_fit, ignored_problems
from finetune.estimate.memory import CUDA_CONTEXT_BYTES, GIB, Estimate, estimate, gib, quantization_of
from finetune.estimate.shape import EstimateError

BOOSTER_CONFIGS = Path(__file__).resolve().parents[2] / "booster_configs"

ESTIMATOR_KEYS = {"world_size": int, "seq_len": int, "device": str}
SHORT_KEYS = {"model": "model.name", "batch_size": "train.batch_size", "precision": "train.precision", "optimizer": "train.optimizer"}
DEVICES = ("cuda", "cpu")


def _expand_short_forms(argv: list[str]) -> list[str]:
    """model=, batch_size=, precision=, optimizer= name config keys; plugin= names a booster_configs/ file or a plugin."""
    expanded: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "plugin":
            setup = BOOSTER_CONFIGS / f"{value}.yaml"
            if setup.is_file():
                expanded += ["--config", str(setup)]
            elif value in SPECS:
                expanded.append(f"plugin.name={value}")
            else:
                setups = sorted(p.stem for p in BOOSTER_CONFIGS.glob("*.yaml"))
                raise ConfigError(f"plugin={value}: not a setup in booster_configs/ ({', '.join(setups)}) nor a plugin ({', '.join(SPECS)})")
        elif sep and key in SHORT_KEYS:
            expanded.append(f"{SHORT_KEYS[key]}={value}")
        else:
            expanded.append(arg)
    return expanded


def _check_value(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, Plain):  # as written on the command line: YAML's reading of it
        value = value.resolved()
    if kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected {'true or false' if kind is bool else 'a whole number' if kind is int else 'a string'}, got {shown(value)}")


def parse_request(argv: list[str]) -> tuple[Config, dict[str, Any]]:
    """argv -> (the run config, the estimator's own settings), every key and value checked."""
    own = ESTIMATOR_KEYS
    settings, extra = [], {}
    for source, key, value in parse_args(_expand_short_forms(argv)):
        if key in own:
            extra[key] = _check_value(key, value, own[key])
        else:
            settings.append((source, key, value))
    cfg = build_config(settings)
    world_size, device = extra.get("world_size", 1), extra.get("device", "cuda")
    problems = [p for p in validate(cfg, world_size, has_cuda=device == "cuda") if not p.startswith(ignored_problems())]
    if device not in DEVICES:
        problems.insert(0, f"device: unknown value '{device}'; choose from {', '.join(DEVICES)}")
    if extra.get("seq_len", 0) < 0:
        problems.append(f"seq_len: must be at least 1 (0: data.max_length), got {extra['seq_len']}")
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)
    return cfg, extra



def estimate_request(argv: list[str]) -> Estimate:
    """The estimate for a command line (config files, overrides and estimator keys)."""
    cfg, extra = parse_request(argv)
    return estimate(cfg, extra.get("world_size", 1), extra.get("seq_len", 0), extra.get("device", "cuda"), quantization_of(cfg))



def format_table(est: Estimate) -> str:
    """The estimate as a person reads it: setup, then bytes per rank with and without checkpointing."""
    s = est.setup
    parallel = f"dp {s['dp']}" + (f" x tp {s['tp']}" if s["tp"] > 1 else "") + (f" x pp {s['pp']}" if s["pp"] > 1 else "")
    if s.get("sp", 1) > 1:
        parallel += f" x sp {s['sp']} ({s['plugin_options']['sp_mode']})"
    quant = s["quantization"]
    method = f"qlora {quant['bits']}-bit {quant['quant_type'] if quant['bits'] == 4 else 'int8'}" if quant else s["method"]
    precision = f"compute {quant['compute_dtype']}" if quant else s["precision"]
    pct = 100 * est.trainable_params / est.params
    loss = f", loss in {s['loss_chunks']}-token chunks" if s.get("loss_chunks") else ""
    loss += ", activations offloaded to host" if s.get("activation_offload") else ""
    width = 44
    both = lambda name, value: f"  {name:<{width - 2}} {gib(value):>16} {gib(value):>14}"
    lines = [
        f"{method} fine-tune of {s['model']} ({s['model_class']}) with {s['plugin']} on {s['world_size']} {s['device']} rank(s) ({parallel}), {precision}, {s['optimizer']}",
        f"batch {s['batch_size']} x {s['seq_len']} tokens per rank (eval batch {s['eval_batch_size']}{loss}); parameters {est.params:,d}, trainable {est.trainable_params:,d} ({pct:.2f}%)",
        "",
        f"{'per rank, GiB':<{width}} {'no checkpointing':>16} {'checkpointing':>14}",
        both("weights", est.weights),
        both("gradients", est.gradients),
        both("optimizer states (incl. fp32 master)", est.optimizer_states),
        both("framework overhead", est.framework_overhead),
        "  + the largest of (they do not coexist):",
        f"    {'activations of a training step':<{width - 4}} {gib(est.activations):>16} {gib(est.activations_checkpointed):>14}",
        both("  activations of an eval batch", est.eval_activations),
        both("  optimizer-step temporaries", est.step_temporaries),
        f"  {'peak':<{width - 2}} {gib(est.total(False)):>16} {gib(est.total(True)):>14}",
    ]
    if est.host_offload:
        lines.append(f"  {'host memory (CPU offload)':<{width - 2}} {gib(est.host_offload):>16} {gib(est.host_offload):>14}")
    if est.host_activations:
        lines.append(f"  {'host memory (offloaded activations)':<{width - 2}} {gib(est.host_activations):>16} {gib(est.host_activations_checkpointed):>14}")
    ckpt = "true" if est.gradient_checkpointing else "false"
    lines += ["", f"as configured (train.gradient_checkpointing={ckpt}): {gib(est.total())} GiB per rank"]
    if s["device"] == "cuda":
        lines.append(f"framework overhead includes an assumed {CUDA_CONTEXT_BYTES / GIB:.1f} GiB CUDA context (not seen by torch.cuda.memory_allocated)")
        # Published peaks (torchtune's, peft's, Unsloth's tables) are torch allocator figures: the comparable number.
        lines.append(f"without it, as torch.cuda.max_memory_allocated reads the peak: {gib(est.total() - CUDA_CONTEXT_BYTES)} GiB per rank")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """CLI: print the estimate as a table (or JSON with --json); a bad request is one line on stderr, exit 2."""
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    as_json = "--json" in argv
    try:
        argv, fit_gib = _fit_flag([a for a in argv if a != "--json"])
        if fit_gib is not None:
            cfg, extra = parse_request(argv)
            print(format_fit(cfg, extra.get("world_size", 1), fit_gib * GIB, extra.get("device", "cuda"), extra.get("seq_len", 0)))
            return 0
        est = estimate_request(argv)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict(), indent=2) if as_json else format_table(est))
    return 0


def _fit_flag(argv: list[str]) -> tuple[list[str], float | None]:
    """Take `--fit GiB` (or `--fit=GiB`) out of argv."""
    rest, value = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--fit" or arg.startswith("--fit="):
            raw = arg.partition("=")[2] if "=" in arg else next(args, "")
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if not value > 0:
                raise EstimateError(f"--fit: expected the memory per rank in GiB (a positive number), got {raw!r}")
        else:
            rest.append(arg)
    return rest, value
