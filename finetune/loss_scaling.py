"""fp16 loss scaling for the plugins that leave it to us: TorchDDP (torch's GradScaler) and FSDP (its ShardedGradScaler).

ColossalAI's `Booster(mixed_precision="fp16")` would wrap the model in `TorchAMPModule` and the optimizer in
`TorchAMPOptimizer`, and in 0.5.0 that breaks three things the training step uses: its
`clip_grad_by_norm` returns None (booster/mixed_precision/fp16_torch.py), `TorchDDPPlugin.no_sync` asserts
the model is a `TorchDDPModel` (not the AMP module around it), and `TorchAMPModule.unwrap()` drops
`unwrap_peft=False`. So the model stays the plugin's, the step autocasts, and the optimizer carries the scaler.
"""

from __future__ import annotations

import torch
from colossalai.interface import OptimizerWrapper

INITIAL_SCALE = 2.0**16  # torch's and ColossalAI's default


class LossScaledOptimizer(OptimizerWrapper):
    """An optimizer whose backward scales the loss, whose clipping sees unscaled gradients and returns their
    norm, and whose step is skipped (scale halved) when a gradient overflowed."""

    def __init__(self, optim: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        super().__init__(optim)
        self.scaler = scaler
        self._unscaled = False  # GradScaler refuses a second unscale_ in one step

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        super().backward(self.scaler.scale(loss), *args, **kwargs)

    def unscale_grad(self) -> None:
        """Divide the gradients by the loss scale (once a step), recording whether any overflowed."""
        if not self._unscaled:
            self.scaler.unscale_(self.optim)
            self._unscaled = True

    def clip_grad_by_norm(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, *args, **kwargs) -> torch.Tensor:
        """Clip the unscaled gradients; returns their global norm (inf on an overflow step, which step() skips)."""
        self.unscale_grad()
        return super().clip_grad_by_norm(max_norm, norm_type, error_if_nonfinite, *args, **kwargs)

    def step(self, *args, **kwargs):
        """Apply the update unless a gradient overflowed, then adapt the scale."""
        out = self.scaler.step(self.optim, *args, **kwargs)
        self.scaler.update()
        self._unscaled = False
        return out

    def loss_scale(self) -> float:
        """The scale the next backward multiplies the loss by."""
        return float(self.scaler.get_scale())


def loss_scaled(optimizer: OptimizerWrapper, device: torch.device, sharded: bool = False) -> LossScaledOptimizer:
    """The boosted optimizer with fp16 loss scaling; `sharded`: FSDP's scaler (overflow agreed across ranks)."""
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device.type, init_scale=INITIAL_SCALE)
    else:
        scaler = torch.amp.GradScaler(device.type, init_scale=INITIAL_SCALE)
    return LossScaledOptimizer(optimizer.optim, scaler)


def unscale(optimizer: OptimizerWrapper) -> None:
    """Unscale the gradients before a clip the optimizer does not do itself (FSDP's); nothing without loss scaling."""
    if isinstance(optimizer, LossScaledOptimizer):
        optimizer.unscale_grad()


def precision_mixin(optimizer):
    """A ColossalAI optimizer's mixed-precision mixin (None: fp32); each family names it differently (ZeRO, Gemini, hybrid's naive AMP)."""
    names = ("mixed_precision_mixin", "mix_precision_mixin", "mixed_precision")
    return next((m for m in (getattr(optimizer, n, None) for n in names) if m is not None), None)


def loss_scale_state(optimizer) -> dict | None:
    """The fp16 loss scale and the good steps counted towards its next growth, as plain data (a checkpoint's
    loss_scale.json, readable by every plugin's scaler); None where nothing scales the loss."""
    if isinstance(optimizer, LossScaledOptimizer):
        state = optimizer.scaler.state_dict()
        return {"scale": float(state["scale"]), "good_steps": int(state.get("_growth_tracker", 0))}
    scaler = getattr(precision_mixin(optimizer), "grad_scaler", None)  # ColossalAI's DynamicGradScaler (fp16 only)
    if scaler is None:
        return None
    return {"scale": float(scaler.scale.item()), "good_steps": int(scaler._growth_step)}


def load_loss_scale_state(optimizer, state: dict) -> bool:
    """Continue from a checkpoint's loss scale (loss_scale_state's format, already checked); False where nothing scales the loss."""
    if isinstance(optimizer, LossScaledOptimizer):
        full = optimizer.scaler.state_dict()
        optimizer.scaler.load_state_dict({**full, "scale": state["scale"], "_growth_tracker": state["good_steps"]})
        return True
    scaler = getattr(precision_mixin(optimizer), "grad_scaler", None)
    if scaler is None:
        return False
    scaler._scale.fill_(state["scale"])
    scaler._growth_step, scaler._hysteresis_step = state["good_steps"], 0
    return True
