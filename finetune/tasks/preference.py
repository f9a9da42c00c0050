"""Task `preference`: pairs {prompt, chosen, rejected} (plain text) or {messages, chosen, rejected} (chat template).

A sample is a pair: the prompt's tokens followed by the chosen reply, and the same prompt followed by the
rejected reply, each labelled -100 on the prompt (the loss looks at reply tokens only). A plain prompt is
tokenized as written and each reply gets EOS; a chat prompt is the conversation rendered with the
tokenizer's chat template and its generation prompt, and a reply is what the template renders for it as
the next assistant turn (its end-of-turn token included). Prompts too long for data.max_length keep their
end; the reply must fit with at least one prompt token before it (so every reply token is predicted), and
a pair whose longer reply does not is dropped and counted. Collation keeps a pair's two sequences
side by side (finetune.data.collate), so they always share a batch.
"""

from __future__ import annotations

from finetune.tasks.base import IGNORE_INDEX, DataError, LanguageModelingTask, text_field
from finetune.tasks.chat import DEFAULT_CHAT_TEMPLATE, checked_messages
from finetune.tasks.objectives import BRADLEY_TERRY, OBJECTIVES, Objective

REJECTED = "rejected_"  # the prefix of a pair sample's rejected sequence keys (rejected_input_ids, rejected_labels)
REWARD_HEAD = "reward"  # the name of a reward model's one output (its config's id2label)


class PreferenceTask(LanguageModelingTask):
    name = "preference"
    pairs = True
    sequences_per_sample = 2  # chosen and rejected, side by side
    keeps_end = ("prompt", "messages")
    fields = "{prompt, chosen, rejected} or {messages: [{role, content}, ...], chosen, rejected}"
    eval_output = "pairs"

    @classmethod
    def objective(cls, settings) -> Objective:
        """The objective this task trains with, from the `preference` config section."""
        return OBJECTIVES[settings.loss]

    def check(self, row: dict, where: str) -> dict:
        if "messages" in row:
            messages = checked_messages(row, where)
            if messages[-1]["role"] != "user":
                raise DataError(f"{where}: the conversation must end with a user message (chosen and rejected are the competing assistant replies to it)")
            if next(m["role"] for m in messages if m["role"] != "system") != "user":
                raise DataError(f"{where}: the conversation must open with a user message (after any system message)")
            prompt = {"messages": messages}
        else:
            prompt = {"prompt": text_field(row, "prompt", where)}
        chosen, rejected = text_field(row, "chosen", where), text_field(row, "rejected", where)
        if chosen == rejected:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' are the same text, so the pair prefers nothing")
        return {**prompt, "chosen": chosen, "rejected": rejected}

    def group_key(self, record: dict) -> str:
        return self.prompt_text(record)

    def prepare_tokenizer(self, tokenizer) -> None:
        if not tokenizer.chat_template:  # chat records need one; plain prompts never use it
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE

    def prompt_ids(self, tokenizer, record: dict) -> list[int]:
        if "messages" in record:
            return tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True)
        return tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]

    def reply_ids(self, tokenizer, record: dict, reply: str, prompt: list[int]) -> list[int]:
        """The tokens of a reply after the prompt: as the chat template renders the assistant turn, or the text and EOS."""
        if "messages" not in record:
            return tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        full = tokenizer.apply_chat_template([*record["messages"], {"role": "assistant", "content": reply}])
        if full[: len(prompt)] != prompt:
            raise DataError("the tokenizer's chat template does not render the reply as a continuation of the conversation, so the reply tokens cannot be masked exactly")
        return full[len(prompt) :]

    def tokenize(self, tokenizer, record: dict, max_length: int) -> tuple[dict | None, int]:
        """(pair sample, or None when the longer reply alone leaves no room for a prompt token; the pair's full length)."""
        prompt = self.prompt_ids(tokenizer, record)
        chosen, rejected = (self.reply_ids(tokenizer, record, record[key], prompt) for key in ("chosen", "rejected"))
        longest = max(len(chosen), len(rejected))
        if longest >= max_length:
            return None, len(prompt) + longest
        kept = prompt[-(max_length - longest) :]  # the prompt's end: what the reply answers
        sample = {}
        for prefix, reply in (("", chosen), (REJECTED, rejected)):
            sample[f"{prefix}input_ids"] = kept + reply
            sample[f"{prefix}labels"] = [IGNORE_INDEX] * len(kept) + reply
        return sample, len(prompt) + longest

    def prompt_text(self, record: dict) -> str:
        if "messages" in record:
            return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])
        return record["prompt"]

    def reference(self, record: dict) -> str:
        return record["chosen"]


class RewardTask(PreferenceTask):
    """Task `reward`: the pairs of task=preference train a reward model, a sequence classifier with one output.

    A sequence's score is that output at its last token that is not the pad token (transformers' sequence-
    classification pooling, which finds it by the model config's pad_token_id); the loss is Bradley-Terry's
    -log sigmoid(score(chosen) - score(rejected)). A reward model does not generate.
    """

    name = "reward"
    scalar_head = True
    auto_model = "AutoModelForSequenceClassification"

    @classmethod
    def objective(cls, settings) -> Objective:
        return BRADLEY_TERRY

    @property
    def labels_or_none(self) -> list[str]:
        return [REWARD_HEAD]

    def generation_prompts(self, records: list[dict], count: int) -> list[dict]:
        return []
