"""Gemini at run time: HybridAdam, ColossalAI's loader into its chunks, and the Booster's sharded weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from finetune.checkpoint.files import check_weight_files
from finetune.checkpoint.model_state import TrainState
from finetune.core.plugins.gemini import GeminiSpec
from finetune.parallel.base import Plugin, write_sharded_model

if TYPE_CHECKING:
    from finetune.config import Config
    from finetune.run import Run


class Gemini(GeminiSpec, Plugin):
    """Gemini at run time."""

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
        check_weight_files(pending.path, "model.name")
        index = pending.path / "model.safetensors.index.json"
        run.booster.load_model(run.model, str(index if index.is_file() else pending.path / "model.safetensors"), strict=False)

    def write_model(self, state: TrainState, path: Path) -> None:
        """Sharded weights: every rank takes part in gathering them into HF layout."""
        write_sharded_model(state, path)

    def read_weights(self, state: TrainState, path: Path) -> None:
        """The Booster's sharded weights reader, once the index names only safetensors files (it would torch.load others)."""
        check_weight_files(path)
        state.booster.load_model(state.model, str(path))
