"""Parallel strategies: one object per ColossalAI plugin that owns everything a run does differently under it.

A `Plugin` says what users may set (`options`, with defaults that fix their types), what it cannot do
with a config (`problems`), the layout numbers it derives (`plan`), where its memory goes for the
estimator (`placement`), and at run time how adapters are applied, how a step's forward/backward and
clipping run, how an eval batch is scored, and how the model and optimizer are written and read (one
writer for checkpoints and final/). train.py, checkpoint.py and estimate.py ask the run's plugin; none
of them tests a plugin name.

Adding a plugin is one class here and one entry in PLUGINS (or `register(MyPlugin())`). This module
imports no torch at module level: config validation reads the registry and fails in a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from finetune.config import Config
    from finetune.run import Run


@dataclass(frozen=True)
class Plan:
    """Layout numbers derived once from the config: tensor x pipeline x data parallel, micro-batches per step."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    num_microbatches: int = 1  # pipeline only: micro-batches per step
    chunks: int = 1  # pipeline only: model chunks per stage (interleaved schedule)

    @property
    def pipeline(self) -> bool:
        return self.pp > 1


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in the built plugin's layout."""

    dp_rank: int
    dp_size: int
    pipeline: bool  # steps go through booster.execute_pipeline
    counts: bool  # this rank's loss and tokens enter the data-parallel sums (tp rank 0 on the last stage)
    replicated: bool  # every rank holds the whole model: eval and saves may use the unwrapped module


def _choice_problem(key: str, value: Any, allowed: tuple) -> list[str]:
    return [] if value in allowed else [f"plugin.{key}: must be {' or '.join(map(str, allowed))}, got {value!r}"]


