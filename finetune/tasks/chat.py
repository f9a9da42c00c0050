"""Task `chat`: records {messages: [{role, content}, ...]} in the tokenizer's chat template; loss on assistant turns.

Each assistant turn is labelled with exactly the tokens the template renders for it (content and its
end-of-turn token); everything else (system, user turns, role headers) is -100. The turns are found by
rendering the conversation one assistant turn at a time, which needs a template that renders a
conversation's start as a prefix of the whole (the common templates do; a template that does not is
refused). A tokenizer without a chat template gets DEFAULT_CHAT_TEMPLATE, saved with the model.
"""

from __future__ import annotations

import json

from finetune.errors import shown
from finetune.tasks.base import IGNORE_INDEX, DataError, LanguageModelingTask

ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\n\n' }}{% endif -%}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ ('\n\n' if messages else '') + '### Assistant:\n' }}{% endif -%}"
)


def _messages(row: dict, where: str) -> list:
    value = row.get("messages")
    if value is None:
        raise DataError(f"{where}: missing field 'messages'")
    if isinstance(value, str):  # CSV cannot nest: a JSON string of the list is accepted there
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field 'messages' is a string but not a JSON list of {{role, content}} messages") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'messages' must be a list of {{role, content}} messages, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: field 'messages' is empty")
    return value


def checked_messages(row: dict, where: str) -> list[dict]:
    """The row's `messages` as clean {role, content} dicts: a non-empty list, known roles, non-blank string contents."""
    messages = []
    for i, message in enumerate(_messages(row, where), start=1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {i} must be a {{role, content}} object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {shown(role)}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} field 'content' must be a string, got {type(content).__name__}")
        if not content.strip():
            raise DataError(f"{where}: message {i} field 'content' is empty")
        messages.append({"role": role, "content": content})
    return messages


class ChatTask(LanguageModelingTask):
    name = "chat"
    fields = "{messages: [{role, content}, ...]}"

    def check(self, row: dict, where: str) -> dict:
        messages = checked_messages(row, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing to train on")
        if next(m["role"] for m in messages if m["role"] != "system") != "user":
            raise DataError(f"{where}: the conversation must open with a user message (after any system message)")
        return {"messages": messages}

    def group_key(self, record: dict) -> str:
        return next(m["content"] for m in record["messages"] if m["role"] != "system")

    def prepare_tokenizer(self, tokenizer) -> None:
        if not tokenizer.chat_template:
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE

    def token_labels(self, tokenizer, record: dict) -> tuple[list[int], list[int]]:
        messages = record["messages"]
        ids: list[int] = []
        labels: list[int] = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:turn], add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: turn + 1])
            if prompt[: len(ids)] != ids or full[: len(prompt)] != prompt:
                raise DataError(f"the tokenizer's chat template does not render message {turn + 1}'s conversation as a continuation of the earlier turns, so assistant turns cannot be masked exactly")
            labels += [IGNORE_INDEX] * (len(prompt) - len(ids)) + full[len(prompt) :]
            ids = full
        return ids, labels

    def prompt_ids(self, tokenizer, record: dict) -> list[int]:
        return tokenizer.apply_chat_template(self._before_last_answer(record), add_generation_prompt=True)

    def prompt_text(self, record: dict) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in self._before_last_answer(record))

    def reference(self, record: dict) -> str:
        return record["messages"][self._last_answer(record)]["content"]

    @staticmethod
    def _last_answer(record: dict) -> int:
        return max(i for i, m in enumerate(record["messages"]) if m["role"] == "assistant")

    def _before_last_answer(self, record: dict) -> list[dict]:
        return record["messages"][: self._last_answer(record)]
