"""A shardformer policy for RobertaForSequenceClassification (ColossalAI 0.5.0 ships BERT policies only).

HybridParallelPlugin shards a model by its class name; for RoBERTa it finds no policy, so we pass
this one as the plugin's `custom_policy` (train.py asks `shard_policy(model)` which one to use).

Where RoBERTa agrees with BERT, BERT's policy is reused as it is: the encoder layers have the same
modules under the same attribute names (attention.self.query/key/value, attention.output.dense,
intermediate.dense, output.dense, the LayerNorms and dropouts), so tensor parallelism splits them
the same way (q/k/v and intermediate column-wise, the two output projections row-wise, heads divided
by tp_size) and the pipeline runs BERT's stage forward (BertPipelineForwards.bert_model_forward) on
the RobertaModel. BertPolicy keys its replacements by BERT classes; we re-key them to the RoBERTa
classes of the same role (BertLayer -> RobertaLayer, ...).

Where they differ:
- Embeddings: RobertaEmbeddings numbers positions from padding_idx + 1 and skips pad tokens
  (create_position_ids_from_input_ids), where BERT counts 0..n-1. Nothing to shard there, but the
  position ids must be made from the input ids on the first stage: the stage forward passes
  position_ids=None, so RobertaEmbeddings' own forward makes them (never BERT's arange). Under TP
  the word embeddings become VocabParallelEmbedding1D (padding_idx 1 kept), as BERT's.
- No pooler: RobertaForSequenceClassification builds RobertaModel(add_pooling_layer=False), so the
  last stage holds no `roberta.pooler` (BERT's policy would hold `bert.pooler` there).
- The head: RobertaClassificationHead (dense -> tanh -> out_proj, on the <s> token's hidden state)
  replaces BERT's pooler + dropout + classifier. It is small and stays whole (replicated) on every
  tensor-parallel rank of the last pipeline stage; its input is replicated across those ranks, so
  its dropout draws one mask for all of them (DropoutForReplicatedInput). The classification loss
  (HF's rule: regression / single-label / multi-label by problem_type) is computed there too, so
  loss and logits exist on the last stage only.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.roberta import modeling_roberta

import colossalai.shardformer.layer as col_nn
from colossalai.shardformer.modeling.bert import BertPipelineForwards
from colossalai.shardformer.policies.base_policy import ModulePolicyDescription, SubModuleReplacementDescription
from colossalai.shardformer.policies.bert import BertPolicy


def roberta_class(bert_class: type) -> type:
    """The RoBERTa module class that plays the role of a BERT one (BertLayer -> RobertaLayer)."""
    return getattr(modeling_roberta, bert_class.__name__.replace("Bert", "Roberta", 1))


class RobertaForSequenceClassificationPolicy(BertPolicy):
    """Tensor and pipeline parallelism for RobertaForSequenceClassification."""

    def module_policy(self) -> Dict[type, ModulePolicyDescription]:
        policy = {roberta_class(cls): description for cls, description in super().module_policy().items()}
        if self.shard_config.enable_tensor_parallelism:
            self.append_or_create_submodule_replacement(
                description=[SubModuleReplacementDescription(suffix="dropout", target_module=col_nn.DropoutForReplicatedInput)],
                policy=policy,
                target_key=modeling_roberta.RobertaClassificationHead,
            )
        if self.pipeline_stage_manager is not None:
            self.set_pipeline_forward(modeling_roberta.RobertaForSequenceClassification, roberta_for_sequence_classification_forward, policy)
        return policy

    def set_pipeline_forward(self, model_cls: type, new_forward, policy: Dict) -> None:
        """BERT's, with the encoder found at model.roberta (BERT's reads model.bert)."""
        stage_manager = self.pipeline_stage_manager
        layers_per_stage = stage_manager.distribute_layers(len(self.model.roberta.encoder.layer))
        kwargs = {"stage_manager": stage_manager, "shard_config": self.shard_config}
        if stage_manager.is_interleave:  # the interleaved schedule passes each chunk's stage_index itself
            stage_manager.stage_indices = stage_manager.get_stage_index(layers_per_stage)
        else:
            kwargs["stage_index"] = stage_manager.get_stage_index(layers_per_stage)

        def forward(module, *args, **inputs):
            return new_forward(module, *args, **inputs, **kwargs)

        self.append_or_create_method_replacement(description={"forward": forward}, policy=policy, target_key=model_cls)

    def get_held_layers(self) -> List[nn.Module]:
        """This stage's modules: embeddings on the first, its share of encoder layers, the head on the last."""
        stage_manager = self.pipeline_stage_manager
        roberta = self.model.roberta
        layers_per_stage = stage_manager.distribute_layers(len(roberta.encoder.layer))
        indices = stage_manager.get_stage_index(layers_per_stage)
        held = [roberta.embeddings] if stage_manager.is_first_stage(ignore_chunk=True) else []
        for start, end in indices if stage_manager.is_interleave else [indices]:
            held.extend(roberta.encoder.layer[start:end])
        if stage_manager.is_last_stage(ignore_chunk=True):
            held.append(self.model.classifier)  # no pooler in RobertaForSequenceClassification
        return held

    def get_shared_params(self) -> List[Dict[int, torch.Tensor]]:
        return []  # no weights tied across stages (the head is not tied to the embeddings)


def roberta_for_sequence_classification_forward(
    self: modeling_roberta.RobertaForSequenceClassification,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    hidden_states: torch.Tensor | None = None,
    stage_manager=None,
    stage_index: List[int] | None = None,
    shard_config=None,
):
    """One pipeline stage of RobertaForSequenceClassification: BERT's encoder stage, then the head and loss on the last."""
    outputs = BertPipelineForwards.bert_model_forward(
        self.roberta,
        input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        head_mask=head_mask,
        inputs_embeds=inputs_embeds,
        return_dict=True,
        hidden_states=hidden_states,
        stage_manager=stage_manager,
        stage_index=stage_index,
        shard_config=shard_config,
    )
    if not stage_manager.is_last_stage():
        return outputs  # {"hidden_states": ...} for the next stage
    logits = self.classifier(outputs.last_hidden_state)
    loss = classification_loss(self.config, logits, labels) if labels is not None else None
    return SequenceClassifierOutput(loss=loss, logits=logits)


def classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """RobertaForSequenceClassification's loss: regression, single- or multi-label by config.problem_type."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return MSELoss()(logits.squeeze(), labels.squeeze()) if config.num_labels == 1 else MSELoss()(logits, labels)
    if config.problem_type == "single_label_classification":
        return CrossEntropyLoss()(logits.view(-1, config.num_labels), labels.view(-1))
    return BCEWithLogitsLoss()(logits, labels)


def shard_policy(model: nn.Module):
    """Our shardformer policy for this model, or None to let ColossalAI pick its own.

    LoRA under pipeline parallelism injects adapters in place (finetune.model.inject_lora), so the
    model keeps its class; a PeftModel wrapper is looked through.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base, modeling_roberta.RobertaForSequenceClassification):
        return RobertaForSequenceClassificationPolicy()
    return None