class Plugin:
    """A replicated data-parallel plugin (TorchDDP); subclasses override what they do differently."""

    name = ""
    short_name = ""  # in report labels
    class_name = ""  # attribute of colossalai.booster.plugin
    summary = ""
    options: dict[str, Any] = {}  # user-settable constructor arguments and their defaults (which fix their types)
    choices: dict[str, tuple[str, ...]] = {}  # the options whose values are names, with the names each takes (config.validate checks them)
    cpu_options: dict[str, Any] = {}  # forced on CPU (gloo), each with its reason at the subclass
    runs_on_cpu = True
    supports_lora = True
    qlora_refusal = ""  # why the plugin cannot hold 4/8-bit weights; empty: it can
    takes_precision = False  # the plugin's own `precision=` receives train.precision (it casts the model)
    takes_max_norm = False  # the plugin clips gradients itself, from train.max_grad_norm
    replicated = True  # after a step every rank holds the whole model
    shardformer = False  # the model is sharded by ColossalAI's shardformer (attention choices depend on it)
    # Why this plugin's checkpoints resume only on the layout that wrote them, and why it cannot read
    # another layout's; empty: its weights and optimizer states are full and by parameter name, any layout.
    resume_layout_refusal = ""
    # How a pretrained model is built for this plugin (finetune.deferred): "eager" (every rank loads the
    # whole model), "lazy" (ColossalAI's LazyInitContext: boost materializes this rank's shard, then
    # load_deferred reads its weights) or "meta" (the plugin materializes each unit from the checkpoint).
    model_init = "eager"

    # --- configuration (no torch) -----------------------------------------------------------------

    def problems(self, cfg: Config, world_size: int, has_cuda: bool) -> list[str]:
        """What this plugin cannot do with cfg, each a line naming the fix."""
        return []

    def plan(self, options: dict[str, Any], batch_size: int, world_size: int) -> Plan:
        """The layout numbers for these (effective) options."""
        return Plan(dp=world_size)

    def constructor_kwargs(self, options: dict[str, Any], precision: str, max_grad_norm: float, on_cpu: bool) -> dict[str, Any]:
        """The plugin class's arguments: the options, what CPU forces, and what we must set."""
        kwargs = {**options, **(self.cpu_options if on_cpu else {})}
        if self.takes_precision:
            kwargs["precision"] = precision
        if self.takes_max_norm:
            kwargs["max_norm"] = max_grad_norm
        return kwargs

    def setting_label(self, options: dict[str, Any], world_size: int, dp_size: int) -> str:
        """The setup in a few characters for reports, e.g. 'ddp x2'."""
        return f"{self.short_name} x{world_size}"

    def placement(self, cfg: Config, world_size: int):
        """Where weights, gradients and states live, for finetune.estimate."""
        from finetune import estimate

        return estimate.ddp_placement(cfg, world_size)

    # --- building ---------------------------------------------------------------------------------

    def shard_policy(self, cfg: Config, model):
        """A shardformer policy of our own for this model (None: ColossalAI's, or no shardformer)."""
        return None

    def apply_adapters(self, model, lora_config, booster, plugin):
        """The model with LoRA adapters the way this plugin can hold them (ColossalAI's enable_lora)."""
        return booster.enable_lora(model, lora_config=lora_config)

    def before_boost(self, cfg: Config, model, plugin, pending=None) -> None:
        """Last changes to the plugin for this model, once adapters are applied (default: none).

        Args:
            pending: the weights a model built without them still needs (finetune.deferred.Pending), or None.
        """

    def load_deferred(self, run: Run, pending) -> None:
        """Read the pretrained weights of a model built without them into this rank's shards, after boost
        (plugins whose model_init is not "eager" define it)."""
        raise NotImplementedError(f"{type(self).__name__} builds models with their weights (model_init={self.model_init!r})")

    def build_optimizer(self, params: list, cfg: Config):
        """The optimizer over the trainable parameters: AdamW or SGD (momentum 0.9).

        AdamW is torch's fused kernel, on CUDA and CPU alike: it steps one tensor at a time, where the
        default multi-tensor path allocates a copy of every state at once (GPT-2 124M on 2 CPU ranks:
        about 1 GB more at the step), and on CPU it is about 4x faster.
        """
        import torch

        if cfg.train.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.train.lr, momentum=0.9, weight_decay=cfg.train.weight_decay)
        return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)

    def layout(self, plugin) -> Layout:
        """This rank's layout under the built plugin."""
        import torch.distributed as dist

        return Layout(dist.get_rank(), dist.get_world_size(), pipeline=False, counts=True, replicated=self.replicated)

    def after_boost(self, cfg: Config, optimizer, scheduler, device):
        """The boosted optimizer to train with, once booster.boost has wrapped model and optimizer: with fp16
        loss scaling where the plugin leaves precision to us (finetune.loss_scaling says why not the Booster's)."""
        if cfg.train.precision == "fp16" and not self.takes_precision:
            from finetune.loss_scaling import loss_scaled

            return loss_scaled(optimizer, device)
        return optimizer

    # --- a training step --------------------------------------------------------------------------

    def forward_backward(self, run: Run, micro_batches: list[dict]) -> float:
        """Forward and backward over a step's micro-batches (gradients accumulate); returns the summed loss."""
        import torch

        from finetune.data import model_inputs

        booster, model, optimizer = run.booster, run.model, run.optimizer
        # Plugins that own precision cast the model themselves; for the others bf16 and fp16 are autocast here
        # (fp16's loss scaling is the optimizer's: after_boost).
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.cfg.train.precision)
        autocast = torch.autocast(run.device.type, dtype=half or torch.bfloat16, enabled=half is not None and not self.takes_precision)
        loss_sum = 0.0
        for i, batch in enumerate(micro_batches):
            # Gradients are all-reduced only on the last micro-batch of the step, where the plugin can defer it.
            defer = i < len(micro_batches) - 1 and booster.plugin.support_no_sync()
            with booster.no_sync(model, optimizer) if defer else contextlib.nullcontext():
                with autocast:
                    loss = model(**model_inputs(batch)).loss / len(micro_batches)
                booster.backward(loss, optimizer)
            loss_sum += loss.item()
        return loss_sum

    def clip_gradients(self, run: Run, max_norm: float) -> float | None:
        """Clip by the global gradient norm; returns that norm (None: takes_max_norm plugins clip inside optimizer.step)."""
        if self.takes_max_norm:
            return None
        return float(run.optimizer.clip_grad_by_norm(max_norm))

    def step(self, run: Run, max_norm: float) -> float | None:
        """Clip (max_norm > 0) and apply the update; returns the global gradient norm the clipping saw, else None."""
        norm = self.clip_gradients(run, max_norm) if max_norm > 0 else None
        from finetune.loss_scaling import precision_mixin

        mixin = precision_mixin(run.optimizer) if self.takes_max_norm else None
        scale = float(getattr(mixin, "loss_scale", 1.0))  # the step updates it: the norm was taken at this one
        run.optimizer.step()
        if self.takes_max_norm and max_norm > 0:
            norm = _unscaled_grad_norm(run.optimizer, mixin, scale)
        return norm

    def fingerprints(self, module) -> dict | None:
        """checks.fingerprints of this rank's parameters, taken before and after training; None where they cannot be read then."""
        from finetune import checks

        return checks.fingerprints(module)

    # --- evaluation -------------------------------------------------------------------------------

    def eval_forward(self, run: Run, output: str) -> Callable:
        """batch -> the summed loss ("loss") or the class logits ("logits") of the boosted model in eval mode."""
        from finetune.evaluation import module_batch_loss, module_logits

        return module_batch_loss(run.model) if output == "loss" else module_logits(run.model)

    # --- writing and reading (every rank calls these) ---------------------------------------------

    def write_model(self, run: Run, path: Path) -> None:
        """The weights in Hugging Face layout, or the adapter in peft layout; checkpoints and final/ alike."""
        import torch.distributed as dist

        from finetune import checkpoint

        if run.method.adapter:
            adapter = checkpoint.gathered_adapter_state(run.model.unwrap(unwrap_peft=False), run.layout.pipeline)
            if dist.get_rank() == 0:
                checkpoint.write_adapter_dir(adapter, run.lora_config, run.cfg.model.name, path)
        elif dist.get_rank() == 0:  # a full replica on every rank: HF's writer (safetensors, tied weights once)
            run.model.unwrap().save_pretrained(path, safe_serialization=True)

    def read_model(self, run: Run, path: Path) -> None:
        """Load what write_model wrote into this rank's model (and the optimizer's master copies)."""
        from finetune import checkpoint

        if run.method.adapter:
            self.load_adapter(run, checkpoint.read_adapter(path), "resume_from: the checkpoint's adapter")
        else:
            self.read_weights(run, path)

    def read_weights(self, run: Run, path: Path) -> None:
        """Full weights into every replica (tied weights were stored once), then into master copies."""
        from finetune import checkpoint

        checkpoint.load_replicated_model(run, path)

    def load_adapter(self, run: Run, adapter: dict, source: str) -> None:
        """Copy a full (unsplit) peft adapter into this rank's adapters; `source` names it in errors."""
        from finetune import checkpoint

        checkpoint.load_adapter(run, adapter, source)

    def write_optimizer(self, run: Run, path: Path) -> None:
        """The whole optimizer state by parameter name, as safetensors + JSON (never the Booster's
        optimizer IO: its loader unpickles metadata a checkpoint carries)."""
        from finetune import checkpoint

        checkpoint.save_optimizer(run, path)

    def read_optimizer(self, run: Run, path: Path) -> None:
        from finetune import checkpoint

        checkpoint.load_optimizer(run, path)


