"""An OpenAI-compatible HTTP server for trained models: one base model, any number of LoRA adapters on it.

    python -m finetune.serve outputs/run1 outputs/run2 --port 8000
    python -m finetune.serve tiny-llama outputs/run1/checkpoints/step_00000040 --port 8000 --api-key SECRET

Each RUN is anything finetune.inference loads. Adapter runs (LoRA, QLoRA) go onto one base model, loaded once
and shared, unmerged; the request's `model` field picks the adapter, or the base model by its name
(`model.name` of the runs). At most one RUN may be a model of its own (a full fine-tune, or a plain model
name, which must then be the adapters' base). Endpoints: GET /v1/models, POST /v1/chat/completions and
/v1/completions, with `stream: true` as server-sent events. One worker thread runs the model: greedy
requests for the same model that arrive together are generated as one batch. A bad request gets the OpenAI
error shape ({"error": {"message", "type", "param", "code"}}) and a 4xx status, never a crash. Binds to
127.0.0.1 unless --host says otherwise; with --api-key every /v1 request must carry it as a bearer token.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import queue
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from finetune.errors import FinetuneError, run_command
from finetune.export_source import add_opt_in_arguments, opt_in_flags
from finetune.inference import Source, check_generates, open_source

MAX_BATCH = 8  # greedy requests generated together at most
STREAM_WAIT_S = 600  # the longest a stream waits for its next piece of text


class ServeError(FinetuneError):
    """The server cannot start as asked."""


def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune.serve", description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="+", metavar="RUN", help="adapter runs on one base, and at most one model of its own")
    parser.add_argument("--port", type=int, default=8000, help="the TCP port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--api-key", help="require this bearer token on every /v1 request")
    add_opt_in_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port} is not a TCP port (1-65535)")
    return args


def model_id(source: Source) -> str:
    """The id a request names a source by: the run dir's name (a checkpoint: RUN/step_N), a model name as given."""
    if source.cfg is None:
        return source.name
    path = Path(source.name).resolve()
    if (path / "state.json").is_file():  # a checkpoint: checkpoints/step_N of its run
        return f"{path.parent.parent.name}/{path.name}"
    return path.parent.name if path.name == "final" else path.name


@dataclass
class Served:
    """The models a server answers for: one model in memory, its adapters by id, and each id's tokenizer."""

    model: object  # a peft model when there are adapters
    base_id: str | None  # the id that runs the base with every adapter off; None: no base served
    adapters: set[str]
    tokenizers: dict[str, object]  # by model id
    device: object
    context_window: int
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def ids(self) -> list[str]:
        """Every model id a request may name: the base first, then the adapters."""
        return list(self.tokenizers)


def plan(sources: list[Source]) -> tuple[Source | None, list[Source]]:
    """(the one source that is a model of its own, or None; the adapter sources), refused unless the adapters share
    one base and that model, if any, is it (a plain model name) or stands alone (a full fine-tune)."""
    for source in sources:
        check_generates(source)
    adapters = [s for s in sources if s.adapter]
    whole = [s for s in sources if not s.adapter]
    if len(whole) > 1:
        raise ServeError(f"one model per server: {whole[0].name} and {whole[1].name} are both models of their own (serve adapters on one base beside at most one)")
    bases = sorted({f"{s.base[0]}" + (f" (seed {s.base[1]})" if s.base[1] is not None else "") for s in adapters})
    if len(bases) > 1:
        raise ServeError(f"the adapters need different base models ({', '.join(bases)}); one server holds one base")
    if whole and adapters and (whole[0].cfg is not None or whole[0].base != adapters[0].base):
        raise ServeError(f"{whole[0].name} is not the adapters' base model ({bases[0]}); name it, or serve it alone")
    ids = [model_id(s) for s in sources]
    if len(set(ids)) < len(ids):
        raise ServeError(f"two models would have the same id ({next(i for i in ids if ids.count(i) > 1)}); serve runs with different directory names")
    return (whole[0] if whole else None), adapters


def load_served(sources: list[Source]) -> Served:
    """Build the base once and put every adapter on it (unmerged), each under its model id."""
    from finetune.inference import build_base, inference_device, load, ready, run_tokenizer

    whole, adapters = plan(sources)
    device = inference_device()
    if not adapters:
        loaded = load(whole)
        return Served(loaded.model, model_id(whole), set(), {model_id(whole): loaded.tokenizer}, device, loaded.context_window)
    from peft import PeftModel

    base, base_tokenizer = build_base(whole or adapters[0], device)
    first = model_id(adapters[0])
    model = PeftModel.from_pretrained(base, str(adapters[0].weights), adapter_name=first)
    for source in adapters[1:]:
        model.load_adapter(str(source.weights), adapter_name=model_id(source))
    tokenizers = {model_id(s): run_tokenizer(s, base_tokenizer) for s in adapters}
    base_id = model_id(whole) if whole else adapters[0].base[0]  # the base, by the name the runs trained it under
    tokenizers = {base_id: run_tokenizer(whole, base_tokenizer) if whole else base_tokenizer, **tokenizers}
    loaded = ready(adapters[0], model, tokenizers[first], device)
    return Served(loaded.model, base_id, {model_id(s) for s in adapters}, tokenizers, device, loaded.context_window)


