"""Task `instruction`: Alpaca records {instruction, input?, output}; loss on the response (output + EOS)."""

from __future__ import annotations

from finetune.tasks.base import PromptResponseTask, text_field

ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class InstructionTask(PromptResponseTask):
    name = "instruction"
    reference_field = "output"
    fields = "{instruction, input?, output}"

    def check(self, row: dict, where: str) -> dict:
        return {
            "instruction": text_field(row, "instruction", where),
            "input": text_field(row, "input", where, required=False),
            "output": text_field(row, "output", where),
        }

    def group_key(self, record: dict) -> tuple[str, str]:
        return record["instruction"], record["input"]

    def user_message(self, record: dict) -> str:
        return record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")

    def plain_prompt(self, record: dict) -> str:
        return (ALPACA_PROMPT_WITH_INPUT if record["input"] else ALPACA_PROMPT).format(**record)

    def prompt_text(self, record: dict) -> str:
        return self.user_message(record)

    def reference(self, record: dict) -> str:
        return record["output"]
