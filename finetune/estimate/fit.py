"""Will it fit? The run's predicted peak against the memory available, and the cheapest changes that make it
fit (train.fit_check before a launch, `python -m finetune.estimate --fit GiB`)."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config import Config, ConfigError, build_config, flatten, parse_args, to_dict, validate
from finetune.core.loss_chunks import OFF
from finetune.core.plugins import SPECS
from finetune.estimate.memory import estimate, gib, quantization_of
from finetune.methods import method_named


# Problems of finetune.config.validate that do not concern an estimate, each with why:
IGNORED_PROBLEMS = (
    "model.name:",  # the estimator resolves the model itself, and also reads a bare config.json
    "data.train_path: file not found",  # no data is read: the estimate may be made far from the data
    "data.eval_path: file not found",
)


def ignored_problems() -> tuple[str, ...]:
    """The starts of validation lines the estimator ignores: IGNORED_PROBLEMS and every plugin's machine_problems."""
    return IGNORED_PROBLEMS + tuple(line for spec in SPECS.values() for line in spec.machine_problems)



@dataclass(frozen=True)
class Alternative:
    """A change to the run (config overrides a user can paste) and its predicted peak per rank."""

    overrides: tuple[str, ...]
    cost: float  # how much the change costs the run: lower first (see fitting_alternatives)
    peak_bytes: int
    reason: str = ""  # why the change carries a setting it would not be expected to (PluginSpec.required_overrides)

    def describe(self) -> str:
        """'train.gradient_checkpointing=true (14.60 GiB)', and the reason where the change has one."""
        return f"{' '.join(self.overrides)} ({gib(self.peak_bytes)} GiB{'; ' + self.reason if self.reason else ''})"


def with_overrides(cfg: Config, overrides: tuple[str, ...]) -> Config:
    """cfg with `key=value` / `--config file` overrides applied; a new plugin drops the old one's options."""
    settings = parse_args(list(overrides))
    tree = to_dict(cfg)
    if any(key == "plugin.name" for _, key, _ in settings):
        del tree["plugin"]
    return build_config([("fit check", key, value) for key, value in flatten(tree).items()] + settings)


# What each change costs the run, in rough multiples of a step's time (lower is tried first); a combination costs
# the sum of its parts. The plugins' own switches carry theirs (fit_alternatives: zero2 2, fsdp 2, tp 3: more
# communication).
LOSS_CHUNKS_COST = 0.1  # the head recomputed per chunk in backward: a few per cent of a step (~free)
CHECKPOINTING_COST = 1.0  # every layer's forward run again in backward: ~1/3 more compute
# Activation offload is bound by the host link (PCIe, ~25 GB/s): without checkpointing every saved tensor crosses
# it twice (Llama-3.1-8B LoRA, 2 x 2048 tokens: ~25 GiB each way, ~2 s a step, as long as the step's compute on a
# 4090), which overlap hides only in part; with checkpointing only each layer's input crosses (1 GiB), mostly hidden.
ACTIVATION_OFFLOAD_COST = 2.0
ACTIVATION_OFFLOAD_CHECKPOINTED_COST = 0.25
HALVING_COST = 1.0  # per halving of the micro-batch, same global batch: smaller matmuls, more passes
STATE_OFFLOAD_COST = 3.0  # the optimizer step on the CPU (and, under FSDP, the parameters over PCIe every pass)
QLORA_COST = 4.0  # another model: a 4-bit base, dequantized at every matmul
TRIED = "checkpointing, activation offload, the chunked loss, a smaller micro-batch, CPU offload, qlora, sharding over these ranks"


def _activation_changes(cfg: Config, device: str) -> list[tuple[tuple[str, ...], float]]:
    """(overrides, cost) of the ways to hold fewer activations that cfg does not use yet: checkpointing, and on CUDA
    activation offload (on CPU the host is the device: it frees nothing), alone or together."""
    train = cfg.train
    checkpointing, offload = ("train.gradient_checkpointing=true",), ("train.activation_offload=true",)
    changes = [] if train.gradient_checkpointing else [(checkpointing, CHECKPOINTING_COST)]
    if device == "cuda" and not train.activation_offload:
        changes.append((offload, ACTIVATION_OFFLOAD_CHECKPOINTED_COST if train.gradient_checkpointing else ACTIVATION_OFFLOAD_COST))
        if not train.gradient_checkpointing:
            changes.append((checkpointing + offload, CHECKPOINTING_COST + ACTIVATION_OFFLOAD_CHECKPOINTED_COST))
    return changes