# --------------------------------------------------------------------- requests


class RequestError(Exception):
    """A request the server refuses: its HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        """The OpenAI error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One generation for the worker: what to generate, and where its result (or its stream) goes."""

    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: object | None = None  # a TextIteratorStreamer for a streamed request
    result: Future = field(default_factory=Future)

    @property
    def batchable(self) -> bool:
        """Greedy and not streamed: it may share a batch with others for the same model and length."""
        return self.stream is None and self.temperature == 0


class Worker:
    """The one thread that runs the model: jobs in arrival order, greedy ones for the same model batched together."""

    def __init__(self, served: Served) -> None:
        self.served, self.jobs = served, queue.Queue()
        threading.Thread(target=self.run, name="finetune-serve-worker", daemon=True).start()

    def submit(self, job: Job) -> Job:
        """Queue a job; its result (or stream) fills as the worker gets to it."""
        self.jobs.put(job)
        return job

    def run(self) -> None:
        while True:
            batch = [self.jobs.get()]
            held = []
            while batch[0].batchable and len(batch) < MAX_BATCH:  # greedy requests that arrived together
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                same = job.batchable and (job.model, job.max_tokens) == (batch[0].model, batch[0].max_tokens)
                (batch if same else held).append(job)
            for job in held:  # back in line, in their order, behind what is still queued
                self.jobs.put(job)
            self.generate(batch)

    def generate(self, batch: list[Job]) -> None:
        """Run one batch (one model, one set of settings) and hand each job its tokens, or every job the failure."""
        import torch

        from finetune.evaluation import generate_tokens

        first, served = batch[0], self.served
        try:
            if first.model in served.adapters:
                served.model.set_adapter(first.model)
            off = served.model.disable_adapter() if served.adapters and first.model not in served.adapters else contextlib.nullcontext()
            if first.seed is not None:
                torch.manual_seed(first.seed)
            with off:
                rows = generate_tokens(served.model, served.tokenizers[first.model], [job.prompt for job in batch], first.max_tokens, served.device, first.temperature, first.top_p, first.stream)
            for job, row in zip(batch, rows):
                job.result.set_result(row)
        except Exception as err:  # the model failed: every waiting request gets a 500, the server goes on
            for job in batch:
                job.result.set_exception(err)
            if first.stream is not None:
                first.stream.end()


def error_response(err: RequestError) -> JSONResponse:
    """The refusal as OpenAI sends one: its status, and the error object as the body."""
    return JSONResponse(err.body(), status_code=err.status)


def build_app(served: Served, api_key: str | None = None) -> FastAPI:
    """The FastAPI app: the three OpenAI endpoints over `served`, every refusal in the OpenAI error shape."""
    app = FastAPI(title="finetune.serve")
    worker = Worker(served)

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):  # unknown paths, wrong methods
        return error_response(RequestError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception):  # a bug or a failed generation: this request fails, the server goes on
        return error_response(RequestError(500, f"the server failed on this request ({type(err).__name__}: {str(err)[:200]})", kind="server_error"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return error_response(RequestError(400, str(err)))

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(RequestError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": i, "object": "model", "created": served.created, "owned_by": "finetune"} for i in served.ids]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages must be a non-empty list of {role, content} messages", "messages")
        job = make_job(served, body, lambda tokenizer: chat_prompt(tokenizer, messages), default_max_tokens=None)
        return await respond(job, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "prompt must be one non-empty string", "prompt")
        job = make_job(served, body, lambda tokenizer: tokenizer(prompt, add_special_tokens=False)["input_ids"], default_max_tokens=16)
        return await respond(job, body, chat=False)

    async def respond(job: Job, body: dict, chat: bool):
        kind = "chat.completion" if chat else "text_completion"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        tokenizer = served.tokenizers[job.model]
        if body.get("stream"):
            return StreamingResponse(stream_events(worker, job, tokenizer, ident, kind, chat, served.created), media_type="text/event-stream")
        worker.submit(job)
        return await wait_and_answer(job, tokenizer, ident, kind, chat, served.created)

    return app


async def json_body(request: Request) -> dict:
    """The request's JSON object, or a 400."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def chat_prompt(tokenizer, messages: list) -> list[int]:
    """A chat request's prompt: its messages checked as the chat task checks them, in the model's chat template."""
    from finetune.inference import chat_ids
    from finetune.tasks.chat import checked_messages

    return chat_ids(tokenizer, checked_messages({"messages": messages}, "messages"))