def _unscaled_grad_norm(optimizer, mixin, scale: float) -> float | None:
    """The norm a ColossalAI optimizer clipped by in its last step (get_grad_norm), less the fp16 loss `scale` it
    was taken at; inf on an fp16 overflow step, where the optimizer skipped the step and kept the last step's norm."""
    found_overflow = getattr(mixin, "found_overflow", None)  # fp16 only: bf16 neither scales nor overflows
    if found_overflow is not None and float(found_overflow) > 0:
        return float("inf")
    norm = optimizer.get_grad_norm()
    # Not get_grad_div_scale(): it asserts the grads are still scaled.
    return None if norm is None else float(norm) / scale


class TorchDDP(Plugin):
    name = "torch_ddp"
    short_name = "ddp"
    class_name = "TorchDDPPlugin"
    summary = "PyTorch DDP: a full replica per rank, gradients all-reduced. The simplest and most robust."
    options = {
        "broadcast_buffers": True,
        "bucket_cap_mb": 25,
        "find_unused_parameters": False,
        "gradient_as_bucket_view": False,
        "static_graph": False,
    }

    def setting_label(self, options: dict[str, Any], world_size: int, dp_size: int) -> str:
        return "single" if world_size == 1 else super().setting_label(options, world_size, dp_size)


class LowLevelZero(Plugin):
    name = "low_level_zero"
    class_name = "LowLevelZeroPlugin"
    summary = "ZeRO stage 1 (optimizer states sharded) or 2 (+ gradients sharded), optional CPU offload."
    options = {
        "stage": 1,
        "initial_scale": 2.0**16,  # fp16 loss scale start (2**32, ColossalAI's default, overflows for many steps)
        "reduce_bucket_size_in_m": 12,
        "overlap_communication": True,
        "cpu_offload": False,
        "master_weights": True,
    }
    # gloo cannot overlap communication on side streams (record_stream on a CPU tensor fails).
    cpu_options = {"overlap_communication": False}
    takes_precision = True
    takes_max_norm = True

    def problems(self, cfg: Config, world_size: int, has_cuda: bool) -> list[str]:
        return _choice_problem("stage", cfg.plugin.options["stage"], (1, 2))

    def setting_label(self, options: dict[str, Any], world_size: int, dp_size: int) -> str:
        return f"zero{options.get('stage', 1)} x{world_size}"

    def placement(self, cfg: Config, world_size: int):
        from finetune import estimate

        return estimate.zero_placement(cfg, world_size)

    def read_optimizer(self, run: Run, path: Path) -> None:
        """Each rank reads only its own part of every state tensor (any layout's full state by name)."""
        from finetune.parallel import zero

        zero.load_zero_optimizer(run, path)


