"""Will it fit? The run's predicted peak against the memory available, and the cheapest changes that make it
fit (train.fit_check before a launch, `python -m finetune.estimate --fit GiB`)."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config import Config, ConfigError, build_config, flatten, parse_args, to_dict, validate
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

    def describe(self) -> str:
        """'train.gradient_checkpointing=true (14.60 GiB)'."""
        return f"{' '.join(self.overrides)} ({gib(self.peak_bytes)} GiB)"


def with_overrides(cfg: Config, overrides: tuple[str, ...]) -> Config:
    """cfg with `key=value` / `--config file` overrides applied; a new plugin drops the old one's options."""
    settings = parse_args(list(overrides))
    tree = to_dict(cfg)
    if any(key == "plugin.name" for _, key, _ in settings):
        del tree["plugin"]
    return build_config([("fit check", key, value) for key, value in flatten(tree).items()] + settings)


def _candidate_changes(cfg: Config, world_size: int) -> list[tuple[tuple[str, ...], float]]:
    """(overrides, cost) of each change worth trying. Costs rank what a user gives up: recomputing the
    forward (checkpointing, 1), a halved micro-batch (1 per halving, same global batch), sharding over
    the same ranks (each plugin's fit_alternatives: zero2 2, fsdp 2, tp 3: more communication), and the method (qlora 4: another model)."""
    train = cfg.train
    singles: list[tuple[tuple[str, ...], float]] = []
    micro, halvings = train.batch_size // 2, 1
    while micro >= 1:
        if train.batch_size % micro == 0:
            singles.append(((f"train.batch_size={micro}", f"train.grad_accum_steps={train.grad_accum_steps * train.batch_size // micro}"), halvings))
        micro, halvings = micro // 2, halvings + 1
    if world_size > 1:
        singles += [change for spec in SPECS.values() for change in spec.fit_alternatives(world_size)]
    method = method_named(cfg.method)
    if method.adapter and not method.quantized_base:
        singles.append((("method=qlora",), 4))
    if train.gradient_checkpointing:
        return singles
    checkpointing = ("train.gradient_checkpointing=true",)
    return [(checkpointing, 1)] + singles + [(checkpointing + overrides, 1 + cost) for overrides, cost in singles]


def fitting_alternatives(cfg: Config, world_size: int, available_bytes: float, device: str = "cuda", seq_len: int = 0) -> list[Alternative]:
    """The changes to cfg whose predicted per-rank peak fits in available_bytes, cheapest first (then
    lowest peak). Of the micro-batch halvings only the largest micro-batch that fits is kept, and a
    combination is left out when a part of it fits alone."""
    fitting: list[Alternative] = []
    for overrides, cost in _candidate_changes(cfg, world_size):
        try:
            changed = with_overrides(cfg, overrides)
        except ConfigError:
            continue
        problems = [p for p in validate(changed, world_size, has_cuda=device == "cuda") if not p.startswith(ignored_problems())]
        if problems or to_dict(changed) == to_dict(cfg):
            continue  # a change the run cannot take, or what it already has
        peak = estimate(changed, world_size, seq_len, device, quantization_of(changed)).total()
        if peak <= available_bytes:
            fitting.append(Alternative(overrides, cost, peak))
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
    changes = "; ".join(a.describe() for a in alternatives) if alternatives else "none of checkpointing, a smaller micro-batch, qlora or sharding over these ranks fits"
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
        lines.append("changes that fit, cheapest first (predicted peak per rank):" if alternatives else "no change tried fits (checkpointing, micro-batch, qlora, zero2/fsdp/tp)")
        lines += [f"  {i}. {' '.join(a.overrides):<72} {gib(a.peak_bytes):>8} GiB" for i, a in enumerate(alternatives, 1)]
    return "\n".join(lines)
