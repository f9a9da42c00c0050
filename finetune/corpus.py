"""The offline chatterbot corpus (PyPI `chatterbot-corpus`, BSD): one YAML file per topic, each with
`categories` and `conversations` (lists of turns), read in three shapes, each named as a data.train_path:

    chatterbot-corpus         instruction pairs: consecutive turns as {instruction, output}, unique
    chatterbot-corpus:chat    chat: each conversation as alternating user / assistant messages, unique
    chatterbot-corpus:topics  classification: each conversation's turns as text, its topic file as label
"""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune import assets
from finetune.config import CHATTERBOT


def _topic_conversations() -> list[tuple[str, list[str]]]:
    """(topic, stripped turns) of every English conversation, topic = the YAML file's name."""
    english = assets.package_file("chatterbot_corpus", "data/english")
    found = []
    for path in sorted(english.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text()).get("conversations", []):
            if not isinstance(conversation, list):  # one trivia.yml entry is a bare string
                continue
            found.append((Path(path).stem, [str(t).strip() for t in conversation]))
    return found


def instruction_records() -> list[dict]:
    """Consecutive turns as unique instruction/output pairs."""
    pairs: dict[tuple[str, str], None] = {}  # dict keeps first-seen order and drops duplicates
    for _, turns in _topic_conversations():
        for prompt, reply in zip(turns, turns[1:]):
            if prompt and reply:
                pairs[(prompt, reply)] = None
    return [{"instruction": p, "input": "", "output": r} for p, r in pairs]


def chat_records() -> list[dict]:
    """Conversations of two or more turns as unique user/assistant message lists."""
    conversations = (tuple(t for t in turns if t) for _, turns in _topic_conversations())
    unique = {turns: None for turns in conversations if len(turns) >= 2}
    return [{"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]} for turns in unique]


def topic_records() -> list[dict]:
    """Each conversation (turns joined by newlines) labelled with its topic; texts found under two topics keep the first."""
    texts: dict[str, str] = {}
    for topic, turns in _topic_conversations():
        if any(turns):
            texts.setdefault("\n".join(t for t in turns if t), topic)
    return [{"text": text, "label": topic} for text, topic in texts.items()]


def builtin_records(name: str) -> list[dict]:
    """The raw rows of a built-in source (checked by the task like a file's rows)."""
    loaders = {CHATTERBOT: instruction_records, f"{CHATTERBOT}:chat": chat_records, f"{CHATTERBOT}:topics": topic_records}
    return loaders[name]()