NO_CUDA_TOOLKIT = ("plugin.name=gemini: ColossalAI's HybridAdam builds its CUDA kernels on first use and asserts the CUDA toolkit "
                   "(nvcc) exists, which this machine lacks; install the toolkit of torch's CUDA version and set CUDA_HOME")


DEFAULT_CUDA_HOME = Path("/usr/local/cuda")  # torch's last guess


def cuda_toolkit() -> str:
    """Where the CUDA toolkit is, found as torch.utils.cpp_extension finds CUDA_HOME (which ColossalAI's kernel loader asserts); '' if nowhere."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if not home and nvcc:
        home = str(Path(nvcc).resolve().parent.parent)
    if not home and DEFAULT_CUDA_HOME.is_dir():
        home = str(DEFAULT_CUDA_HOME)
    return home if home and Path(home).is_dir() else ""


class Gemini(Plugin):
    name = "gemini"
    short_name = "gemini"
    class_name = "GeminiPlugin"
    summary = "Gemini: chunked ZeRO-3 with heterogeneous (GPU/CPU) placement and offload fractions. CUDA only."
    options = {
        "placement_policy": "static",
        "shard_param_frac": 1.0,
        "offload_optim_frac": 0.0,
        "offload_param_frac": 0.0,
        "warmup_non_model_data_ratio": 0.8,
        "steady_cuda_cap_ratio": 0.9,
        "initial_scale": 2.0**16,
        "pin_memory": False,
    }
    choices = {"placement_policy": ("static", "auto")}
    runs_on_cpu = False
    supports_lora = False
    qlora_refusal = "Gemini manages parameters in floating-point chunks"
    # Its checkpoints are full and by name too, but its reader (ColossalAI's, strict) is untested on
    # other layouts' files: e.g. FSDP's weights list tied embeddings twice, which a strict load refuses.
    resume_layout_refusal = "Gemini runs on CUDA only and no test covers its reading of another layout's checkpoint yet"
    takes_precision = True
    takes_max_norm = True
    replicated = False
    model_init = "lazy"  # as ColossalAI's own examples build models for Gemini

    def problems(self, cfg: Config, world_size: int, has_cuda: bool) -> list[str]:
        problems = []
        if cfg.train.precision not in ("bf16", "fp16"):  # GeminiPlugin asserts it: its chunks are half precision
            problems.append(f"train.precision={cfg.train.precision}: Gemini trains in bf16 or fp16 only (fp32 master copies); set train.precision=bf16")
        if cfg.train.optimizer != "adamw":  # GeminiOptimizer asserts FusedAdam, CPUAdam or HybridAdam
            problems.append(f"train.optimizer={cfg.train.optimizer}: Gemini steps with ColossalAI's HybridAdam only; set train.optimizer=adamw")
        if has_cuda and not cuda_toolkit():
            problems.append(NO_CUDA_TOOLKIT)
        return problems

    def placement(self, cfg: Config, world_size: int):
        from finetune import estimate

        return estimate.gemini_placement(cfg, world_size)

    def fingerprints(self, module) -> dict | None:
        """None: after a forward Gemini frees its chunks' storage and the parameters stay views into it, so
        reading them is undefined (several ranks); summary.json's checks say the comparison was skipped."""
        return None

    def build_optimizer(self, params: list, cfg: Config):
        """Gemini places optimizer states on GPU or CPU by chunk: ColossalAI's HybridAdam steps either (AdamW
        semantics; GeminiOptimizer takes no other, so problems() refuses train.optimizer=sgd)."""
        from colossalai.nn.optimizer import HybridAdam

        return HybridAdam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, adamw_mode=True)

    def load_deferred(self, run: Run, pending) -> None:
        """ColossalAI's own loader into Gemini's chunks, as its examples do (booster.load_model), given the
        safetensors file or index only (it would torch.load anything else). Reads a whole weight file at a time."""
        from finetune import checkpoint

        checkpoint.check_weight_files(pending.path, "model.name")
        index = pending.path / "model.safetensors.index.json"
        run.booster.load_model(run.model, str(index if index.is_file() else pending.path / "model.safetensors"), strict=False)

    def write_model(self, run: Run, path: Path) -> None:
        """Sharded weights: every rank takes part in gathering them into HF layout."""
        _write_sharded_model(run, path)

    def read_weights(self, run: Run, path: Path) -> None:
        _read_sharded_model(run, path)


def _write_sharded_model(run: Run, path: Path) -> None:
    """Every rank takes part in the Booster's gathering of sharded weights into HF layout; rank 0 adds config.json."""
    import torch.distributed as dist

    run.booster.save_model(run.model, str(path), shard=True, use_safetensors=True)
    if dist.get_rank() == 0:
        run.model.unwrap().config.save_pretrained(path)


