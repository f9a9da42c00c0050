"""Chat with a trained model in the terminal, its answer streamed as it is generated.

    python -m finetune.chat outputs/run1
    python -m finetune.chat smollm2-135m-instruct --system "You answer in one sentence." --temperature 0.3

RUN is anything finetune.inference loads (an adapter stays unmerged). With a chat template (the run's own,
the chat task's default for chat runs, an instruct model's) the conversation is sent in it, --system first;
without one (a base model) the session is plain text that the model continues: --system, then each message
and answer so far, then the new message. Commands: /reset forgets the conversation, /exit (or Ctrl-D) quits. When the
conversation and --max-new-tokens no longer fit the model's context, the oldest turns are dropped, with a notice.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Callable

from finetune.errors import run_command
from finetune.generate import non_negative, positive, probability
from finetune.export_source import add_opt_in_arguments, opt_in_flags
from finetune.inference import Loaded, check_generates, chat_ids, load, open_source

PROMPT = ">>> "


def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune.chat", description=__doc__.split("\n")[0])
    parser.add_argument("source", metavar="RUN", help="a run dir, its final/, a checkpoint dir, or a model name")
    parser.add_argument("--system", default="", help="a system prompt (the first message; plain completion: the opening line)")
    parser.add_argument("--max-new-tokens", type=positive, default=256, help="tokens per answer at most (default 256)")
    parser.add_argument("--temperature", type=non_negative, default=0.7, help="0: greedy; above 0: sampled (default 0.7)")
    parser.add_argument("--top-p", type=probability, default=0.9, help="nucleus sampling mass, in (0, 1] (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed of the session (default 0)")
    add_opt_in_arguments(parser)
    return parser.parse_args(argv)


class Session:
    """One conversation: its turns, the prompt they make (trimmed to the context), and answers streamed to `write`."""

    def __init__(self, loaded: Loaded, args: argparse.Namespace, write: Callable[[str], None]) -> None:
        self.loaded, self.args, self.write = loaded, args, write
        self.templated = bool(loaded.tokenizer.chat_template)
        self.turns: list[tuple[str, str]] = []  # (message, answer)

    def prompt(self, message: str) -> list[int] | None:
        """The prompt for `message` after the turns that still fit beside --max-new-tokens; None: the message alone does not fit."""
        room = self.loaded.context_window - self.args.max_new_tokens
        for first in range(len(self.turns) + 1):
            ids = self.render(self.turns[first:], message)
            if len(ids) <= room:
                if first:
                    self.turns = self.turns[first:]
                    self.write(f"[history trimmed: the {first} oldest turn(s) no longer fit the context of {self.loaded.context_window} tokens with --max-new-tokens {self.args.max_new_tokens}]\n")
                return ids
        return None

    def render(self, turns: list[tuple[str, str]], message: str) -> list[int]:
        """Token ids of a conversation: the chat template's messages, or the plain transcript."""
        tokenizer = self.loaded.tokenizer
        if self.templated:
            messages = [{"role": "system", "content": self.args.system}] if self.args.system else []
            for said, answer in turns:
                messages += [{"role": "user", "content": said}, {"role": "assistant", "content": answer}]
            return chat_ids(tokenizer, [*messages, {"role": "user", "content": message}])
        opening = self.args.system + "\n" if self.args.system else ""
        return tokenizer(opening + "".join(said + answer for said, answer in turns) + message, add_special_tokens=False)["input_ids"]

    def say(self, message: str) -> str:
        """Answer one message, streaming the answer to `write`; the turn joins the conversation."""
        from transformers import TextIteratorStreamer

        from finetune.evaluation import generate_tokens

        ids = self.prompt(message)
        if ids is None:
            self.write(f"[that message does not fit the context of {self.loaded.context_window} tokens with --max-new-tokens {self.args.max_new_tokens}; say less, or lower --max-new-tokens]\n")
            return ""
        loaded, args = self.loaded, self.args
        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def run() -> None:
            try:
                result["tokens"] = generate_tokens(loaded.model, loaded.tokenizer, [ids], args.max_new_tokens, loaded.device, args.temperature, args.top_p, streamer)
            except BaseException as err:  # shown in the main thread
                result["error"] = err
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        for piece in streamer:
            self.write(piece)
        worker.join()
        if "error" in result:
            raise result["error"]
        self.write("\n")
        answer = loaded.tokenizer.decode(result["tokens"][0], skip_special_tokens=True)
        self.turns.append((message, answer.strip() if self.templated else answer))
        return answer

    def reset(self) -> None:
        self.turns = []
        self.write("[conversation forgotten]\n")


def repl(session: Session, read: Callable[[str], str]) -> None:
    """Read messages until /exit or end of input; /reset forgets the conversation."""
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            session.write("\n")
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
        elif command:
            session.say(line)


def write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat_command(args: argparse.Namespace) -> int:
    """Load the model, then chat until /exit, end of input or Ctrl-C."""
    import readline  # noqa: F401 (line editing and history for input())

    import torch

    source = open_source(args.source, opt_in_flags(args), "chat")
    check_generates(source)
    loaded = load(source)
    torch.manual_seed(args.seed)
    session = Session(loaded, args, write_out)
    mode = "chat template" if session.templated else "plain completion"
    print(f"chatting with {args.source} ({mode}, {loaded.device}, context {loaded.context_window} tokens); /reset forgets the conversation, /exit quits", flush=True)
    try:
        repl(session, input)
    except KeyboardInterrupt:
        print()
    return 0


def main(argv: list[str]) -> int:
    return run_command(argv, parse_cli, chat_command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