def _candidate_changes(cfg: Config, world_size: int, device: str = "cuda") -> list[tuple[tuple[str, ...], float]]:
    """(overrides, cost) of each change worth trying (costs above): the chunked loss where it is off, a halved
    micro-batch, the optimizer states (and parameters) in host memory where the plugin can, sharding over the same
    ranks, qlora, and those sharded with qlora (FSDP-QLoRA) or offloaded; each alone and with each of the ways to
    hold fewer activations (_activation_changes)."""
    train, method = cfg.train, method_named(cfg.method)
    qlora = (("method=qlora",), QLORA_COST) if method.adapter and not method.quantized_base else None
    singles: list[tuple[tuple[str, ...], float]] = []
    if train.loss_chunks == OFF:
        singles.append((("train.loss_chunks=auto",), LOSS_CHUNKS_COST))
    micro, halvings = train.batch_size // 2, 1
    while micro >= 1:
        if train.batch_size % micro == 0:
            singles.append(((f"train.batch_size={micro}", f"train.grad_accum_steps={train.grad_accum_steps * train.batch_size // micro}"), halvings * HALVING_COST))
        micro, halvings = micro // 2, halvings + 1
    layouts = [(SPECS[cfg.plugin.name], (), 0.0)]  # the plugin as configured, then each switch to one that shards over these ranks
    layouts += [(spec, overrides, cost) for spec in SPECS.values() for overrides, cost in spec.fit_alternatives(world_size)] if world_size > 1 else []
    for spec, overrides, cost in layouts:
        offloaded = [(overrides + spec.state_offload, cost + STATE_OFFLOAD_COST)] if spec.state_offload else []
        with_qlora = [(o + qlora[0], c + qlora[1]) for o, c in [(overrides, cost), *offloaded]] if qlora else []
        singles += ([(overrides, cost)] if overrides else []) + offloaded + with_qlora
    activations = _activation_changes(cfg, device)
    return activations + singles + [(a + overrides, a_cost + cost) for a, a_cost in activations for overrides, cost in singles]


def fitting_alternatives(cfg: Config, world_size: int, available_bytes: float, device: str = "cuda", seq_len: int = 0) -> list[Alternative]:
    """The changes to cfg whose predicted per-rank peak fits in available_bytes, cheapest first (then
    lowest peak). Of the micro-batch halvings only the largest micro-batch that fits is kept, and a
    combination is left out when a part of it fits alone."""
    fitting: list[Alternative] = []
    for overrides, cost in _candidate_changes(cfg, world_size, device):
        try:
            changed = with_overrides(cfg, overrides)
            required, reason = SPECS[changed.plugin.name].required_overrides(changed)  # e.g. what QLoRA under TP needs
            if required:
                overrides = overrides + required
                changed = with_overrides(cfg, overrides)
        except ConfigError:
            continue
        problems = [p for p in validate(changed, world_size, has_cuda=device == "cuda") if not p.startswith(ignored_problems())]
        if problems or to_dict(changed) == to_dict(cfg):
            continue  # a change the run cannot take, or what it already has
        peak = estimate(changed, world_size, seq_len, device, quantization_of(changed)).total()
        if peak <= available_bytes:
            fitting.append(Alternative(overrides, cost, peak, reason))
    fitting.sort(key=lambda a: (a.cost, a.peak_bytes))
    kept: list[Alternative] = []
    for alt in fitting:
        kind = [o.split("=")[0] for o in alt.overrides]
        if all([o.split("=")[0] for o in k.overrides] != kind and not set(k.overrides) <= set(alt.overrides) for k in kept):
            kept.append(alt)
    return kept


def fit_check_line(cfg: Config, world_size: int, available_bytes: float, device: str = "cuda", seq_len: int = 0) -> str | None:
    """None when the run's predicted per-rank peak fits in available_bytes; else the one line that says
    by how much it does not and the three cheapest changes that fit, each with its predicted peak."""
    peak = estimate(cfg, world_size, seq_len, device, quantization_of(cfg)).total()
    if peak <= available_bytes:
        return None
    alternatives = fitting_alternatives(cfg, world_size, available_bytes, device, seq_len)[:3]
    changes = "; ".join(a.describe() for a in alternatives) if alternatives else f"none of {TRIED} fits"
    return (
        f"predicted peak {gib(peak)} GiB per rank does not fit the {gib(available_bytes)} GiB available on {device}; "
        f"changes that fit: {changes} (train.fit_check=warn or off to launch anyway)"
    )


def format_fit(cfg: Config, world_size: int, available_bytes: float, device: str, seq_len: int) -> str:
    """--fit: the verdict for the run as configured, then every change that fits, ranked."""
    peak = estimate(cfg, world_size, seq_len, device, quantization_of(cfg)).total()
    verdict = "fits" if peak <= available_bytes else "does not fit"
    lines = [f"as configured: {gib(peak)} GiB per rank, {verdict} in {gib(available_bytes)} GiB"]
    if peak > available_bytes:
        alternatives = fitting_alternatives(cfg, world_size, available_bytes, device, seq_len)
        lines.append("changes that fit, cheapest first (predicted peak per rank):" if alternatives else f"no change tried fits ({TRIED})")
        lines += [f"  {i}. {' '.join(a.overrides):<72} {gib(a.peak_bytes):>8} GiB{'  (' + a.reason + ')' if a.reason else ''}" for i, a in enumerate(alternatives, 1)]
    return "\n".join(lines)