def _read_sharded_model(run: Run, path: Path) -> None:
    """The Booster's sharded weights reader, once the index names only safetensors files (it would torch.load others)."""
    from finetune import checkpoint

    checkpoint.check_weight_files(path)
    run.booster.load_model(run.model, str(path))


def _fsdp_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy

    kwargs = dict(options)
    precision = kwargs.pop("precision")
    kwargs.pop("auto_wrap")  # ours: applied as an auto_wrap_policy by TorchFSDP.before_boost
    kwargs["sharding_strategy"] = ShardingStrategy[kwargs["sharding_strategy"]]
    kwargs["backward_prefetch"] = BackwardPrefetch[kwargs["backward_prefetch"]]
    kwargs["cpu_offload"] = CPUOffload(offload_params=kwargs["cpu_offload"])
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if half is not None:  # half-precision compute and communication, fp32 sharded master weights
        # Every unit casts its inputs too: peft casts a LoRA layer's input to its (fp32, unsharded view)
        # weight dtype, which the unit's bf16 compute copy would not match.
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=half, reduce_dtype=half, buffer_dtype=half, cast_forward_inputs=True)
    return kwargs


class TorchFSDP(Plugin):
    """PyTorch FSDP. ColossalAI's FSDP checkpoint IO gathers with offload_to_cpu=True, which fails on a
    CPU-only machine in torch 2.5.1 (size-0 storages, then a hang): weights and optimizer go through
    torch's full-state-dict APIs here (finetune.checkpoint's fsdp_* functions)."""

    name = "torch_fsdp"
    short_name = "fsdp"
    class_name = "TorchFSDPPlugin"
    summary = "PyTorch FSDP: parameters, gradients and optimizer states sharded (ZeRO-3 style), optional CPU offload."
    options = {
        "sharding_strategy": "FULL_SHARD",
        "backward_prefetch": "BACKWARD_PRE",
        "cpu_offload": False,
        "sync_module_states": False,
        # Full fine-tuning: "block" makes every transformer block (the model's _no_split_modules) its
        # own FSDP unit, so one block is gathered at a time; "none" gathers the whole model for compute.
        # (LoRA always wraps per adapted layer and block, peft's policy.)
        "auto_wrap": "block",
    }
    choices = {
        "sharding_strategy": ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"),
        "backward_prefetch": ("BACKWARD_PRE", "BACKWARD_POST"),
        "auto_wrap": ("block", "none"),
    }
    takes_precision = True  # turned into FSDP MixedPrecision by constructor_kwargs
    replicated = False
    model_init = "meta"  # FSDP materializes each unit (param_init_fn): from the checkpoint, see before_boost
    qlora_refusal = "FSDP flattens each unit's parameters into one tensor of one floating dtype; 4/8-bit weights are integer tensors"

    def constructor_kwargs(self, options: dict[str, Any], precision: str, max_grad_norm: float, on_cpu: bool) -> dict[str, Any]:
        return _fsdp_kwargs(super().constructor_kwargs(options, precision, max_grad_norm, on_cpu))

    def placement(self, cfg: Config, world_size: int):
        from finetune import estimate

        return estimate.fsdp_placement(cfg, world_size)

    def apply_adapters(self, model, lora_config, booster, plugin):
        """ColossalAI's FSDP plugin refuses LoRA; peft + FSDP's wrap policy (a unit per adapted layer) work."""
        from peft import get_peft_model
        from peft.utils.other import fsdp_auto_wrap_policy

        model = get_peft_model(model, lora_config)
        plugin.fsdp_kwargs["auto_wrap_policy"] = fsdp_auto_wrap_policy(model)
        return model

    def before_boost(self, cfg: Config, model, plugin, pending=None) -> None:
        """Full fine-tuning with auto_wrap=block: a unit per transformer block (LoRA got peft's policy in apply_adapters).
        A model built on the meta device gets each unit's weights from the checkpoint as FSDP wraps it."""
        if pending is not None:
            from finetune.checkpoint.files import WeightsDir
            from finetune.parallel import fsdp

            plugin.fsdp_kwargs["param_init_fn"] = fsdp.fsdp_param_init_fn(model, WeightsDir(pending.path), pending.names)
        if plugin.fsdp_kwargs.get("auto_wrap_policy") is not None or cfg.plugin.options["auto_wrap"] != "block":
            return
        import functools

        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        names = set(getattr(model, "_no_split_modules", None) or [])
        blocks = {type(m) for m in model.modules() if type(m).__name__ in names}
        if blocks:
            plugin.fsdp_kwargs["auto_wrap_policy"] = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=blocks)

    def load_deferred(self, run: Run, pending) -> None:
        """Nothing left to read: FSDP filled each unit from the checkpoint while wrapping it (before_boost)."""
        run.booster.plugin.fsdp_kwargs.pop("param_init_fn", None)

    def after_boost(self, cfg: Config, optimizer, scheduler, device):
        """The scheduled lr put back, and fp16 loss scaling (FSDP's MixedPrecision casts, it does not scale)."""
        # ColossalAI's FSDP plugin re-creates the optimizer's param groups over the FSDP parameters,
        # dropping the lr the scheduler had set (0 during warmup): put the scheduled lr back.
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        if cfg.train.precision == "fp16":
            from finetune.loss_scaling import loss_scaled

            return loss_scaled(optimizer, device, sharded=True)
        return optimizer

    def build_optimizer(self, params: list, cfg: Config):
        """As every plugin's, but under fp16 AdamW steps one tensor at a time without the fused kernel: torch 2.5's
        ShardedGradScaler hands a fused optimizer a found_inf of shape [1], which its kernel cannot subtract from
        the 0-dim step counts (RuntimeError at the first step, on CUDA as on CPU)."""
        if cfg.train.precision == "fp16" and cfg.train.optimizer == "adamw":
            import torch

            return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=False)
        return super().build_optimizer(params, cfg)

    def clip_gradients(self, run: Run, max_norm: float) -> float | None:
        from finetune.loss_scaling import unscale

        unscale(run.optimizer)  # FSDP's clip must see the unscaled gradients
        return float(run.model.module.clip_grad_norm_(max_norm))  # FSDP's own: the norm over all shards

    def write_model(self, run: Run, path: Path) -> None:
        """Gather the full state dict on rank 0; write it with HF's writer, or its adapter in peft layout."""
        import torch.distributed as dist

        from finetune import checkpoint
        from finetune.parallel import fsdp

        state = fsdp.fsdp_full_state_dict(run.model.module)
        if dist.get_rank() != 0:
            return
        if run.method.adapter:
            checkpoint.write_adapter_dir(fsdp.fsdp_adapter_state(run, state), run.lora_config, run.cfg.model.name, path)
        else:
            fsdp.fsdp_inner_module(run).save_pretrained(path, state_dict=state, safe_serialization=True)

    def read_weights(self, run: Run, path: Path) -> None:
        from finetune.parallel import fsdp

        fsdp.load_fsdp_model(run, path)

    def load_adapter(self, run: Run, adapter: dict, source: str) -> None:
        from finetune.parallel import fsdp

        with fsdp.fsdp_full_state(run.model.module, rank0_only=False):
            fsdp.load_fsdp_adapter(run, adapter, source)

    def write_optimizer(self, run: Run, path: Path) -> None:
        from finetune.parallel import fsdp

        fsdp.save_fsdp_optimizer(run, path)

    def read_optimizer(self, run: Run, path: Path) -> None:
        from finetune.parallel import fsdp

        fsdp.load_fsdp_optimizer(run, path)


