"""Task `summarization`: SAMSum records {dialogue, summary} (an `id` or any other field is ignored); loss on the summary."""

from __future__ import annotations

from finetune.tasks.base import PromptResponseTask, text_field

INSTRUCTION = "Summarize the following dialogue."
PLAIN_PROMPT = INSTRUCTION + "\n\n### Dialogue:\n{dialogue}\n\n### Summary:\n"


class SummarizationTask(PromptResponseTask):
    name = "summarization"
    reference_field = "summary"
    fields = "{dialogue, summary}"

    def check(self, row: dict, where: str) -> dict:
        return {"dialogue": text_field(row, "dialogue", where), "summary": text_field(row, "summary", where)}

    def group_key(self, record: dict) -> str:
        return record["dialogue"]

    def user_message(self, record: dict) -> str:
        return f"{INSTRUCTION}\n\n{record['dialogue']}"

    def plain_prompt(self, record: dict) -> str:
        return PLAIN_PROMPT.format(dialogue=record["dialogue"])

    def prompt_text(self, record: dict) -> str:
        return record["dialogue"]

    def reference(self, record: dict) -> str:
        return record["summary"]
