"""A plugin at run time: how adapters are applied, how a step's forward/backward and clipping run, how an eval
batch is scored, and how the model and optimizer are written and read (one writer for checkpoints and final/).

train.py, the checkpoint store and the evaluation ask the run's plugin; none of them tests a plugin name. The
declaration each runtime subclasses (options, problems, plan, placement) is torch-free, in finetune.core.plugins.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from finetune.checkpoint import files, model_state
from finetune.checkpoint.model_state import TrainState, gathered_adapter_state, load_replicated_model, write_adapter_dir
from finetune.checkpoint.optimizer_state import load_optimizer, save_optimizer
from finetune.core.layout import Layout
from finetune.core.plugins.base import PluginSpec

if TYPE_CHECKING:
    from finetune.config import Config
    from finetune.quantization import WeightBytes
    from finetune.run import Run


class Plugin(PluginSpec):
    """A replicated data-parallel plugin at run time (TorchDDP); subclasses override what they do differently."""

    def constructor_kwargs(self, options: dict[str, Any], precision: str, max_grad_norm: float, on_cpu: bool) -> dict[str, Any]:
        """The plugin class's arguments: the options, what CPU forces, and what we must set."""
        kwargs = {**options, **(self.cpu_options if on_cpu else {})}
        if self.takes_precision:
            kwargs["precision"] = precision
        if self.takes_max_norm:
            kwargs["max_norm"] = max_grad_norm
        return kwargs

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
            with booster.no_sync(model, optimizer) if defer else contextlib.nullcontext(), run.saved_activations:
                with autocast:
                    loss = (run.objective.loss(batch) if run.objective else model(**model_inputs(batch)).loss) / len(micro_batches)
                booster.backward(loss, optimizer)
            loss_sum += loss.item()
        return loss_sum

    def row_logps(self, run: Run) -> Callable | None:
        """batch -> each row's summed log-probability of its label tokens under the boosted model (attach_reference),
        where the model's own forward cannot give them; None: it can (finetune.preference.model_logps)."""
        return None

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
            norm = unscaled_grad_norm(run.optimizer, mixin, scale)
        return norm

    def held_weight_bytes(self, state: TrainState) -> WeightBytes | None:
        """What this rank holds of the model's weights once boosted, where a plugin shards them; None: the model as built."""
        return None

    def fingerprints(self, module) -> dict | None:
        """checks.fingerprints of this rank's parameters, taken before and after training; None where they cannot be read then."""
        from finetune import checks

        return checks.fingerprints(module)

    def eval_forward(self, run: Run, output: str) -> Callable:
        """batch -> the summed loss ("loss"), the class logits ("logits") or the pair metric sums ("pairs") of the boosted model in eval mode."""
        from finetune.evaluation import module_eval_forward

        return module_eval_forward(run.model, output, run.objective)

    # Checkpoint IO: what a checkpoint and final/ hold, written and read through a TrainState (model, optimizer,
    # and how they were built), never the whole Run, so a round trip runs in-process on its own.

    def write_model(self, state: TrainState, path: Path) -> None:
        """The weights in Hugging Face layout, or the adapter in peft layout; checkpoints and final/ alike."""
        import torch.distributed as dist

        if state.adapter:
            adapter = gathered_adapter_state(state.model.unwrap(unwrap_peft=False), state.layout.pipeline)
            if dist.get_rank() == 0:
                write_adapter_dir(adapter, state.lora_config, state.base_model, path)
        elif dist.get_rank() == 0:  # a full replica on every rank: HF's writer (safetensors, tied weights once)
            state.model.unwrap().save_pretrained(path, safe_serialization=True)

    def read_model(self, state: TrainState, path: Path) -> None:
        """Load what write_model wrote into this rank's model (and the optimizer's master copies)."""
        if state.adapter:
            self.load_adapter(state, files.read_adapter(path), "resume_from: the checkpoint's adapter")
        else:
            self.read_weights(state, path)

    def read_weights(self, state: TrainState, path: Path) -> None:
        """Full weights into every replica (tied weights were stored once), then into master copies."""
        load_replicated_model(state, path)

    def load_adapter(self, state: TrainState, adapter: dict, source: str) -> None:
        """Copy a full (unsplit) peft adapter into this rank's adapters; `source` names it in errors."""
        model_state.load_adapter(state, adapter, source)

    def write_optimizer(self, state: TrainState, path: Path) -> None:
        """The whole optimizer state by parameter name, as safetensors + JSON (never the Booster's
        optimizer IO: its loader unpickles metadata a checkpoint carries)."""
        save_optimizer(state, path)

    def read_optimizer(self, state: TrainState, path: Path) -> None:
        """What write_optimizer wrote (or any layout's optimizer state by name) into this rank's optimizer."""
        load_optimizer(state, path)


def unscaled_grad_norm(optimizer, mixin, scale: float) -> float | None:
    """The norm a ColossalAI optimizer clipped by in its last step (get_grad_norm), less the fp16 loss `scale` it
    was taken at; inf on an fp16 overflow step, where the optimizer skipped the step and kept the last step's norm."""
    found_overflow = getattr(mixin, "found_overflow", None)  # fp16 only: bf16 neither scales nor overflows
    if found_overflow is not None and float(found_overflow) > 0:
        return float("inf")
    norm = optimizer.get_grad_norm()
    # Not get_grad_div_scale(): it asserts the grads are still scaled.
    return None if norm is None else float(norm) / scale


def write_sharded_model(state: TrainState, path: Path) -> None:
    """Every rank takes part in the Booster's gathering of sharded weights into HF layout; rank 0 adds config.json."""
    import torch.distributed as dist

    state.booster.save_model(state.model, str(path), shard=True, use_safetensors=True)
    if dist.get_rank() == 0:
        state.model.unwrap().config.save_pretrained(path)