@contextlib.contextmanager
def _colossalai_errors_only():
    """Silence ColossalAI's warnings in a block (its logger writes a warning as two records, caller and text)."""
    logger = logging.getLogger("colossalai")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class HybridParallel(Plugin):
    name = "hybrid_parallel"
    class_name = "HybridParallelPlugin"
    summary = "Tensor (tp_size) x pipeline (pp_size) x data parallel, with optional ZeRO-1 (zero_stage)."
    options = {
        "tp_size": 1,
        "pp_size": 1,
        "zero_stage": 0,
        "num_microbatches": 0,
        "microbatch_size": 0,
        "pp_style": "1f1b",
        "num_model_chunks": 1,
        "overlap_p2p": True,
        # Batches are padded to their longest sample, so tensor shapes change between steps; the
        # pipeline's p2p metadata cache assumes they do not (gloo then fails on a size mismatch).
        "enable_metadata_cache": True,
        "enable_flash_attention": False,
        "enable_fused_normalization": False,
        "enable_sequence_parallelism": False,
        "sequence_parallelism_mode": "",
        "make_vocab_size_divisible_by": 64,
        "initial_scale": 2.0**16,
        "overlap_communication": True,
    }
    choices = {"pp_style": ("1f1b", "interleaved")}
    # gloo: no side-stream overlap (as ZeRO), and overlapped p2p hangs the interleaved schedule.
    cpu_options = {"overlap_communication": False, "overlap_p2p": False}
    takes_precision = True
    takes_max_norm = True
    replicated = False
    model_init = "lazy"  # shardformer materializes only the layers (and TP slices) this rank holds
    shardformer = True

    def problems(self, cfg: Config, world_size: int, has_cuda: bool) -> list[str]:
        from finetune.config import hybrid_problems

        return hybrid_problems(cfg, self.plan(cfg.plugin.options, cfg.train.batch_size, world_size), world_size, has_cuda)

    def setting_label(self, options: dict[str, Any], world_size: int, dp_size: int) -> str:
        parts = [f"tp{options['tp_size']}"] if options.get("tp_size", 1) > 1 else []
        if options.get("pp_size", 1) > 1:
            parts.append(f"pp{options['pp_size']} {options.get('pp_style', '1f1b')}")
        if options.get("zero_stage"):
            parts.append(f"zero{options['zero_stage']}")
        if dp_size > 1:
            parts.append(f"dp{dp_size}")
        return " ".join(parts) or "hybrid"

    def plan(self, options: dict[str, Any], batch_size: int, world_size: int) -> Plan:
        tp, pp = options["tp_size"], options["pp_size"]
        micro = options["num_microbatches"] or (batch_size // options["microbatch_size"] if options["microbatch_size"] else 0)
        return Plan(tp=tp, pp=pp, dp=max(1, world_size // max(1, tp * pp)), num_microbatches=micro if pp > 1 else 1, chunks=options["num_model_chunks"])

    def constructor_kwargs(self, options: dict[str, Any], precision: str, max_grad_norm: float, on_cpu: bool) -> dict[str, Any]:
        kwargs = super().constructor_kwargs(options, precision, max_grad_norm, on_cpu)
        for key in ("num_microbatches", "microbatch_size", "sequence_parallelism_mode"):
            kwargs[key] = kwargs[key] or None  # 0 / "" in YAML: let ColossalAI decide
        if kwargs["pp_size"] > 1 and kwargs["tp_size"] == 1:
            # ColossalAI 0.5.0 cannot save a pipeline checkpoint whose vocabulary was padded without
            # tensor parallelism ('_unpad_detach' missing); padding only matters for TP anyway.
            kwargs["make_vocab_size_divisible_by"] = 1
        return kwargs

    def placement(self, cfg: Config, world_size: int):
        from finetune import estimate

        return estimate.hybrid_placement(cfg, world_size)

    def shard_policy(self, cfg: Config, model):
        """RoBERTa has no ColossalAI policy: ours. LoRA with tensor parallelism wraps the model's policy
        (ours or ColossalAI's) so each adapter is sharded with the layer it adapts."""
        from finetune import roberta_policy  # imports ColossalAI's shardformer
        from finetune.lora_tp import lora_policy
        from finetune.methods import method_named

        own = roberta_policy.shard_policy(model)
        if not method_named(cfg.method).adapter or cfg.plugin.options["tp_size"] == 1:
            return own
        return lora_policy(model, own)

    def apply_adapters(self, model, lora_config, booster, plugin):
        # enable_lora's PeftModel wrapper hides the model from ColossalAI's pipeline policies, and it
        # refuses tensor parallelism: adapters are injected, then sharded by finetune.lora_tp.
        from finetune.model import inject_lora

        return inject_lora(model, lora_config)

    def layout(self, plugin) -> Layout:
        import torch.distributed as dist

        last_stage = plugin.stage_manager is None or plugin.stage_manager.is_last_stage(ignore_chunk=True)
        return Layout(
            dp_rank=dist.get_rank(plugin.dp_group),
            dp_size=plugin.dp_size,
            pipeline=plugin.pp_size > 1,
            counts=last_stage and dist.get_rank(plugin.tp_group) == 0,
            replicated=False,
        )

    def forward_backward(self, run: Run, micro_batches: list[dict]) -> float:
        if not run.layout.pipeline:
            return super().forward_backward(run, micro_batches)
        loss_sum = 0.0
        for batch in micro_batches:  # micro-batching happens inside the pipeline schedule
            out = run.booster.execute_pipeline(iter([batch]), run.model, criterion=lambda outputs, _: outputs.loss, optimizer=run.optimizer, return_loss=True)
            loss_sum += out["loss"].item() if out["loss"] is not None else 0.0  # the loss exists on the last stage
        return loss_sum

    def eval_forward(self, run: Run, output: str) -> Callable:
        """Under a pipeline the batch goes through the schedule; loss and logits exist on the last stage only."""
        if not run.layout.pipeline:
            return super().eval_forward(run, output)
        import torch

        from finetune.evaluation import summed_loss

        def batch_loss(batch: dict) -> torch.Tensor:
            out = self._eval_pass(run, batch, summed_loss)
            if out["loss"] is None:  # not the last stage
                return torch.zeros((), device=run.device)
            return out["loss"] * run.plan.num_microbatches  # the schedule averages over micro-batches

        def batch_logits(batch: dict):
            # The loss is not used (computed from the logits instead): an all-filler micro-batch makes it NaN.
            # ColossalAI warns on every such call that kept outputs cost memory (one eval batch here).
            with _colossalai_errors_only():
                out = self._eval_pass(run, batch, lambda outputs, _: outputs.loss, return_outputs=True)
            return out["outputs"]["logits"] if out["outputs"] is not None else None

        return batch_loss if output == "loss" else batch_logits

    @staticmethod
    def _eval_pass(run: Run, batch: dict, criterion, return_outputs: bool = False) -> dict:
        """One batch through the pipeline schedule without training."""
        import torch

        if run.cfg.plugin.options["pp_style"] == "interleaved":
            # ColossalAI 0.5.0's forward-only interleaved pass hangs on gloo; its training pass does
            # not. Evaluate through the training pass (the model is in eval mode), then drop the grads.
            with torch.enable_grad():
                out = run.booster.execute_pipeline(iter([batch]), run.model, criterion=criterion, optimizer=run.optimizer, return_loss=True, return_outputs=return_outputs)
            run.optimizer.zero_grad()
            return out
        return run.booster.execute_pipeline(iter([batch]), run.model, criterion=criterion, optimizer=None, return_loss=True, return_outputs=return_outputs)

    def write_model(self, run: Run, path: Path) -> None:
        """Adapters: every split gathered and every stage's share collected, written in peft layout; full: the Booster's sharded save."""
        if run.method.adapter:
            super().write_model(run, path)
        else:
            _write_sharded_model(run, path)

    def read_weights(self, run: Run, path: Path) -> None:
        """Any layout's full weights by name; each rank reads only the tensors it holds, then keeps its split."""
        from finetune.parallel import hybrid

        hybrid.load_split_model(run, path)

    def load_deferred(self, run: Run, pending) -> None:
        """The pretrained weights by the reader a resume uses (each rank only its rows of what it holds), every
        name of a tied weight tried, then the optimizer's master copies."""
        from finetune.parallel import hybrid

        hybrid.load_split_model(run, pending.path, "model.name", pending.names)

    def write_optimizer(self, run: Run, path: Path) -> None:
        """The optimizer state as every plugin writes it (full tensors by parameter name), one file per pipeline
        stage, written by its tensor-parallel rank 0 of data-parallel rank 0. Not ColossalAI's hybrid optimizer
        checkpoint: in 0.5.0 it cannot gather the states of a vocabulary padded for tensor parallelism."""
        import torch.distributed as dist

        from finetune.parallel import hybrid

        plugin = run.booster.plugin
        writes = dist.get_rank(plugin.dp_group) == 0 and dist.get_rank(plugin.tp_group) == 0
        hybrid.save_split_optimizer(run, path, writes, stage=plugin.stage_manager.stage if plugin.stage_manager else 0)

    def read_optimizer(self, run: Run, path: Path) -> None:
        from finetune.parallel import hybrid

        hybrid.load_split_optimizer(run, path)


PLUGINS: dict[str, Plugin] = {p.name: p for p in (TorchDDP(), LowLevelZero(), Gemini(), TorchFSDP(), HybridParallel())}


def register(plugin: Plugin) -> Plugin:
    """Add (or replace) a plugin in the registry; returns it."""
    PLUGINS[plugin.name] = plugin
    return plugin


def plugin_kwargs(name: str, options: dict[str, Any], precision: str, max_grad_norm: float, on_cpu: bool) -> dict[str, Any]:
    """Constructor arguments for the named plugin: defaults, the user's options, then what we must set."""
    plugin = PLUGINS[name]
    return plugin.constructor_kwargs({**plugin.options, **options}, precision, max_grad_norm, on_cpu)


def build_booster(name: str, options: dict[str, Any], precision: str, max_grad_norm: float, custom_policy=None):
    """Build the ColossalAI Booster for a plugin setup (the process group must already exist).

    Args:
        custom_policy: a shardformer policy to shard the model with (None: ColossalAI's own).

    Returns:
        (booster, the ColossalAI plugin)
    """
    # Imported here, not at module level: importing colossalai costs 10-20 s on a small CPU machine.
    import torch
    from colossalai.booster import Booster
    from colossalai.booster import plugin as plugins

    spec = PLUGINS[name]
    kwargs = plugin_kwargs(name, options, precision, max_grad_norm, on_cpu=not torch.cuda.is_available())
    if custom_policy is not None:
        kwargs["custom_policy"] = custom_policy
    plugin = getattr(plugins, spec.class_name)(**kwargs)
    # No Booster mixed_precision: where the plugin does not own precision, the training step autocasts and
    # the optimizer scales fp16 losses (Plugin.after_boost).
    return Booster(plugin=plugin), plugin
