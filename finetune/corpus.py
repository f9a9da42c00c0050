"""The offline chatterbot corpus (PyPI `chatterbot-corpus`, BSD): one YAML file per topic, each with
`categories` and `conversations` (lists of turns), read in three shapes, each named as a data.train_path:

    chatterbot-corpus         instruction pairs: consecutive turns as {instruction, output}, unique
    chatterbot-corpus:chat    chat: each conversation as alternating user / assistant messages, unique
    chatterbot-corpus:topics  classification: each conversation's turns as text, its topic file as label
    chatterbot-corpus:preference  preference pairs: a turn's own reply chosen, a reply from another topic rejected
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


def _turn_pairs() -> dict[tuple[str, str], str]:
    """Consecutive turns as unique (prompt, reply) pairs, in first-seen order, each with its topic."""
    pairs: dict[tuple[str, str], str] = {}
    for topic, turns in _topic_conversations():
        for prompt, reply in zip(turns, turns[1:]):
            if prompt and reply:
                pairs.setdefault((prompt, reply), topic)
    return pairs


def instruction_records() -> list[dict]:
    """Consecutive turns as unique instruction/output pairs."""
    return [{"instruction": p, "input": "", "output": r} for p, r in _turn_pairs()]


def preference_records() -> list[dict]:
    """Each unique (prompt, reply) pair with its reply chosen and an off-topic reply rejected: the reply at a fixed
    stride through the replies of the other topics, so the pairs are the same on every machine and rank."""
    pairs = _turn_pairs()
    replies: dict[str, list[str]] = {}
    for (_, reply), topic in pairs.items():
        replies.setdefault(topic, []).append(reply)
    off_topic = {topic: [r for other, rs in replies.items() if other != topic for r in rs] for topic in replies}
    records = []
    for i, ((prompt, reply), topic) in enumerate(pairs.items()):
        others = [r for r in off_topic[topic] if r != reply]  # a short reply ("Yes.") can be found under two topics
        if others:
            records.append({"prompt": prompt, "chosen": reply, "rejected": others[(i * 7919) % len(others)]})
    return records


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
    loaders = {CHATTERBOT: instruction_records, f"{CHATTERBOT}:chat": chat_records, f"{CHATTERBOT}:topics": topic_records, f"{CHATTERBOT}:preference": preference_records}
    return loaders[name]()
