"""A plugin's declaration: what users may set, what it refuses, the layout it derives and where its memory goes.

Config validation and the estimator read these records and fail in a second: no torch, no ColossalAI. The
runtime strategy of each plugin (finetune.parallel) subclasses its declaration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune.core.layout import Placement, Plan, half_precision

if TYPE_CHECKING:
    from finetune.config import Config


def choice_problem(key: str, value: Any, allowed: tuple) -> list[str]:
    """A problem line when plugin option `key` is not one of `allowed`."""
    return [] if value in allowed else [f"plugin.{key}: must be {' or '.join(map(str, allowed))}, got {value!r}"]


class PluginSpec:
    """A replicated data-parallel plugin (TorchDDP); subclasses override what they declare differently."""

    name = ""
    short_name = ""  # in report labels
    class_name = ""  # attribute of colossalai.booster.plugin
    summary = ""
    options: dict[str, Any] = {}  # user-settable constructor arguments and their defaults (which fix their types)
    choices: dict[str, tuple[str, ...]] = {}  # the options whose values are names, with the names each takes (config.validate checks them)
    renamed_options: dict[str, str] = {}  # former option -> what replaces it (a config naming it is refused with this pointer)
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
    # Why this plugin keeps the model's own loss over the full logits (train.loss_chunks, finetune.chunked_loss);
    # empty: the chunked loss runs inside the plugin's forward and is exact there.
    loss_chunks_refusal = ""
    # How a pretrained model is built for this plugin (finetune.deferred): "eager" (every rank loads the
    # whole model), "lazy" (ColossalAI's LazyInitContext: boost materializes this rank's shard, then
    # load_deferred reads its weights) or "meta" (the plugin materializes each unit from the checkpoint).
    model_init = "eager"
    # The same for a frozen base under LoRA/QLoRA (Method.model_init decides between the two): "lazy" where peft's
    # adapters are injected beside lazy weights and sharded with them; "eager" where the plugin cannot (FSDP's meta build).
    adapter_model_init = "eager"
    # Problems of the machine's toolchain, not of the setup's memory: the estimator ignores lines starting so.
    machine_problems: tuple[str, ...] = ()
    # Overrides of this plugin's options that put its optimizer states (and, where it can, parameters) in host memory,
    # for the estimator's fit search; empty: it cannot.
    state_offload: tuple[str, ...] = ()

    def problems(self, cfg: Config, world_size: int, has_cuda: bool) -> list[str]:
        """What this plugin cannot do with cfg, each a line naming the fix."""
        return []

    def unchunked_pair_problems(self, cfg: Config, why_unchunked: str) -> list[str]:
        """What a preference task cannot do under this plugin when its log-probabilities would come from the full logits
        (`why_unchunked`: why the chunked loss is off, '' where the config turned it off); none where the full logits serve."""
        return []

    def loss_chunks_refused(self, options: dict[str, Any]) -> str:
        """Why this plugin, with these options, keeps the model's own loss over the full logits; '' where the chunked loss is exact."""
        return self.loss_chunks_refusal

    def quantized_storage(self, cfg: Config) -> str | None:
        """The float dtype (fp32, bf16, fp16) a quantized base must be held in under this plugin, packed 4-bit data
        included (bitsandbytes' quant_storage); None: bitsandbytes' uint8 packing, unquantized weights in float32."""
        return None

    def required_overrides(self, cfg: Config) -> tuple[tuple[str, ...], str]:
        """Settings a change to this plugin must carry that the config would not otherwise have, and why (the fit search
        adds them to its proposal); none by default."""
        return (), ""

    def quantizes_shards(self, cfg: Config) -> bool:
        """Whether each rank quantizes its own shards of a full-precision model (QLoRA under tensor parallelism) instead
        of every rank loading the model quantized."""
        return False

    def plan(self, options: dict[str, Any], batch_size: int, world_size: int) -> Plan:
        """The layout numbers for these (effective) options."""
        return Plan(dp=world_size)

    def setting_label(self, options: dict[str, Any], world_size: int, dp_size: int) -> str:
        """The setup in a few characters for reports, e.g. 'ddp x2'."""
        return f"{self.short_name} x{world_size}"

    def placement(self, cfg: Config, world_size: int) -> Placement:
        """Where weights, gradients and states live, for finetune.estimate: a full fp32 replica; bf16/fp16 is
        autocast in the training step."""
        compute = 2 if half_precision(cfg) else 4
        return Placement(dp=world_size, compute_bytes=compute, autocast_copies=half_precision(cfg), grad_copies=1 if cfg.plugin.options["gradient_as_bucket_view"] else 2)

    def fit_alternatives(self, world_size: int) -> list[tuple[tuple[str, ...], float]]:
        """(overrides, cost) that switch a config that does not fit to this plugin, for the estimator's fit search
        (costs: finetune.estimate); none by default."""
        return []
