"""Throughput and memory of finetune.serve: generated tokens/s at several concurrencies, the server's resident memory.

    python bench/serve_load.py outputs/run1 --concurrency 1 8 --max-tokens 64 --rounds 2
    python bench/serve_load.py outputs/run1 outputs/run2 outputs/run3 outputs/run4 --concurrency 1

Starts `python -m finetune.serve RUN ...` on a free port, reads its resident set once the models are loaded,
then for each concurrency C sends C greedy chat completions at once (distinct prompts, the first adapter), --rounds
times, and reports completion tokens (the server's usage counts) over the wall time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light"]


def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/serve_load.py", description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="+", metavar="RUN", help="what finetune.serve serves (the first adapter is asked)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="requests sent at once (default 1 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per concurrency (default 2)")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    import openai
    import psutil

    args = parse_cli(argv)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "finetune.serve", *args.sources, "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ready = server.stdout.readline()
        if not ready.startswith("serving "):
            print(f"error: the server did not start ({ready.strip()})", file=sys.stderr)
            return 2
        ids = ready.removeprefix("serving ").split(" on ")[0].split(", ")
        model = ids[1] if len(ids) > 1 else ids[0]  # the first adapter (the base comes first), else the one model
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=1800)
        api.completions.create(model=model, prompt="warm up", max_tokens=4, temperature=0)
        result = {"sources": args.sources, "model": model, "rss_mib": psutil.Process(server.pid).memory_info().rss / 2**20, "max_tokens": args.max_tokens, "cpu": os.cpu_count(), "runs": []}

        def one(k: int) -> int:
            messages = [{"role": "user", "content": f"Write a long story about the {WORDS[k % len(WORDS)]} number {k}."}]
            return api.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, temperature=0).usage.completion_tokens

        for concurrency in args.concurrency:
            tokens, started = 0, time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                for round_ in range(args.rounds):
                    tokens += sum(pool.map(one, range(round_ * concurrency, (round_ + 1) * concurrency)))
            wall = time.perf_counter() - started
            result["runs"].append({"concurrency": concurrency, "completion_tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1)})
        result["rss_after_mib"] = psutil.Process(server.pid).memory_info().rss / 2**20
        print(json.dumps(result, indent=2))
    finally:
        os.killpg(server.pid, 15)
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