def number(body: dict, key: str, default, low: float, high: float, whole: bool = False):
    """A numeric request field in [low, high] (a whole number with `whole`), or a 400 naming it."""
    value = body.get(key)
    if value is None:
        return default
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        raise RequestError(400, f"{key} must be {'a whole number' if whole else 'a number'} in [{low}, {high}], got {json.dumps(value)[:40]}", key)
    return value


def make_job(served: Served, body: dict, prompt_of, default_max_tokens: int | None) -> Job:
    """A request's job: its model known, its fields in range, its prompt and max_tokens inside the context window."""
    from finetune.tasks import DataError

    name = body.get("model")
    if name not in served.tokenizers:
        raise RequestError(404, f"the model {json.dumps(name)[:80]} does not exist; this server has {', '.join(served.ids)}", "model", "model_not_found")
    if number(body, "n", 1, 1, 1, whole=True) != 1:
        raise RequestError(400, "n must be 1", "n")
    if body.get("stop") is not None:
        raise RequestError(400, "stop sequences are not supported", "stop")
    try:
        prompt = prompt_of(served.tokenizers[name])
    except DataError as err:
        raise RequestError(400, str(err), "messages") from None
    room = served.context_window - len(prompt)
    if room < 1:
        raise RequestError(400, f"the prompt has {len(prompt)} tokens; the model's context is {served.context_window}", "messages" if default_max_tokens is None else "prompt", "context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, key, default_max_tokens or room, 1, 2**31, whole=True)
    if max_tokens > room:
        raise RequestError(400, f"{key}={max_tokens} and the prompt's {len(prompt)} tokens exceed the model's context of {served.context_window} tokens", key, "context_length_exceeded")
    temperature = number(body, "temperature", 1.0, 0, 2)
    top_p = number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise RequestError(400, "top_p must be above 0", "top_p")
    seed = number(body, "seed", None, -(2**63), 2**63 - 1, whole=True)
    return Job(name, prompt, max_tokens, float(temperature), float(top_p), seed)


def usage(job: Job, tokens: list[int]) -> dict:
    """The OpenAI usage object of a finished job."""
    return {"prompt_tokens": len(job.prompt), "completion_tokens": len(tokens), "total_tokens": len(job.prompt) + len(tokens)}


def finish_reason(job: Job, tokens: list[int]) -> str:
    """`length` when max_tokens cut the answer, `stop` when the model ended it."""
    return "length" if len(tokens) >= job.max_tokens else "stop"


async def wait_and_answer(job: Job, tokenizer, ident: str, kind: str, chat: bool, created: int) -> dict:
    """The whole answer of a job the worker has been given, as a chat.completion or text_completion object."""
    import asyncio

    tokens = await asyncio.wrap_future(job.result)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    choice = {"index": 0, "finish_reason": finish_reason(job, tokens)}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None})
    return {"id": ident, "object": kind, "created": created, "model": job.model, "choices": [choice], "usage": usage(job, tokens)}


def stream_events(worker: Worker, job: Job, tokenizer, ident: str, kind: str, chat: bool, created: int):
    """Server-sent events of a streamed request: a chunk per piece of text as it is generated, the finish reason, [DONE]."""
    from transformers import TextIteratorStreamer

    job.stream = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_WAIT_S)
    worker.submit(job)
    chunk_kind = "chat.completion.chunk" if chat else kind

    def event(delta: dict | None, text: str | None, reason: str | None) -> str:
        choice = {"index": 0, "finish_reason": reason}
        choice.update({"delta": delta or {}} if chat else {"text": text or "", "logprobs": None})
        return f"data: {json.dumps({'id': ident, 'object': chunk_kind, 'created': created, 'model': job.model, 'choices': [choice]})}\n\n"

    if chat:
        yield event({"role": "assistant", "content": ""}, None, None)
    for piece in job.stream:
        if piece:
            yield event({"content": piece}, piece, None)
    try:
        tokens = job.result.result(timeout=STREAM_WAIT_S)
        yield event({}, "", finish_reason(job, tokens))
    except Exception as err:  # the model failed mid-stream: said in the stream, in the OpenAI error shape
        yield f"data: {json.dumps(RequestError(500, f'generation failed: {err}', kind='server_error').body())}\n\n"
    yield "data: [DONE]\n\n"


def check_port(host: str, port: int) -> None:
    """Refuse an address this process cannot listen on, before the model is loaded."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as err:
        raise ServeError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})") from None


def serve_command(args: argparse.Namespace) -> int:
    """Check and load every source, then serve until stopped."""
    flags = opt_in_flags(args)
    sources = [open_source(name, flags, "serve") for name in args.sources]
    plan(sources)
    check_port(args.host, args.port)
    served = load_served(sources)
    import uvicorn

    print(f"serving {', '.join(served.ids)} on http://{args.host}:{args.port}/v1 (device {served.device})", flush=True)
    uvicorn.run(build_app(served, args.api_key), host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str]) -> int:
    return run_command(argv, parse_cli, serve_command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
