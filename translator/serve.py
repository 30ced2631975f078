"""`translator serve`: an HTTP JSON API and a page to try it, on FastAPI and uvicorn, with dynamic batching.

    POST /translate  {"text": ["...", ...], "beam": 4, "lenpen": 0.6, "nbest": 1, "prefix": [...], "alignments": false}
                     -> {"translations": ["...", ...]}; with nbest > 1, per sentence a list of {"text", "score"}
    GET  /health     -> {"status": "ok"}
    GET  /info       -> languages, models, recipe, parameters, decoding defaults, limits, BLEU from the run if known
    GET  /           -> the page

Requests that arrive together are translated together: one worker thread takes the first waiting request, then
gathers others for up to `max_wait_ms` or until `batch_tokens` source tokens are waiting, and translates those
with the same decoding options in one call (sorted by length and batched by tokens as `translate` does). Every
reply equals what `translate` gives for that sentence: the searches are batch-invariant (in float32 and with
--prepack; not with --int8, whose dynamic quantization rounds a batch's activations with one scale).

Why FastAPI and uvicorn rather than LitServe: LitServe batches a fixed number of requests per call, in worker
processes; a translation batch wants a token budget, may only mix requests with the same decoding options, and
each request holds several sentences. That gathering is the ~40 lines of `Batcher`; FastAPI and uvicorn give
the HTTP side, validation included.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("translator")


@dataclass
class Limits:
    """What one request may ask for; larger ones get a 4xx naming the limit."""
    max_body_bytes: int = 1_000_000
    max_sentences: int = 256
    max_chars: int = 2_000  # per sentence
    max_beam: int = 16


@dataclass
class Job:
    key: tuple  # decoding options: only jobs with the same key share a search
    lines: list[str]
    prefixes: list[str] | None
    tokens: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """One worker thread translating gathered jobs. batching=False: one job at a time, as it arrives."""

    def __init__(self, translate, batch_tokens: int = 4096, max_wait_ms: float = 10.0, batching: bool = True):
        self.translate = translate  # (key, lines, prefixes) -> list of per-line results
        self.batch_tokens, self.max_wait, self.batching = batch_tokens, max_wait_ms / 1000, batching
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0  # translate calls made, for /info and the load test
        self.thread = threading.Thread(target=self._run, name="translator-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _gather(self, first: Job) -> list[Job]:
        gathered, tokens = [first], first.tokens
        deadline = time.monotonic() + self.max_wait
        while self.batching and tokens < self.batch_tokens:
            try:
                job = self.jobs.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if job is None:  # closing: finish what was gathered first
                self.jobs.put(None)
                break
            gathered.append(job)
            tokens += job.tokens
        return gathered

    def _run(self) -> None:
        while (first := self.jobs.get()) is not None:
            gathered = self._gather(first)
            groups: dict[tuple, list[Job]] = {}
            for job in gathered:
                groups.setdefault(job.key, []).append(job)
            for key, jobs in groups.items():
                lines = [line for job in jobs for line in job.lines]
                prefixes = None
                if any(job.prefixes is not None for job in jobs):
                    prefixes = [p for job in jobs for p in (job.prefixes or [""] * len(job.lines))]
                try:
                    results = self.translate(key, lines, prefixes)
                    self.batches += 1
                except Exception as e:  # noqa: BLE001 - the worker must outlive any one batch
                    log.exception("translation failed")
                    for job in jobs:
                        job.future.set_exception(e)
                    continue
                start = 0
                for job in jobs:
                    job.future.set_result(results[start:start + len(job.lines)])
                    start += len(job.lines)


class BadRequest(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


OPTIONS = {"text", "beam", "lenpen", "nbest", "prefix", "alignments"}


def _check_texts(name: str, value: Any, limits: Limits, count: int | None = None) -> list[str]:
    if not isinstance(value, list):
        raise BadRequest(422, f"'{name}' must be a list of strings")
    if count is None and not value:
        raise BadRequest(422, f"'{name}' is empty: nothing to translate")
    if count is not None and len(value) != count:
        raise BadRequest(422, f"'{name}' has {len(value)} items but 'text' has {count}")
    if len(value) > limits.max_sentences:
        raise BadRequest(413, f"'{name}' has {len(value)} sentences; at most {limits.max_sentences} per request")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise BadRequest(422, f"'{name}[{i}]' must be a string, not {type(item).__name__}")
        if len(item) > limits.max_chars:
            raise BadRequest(413, f"'{name}[{i}]' has {len(item)} characters; at most {limits.max_chars}")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(422, f"'{name}[{i}]' is not valid Unicode (a lone surrogate)") from None
    return value


def _check_number(body: dict, name: str, default, kind: type, low: float, high: float | None = None):
    value = body.get(name, default)
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise BadRequest(422, f"'{name}' must be an integer")
    if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
        raise BadRequest(422, f"'{name}' must be a finite number")
    if value < low or (high is not None and value > high):
        raise BadRequest(422, f"'{name}' = {value}: must lie in [{low}, {high if high is not None else 'inf'}]")
    return kind(value)


def parse_request(raw: bytes, defaults, limits: Limits) -> dict:
    """The request's options, checked, with the run's defaults filled in; BadRequest naming the problem."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"invalid JSON: {e}") from None
    except RecursionError:
        raise BadRequest(400, "invalid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(422, f"the body must be a JSON object with 'text', not {type(body).__name__}")
    unknown = sorted(set(body) - OPTIONS)
    if unknown:
        raise BadRequest(422, f"unknown option(s) {', '.join(repr(u) for u in unknown)}; known: "
                              f"{', '.join(sorted(OPTIONS))}")
    if "text" not in body:
        raise BadRequest(422, "'text' is missing: a list of sentences to translate")
    texts = _check_texts("text", body["text"], limits)
    beam = _check_number(body, "beam", defaults.beam, int, 1, limits.max_beam)
    nbest = _check_number(body, "nbest", 1, int, 1, beam)
    lenpen = _check_number(body, "lenpen", defaults.lenpen, float, 0.0, 10.0)
    prefixes = _check_texts("prefix", body["prefix"], limits, len(texts)) if body.get("prefix") is not None else None
    alignments = body.get("alignments", False)
    if not isinstance(alignments, bool):
        raise BadRequest(422, "'alignments' must be true or false")
    if alignments and nbest > 1:
        raise BadRequest(422, "'alignments' links the best translation only; ask for nbest 1")
    return {"text": texts, "beam": beam, "nbest": nbest, "lenpen": lenpen, "prefix": prefixes, "alignments": alignments}


class Translator:
    """The loaded model(s) and what a batch of lines with one set of options becomes."""

    def __init__(self, model, tokenizer, recipe, models: list[str], alignment_layer: int = -2):
        self.model, self.tokenizer, self.recipe, self.models = model, tokenizer, recipe, models
        self.alignment_layer = alignment_layer

    def __call__(self, key: tuple, lines: list[str], prefixes: list[str] | None) -> list:
        from .lines import translate_lines

        beam, lenpen, nbest, alignments = key
        options = dataclasses.replace(self.recipe.decode, beam=beam, lenpen=lenpen)
        mode = "greedy" if beam == 1 and nbest == 1 else "beam"
        done = translate_lines(self.model, self.tokenizer, lines, options, mode, nbest, prefixes=prefixes,
                               alignment_layer=self.alignment_layer if alignments else None)
        if nbest == 1:
            texts = [hyps[0] for hyps in done.texts]
        else:
            texts = [[{"text": t, "score": None if math.isnan(s) else round(s, 4)} for t, s in zip(hyps, scores)]
                     for hyps, scores in zip(done.texts, done.scores)]
        if done.alignments is None:
            return [(text, None) for text in texts]
        return list(zip(texts, done.alignments))

    def info(self) -> dict:
        from .model import count_parameters

        recipe = self.recipe
        info = {"source_language": recipe.data.src_lang, "target_language": recipe.data.tgt_lang,
                "models": self.models, "parameters": count_parameters(self.model),
                "decode": {"beam": recipe.decode.beam, "lenpen": recipe.decode.lenpen,
                           "lp_form": recipe.decode.lp_form, "mbr": recipe.decode.mbr if recipe.decode.beam > 1 else 0},
                "recipe": json.loads(json.dumps(dataclasses.asdict(recipe), default=str))}
        first = Path(self.models[0])
        report = (first if first.is_dir() else first.parent) / "eval" / "test.json"
        if report.is_file():  # written by `translator evaluate`
            try:
                scores = json.loads(report.read_text(encoding="utf-8"))["scores"]
                info["bleu"] = {k: v["text"] for k, v in scores.items()}
            except (ValueError, KeyError, TypeError):
                pass
        return info


def build_app(translator: Translator, limits: Limits = Limits(), batch_tokens: int = 4096,
              max_wait_ms: float = 10.0, batching: bool = True):
    """The FastAPI application; its batcher starts with it and stops at shutdown."""
    batcher = Batcher(translator, batch_tokens, max_wait_ms, batching)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="translator", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    def error(status: int, reason: str) -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # 404, 405, ...: the same one-line shape as every other error
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        return error(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid request')}")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return {**translator.info(), "limits": dataclasses.asdict(limits),
                "batching": {"enabled": batching, "batch_tokens": batch_tokens, "max_wait_ms": max_wait_ms}}

    @app.post("/translate")
    async def translate(request: Request):
        try:
            size = int(request.headers.get("content-length", 0))
        except ValueError:
            return error(400, "Content-Length is not a number")
        if size > limits.max_body_bytes:
            return error(413, f"request body of {size} bytes; at most {limits.max_body_bytes}")
        raw = bytearray()
        async for chunk in request.stream():  # a chunked body has no Content-Length: count as it comes
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                return error(413, f"request body over {limits.max_body_bytes} bytes")
        try:
            req = parse_request(bytes(raw), translator.recipe.decode, limits)
        except BadRequest as e:
            return error(e.status, e.reason)
        # Line breaks inside a sentence become spaces, as sentencepiece treats whitespace (translate reads lines).
        lines = [" ".join(text.split()) for text in req["text"]]
        tokens = sum(len(x) + 1 for x in translator.tokenizer.encode(lines))
        job = Job((req["beam"], req["lenpen"], req["nbest"], req["alignments"]), lines,
                  None if req["prefix"] is None else [" ".join(p.split()) for p in req["prefix"]], tokens)
        try:
            results = await asyncio.wrap_future(batcher.submit(job))
        except Exception as e:  # noqa: BLE001 - a reply, never a dead connection
            return error(500, f"translation failed: {type(e).__name__}: {e}")
        reply: dict[str, Any] = {"translations": [text for text, _ in results]}
        if req["alignments"]:
            reply["alignments"] = [links for _, links in results]
        return reply

    return app


def serve(translator: Translator, host: str = "127.0.0.1", port: int = 8080, **settings) -> None:
    import uvicorn

    app = build_app(translator, **settings)
    log.info("serving %s on http://%s:%d (page at /, API at POST /translate)", ", ".join(translator.models), host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>translator</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 16px/1.4 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
textarea { width: 100%; min-height: 8rem; font: inherit; padding: .5rem; box-sizing: border-box; }
label { margin-right: 1rem; } input[type=number] { width: 4rem; }
button { font: inherit; padding: .4rem 1.2rem; margin: .5rem 0; }
#output p { margin: .3rem 0; padding: .5rem; background: #f4f4f4; white-space: pre-wrap; }
#output li { font-family: monospace; } #error { color: #b00; } small { color: #666; }
</style></head>
<body>
<h1>translator</h1>
<p id="languages"><small>loading model information...</small></p>
<textarea id="source" placeholder="One sentence per line"></textarea>
<div>
<label>beam <input id="beam" type="number" min="1" max="16"></label>
<label>n-best <input id="nbest" type="number" min="1" max="16" value="1"></label>
<button id="go">Translate</button>
</div>
<div id="error" role="alert"></div>
<div id="output" aria-live="polite"></div>
<script>
const $ = (id) => document.getElementById(id);
fetch("/info").then((r) => r.json()).then((info) => {
  $("languages").textContent = info.source_language + " \\u2192 " + info.target_language +
    " \\u00b7 " + info.parameters.toLocaleString() + " parameters" + (info.bleu && info.bleu.BLEU ? " \\u00b7 " + info.bleu.BLEU : "");
  $("beam").value = info.decode.beam;
});
async function translate() {
  $("error").textContent = "";
  const lines = $("source").value.split("\\n");
  const body = {text: lines, beam: Number($("beam").value) || 1, nbest: Number($("nbest").value) || 1};
  const out = $("output");
  out.textContent = "";
  out.dataset.state = "busy";
  try {
    const response = await fetch("/translate", {method: "POST", headers: {"Content-Type": "application/json"},
                                                body: JSON.stringify(body)});
    const reply = await response.json();
    if (!response.ok) { $("error").textContent = reply.error; return; }
    reply.translations.forEach((t) => {
      if (typeof t === "string") {
        const p = document.createElement("p"); p.className = "translation"; p.textContent = t; out.appendChild(p);
      } else {
        const list = document.createElement("ol");
        t.forEach((h) => { const li = document.createElement("li"); li.className = "hypothesis";
          li.textContent = h.text + "  (" + h.score + ")"; list.appendChild(li); });
        out.appendChild(list);
      }
    });
  } catch (e) { $("error").textContent = String(e); }
  finally { out.dataset.state = "done"; }
}
$("go").addEventListener("click", translate);
$("source").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) translate(); });
</script>
</body></html>
"""
