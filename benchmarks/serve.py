"""Load test of `translator serve` on localhost: N concurrent clients for T seconds each, one sentence per request,
with dynamic batching and one request at a time; and CTranslate2 (our export) behind the same HTTP front.

    python benchmarks/serve.py --model runs/bench_multi30k_en_de --data-dir ../shared/data

Each server runs in its own process (`translator serve`, or this script's --backend-ctranslate2 mode); the clients
are threads of this process with one keep-alive connection each, sending Multi30k test2016 sentences in turn.
Every reply is checked against the offline translation of its sentence (translate_lines over the whole file,
or CTranslate2's translate_batch over it): lost, duplicated or mismatched replies are counted, and must be zero.
Reported: sentences/s, p50 and p99 latency per setting, and batching_speedup_32 (sentences/s with dynamic
batching over one request at a time, 32 clients). Results in benchmarks/results/serve_<device>.json.

CTranslate2 batches within one translate_batch call only; behind this server its calls get the same gathering
(requests arriving together, one call), and without it one call per request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def load(port: int, sentences: list[str], expected: list[str], clients: int, seconds: float) -> dict:
    """`clients` threads send one sentence per request until `seconds` have passed; each reply is checked."""
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    counts = {"sent": 0, "ok": 0, "lost": 0, "mismatched": 0, "duplicated": 0}
    answered: set[int] = set()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.monotonic() < stop_at:
            with lock:
                request_id = next_index[0]
                next_index[0] += 1
                counts["sent"] += 1
            i = request_id % len(sentences)
            body = json.dumps({"text": [sentences[i]]}).encode()
            start = time.perf_counter()
            try:
                connection.request("POST", "/translate", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                reply = json.loads(response.read())
                ok = response.status == 200 and len(reply["translations"]) == 1
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                ok, reply = False, None
            elapsed = time.perf_counter() - start
            with lock:
                if not ok:
                    counts["lost"] += 1
                    continue
                if request_id in answered:
                    counts["duplicated"] += 1
                answered.add(request_id)
                if reply["translations"][0] != expected[i]:
                    counts["mismatched"] += 1
                counts["ok"] += 1
                latencies.append(elapsed)
        connection.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {**counts, "seconds": round(wall, 2), "sentences_per_second": round(counts["ok"] / wall, 1),
            "latency_p50_ms": round(1000 * statistics.median(latencies), 1),
            "latency_p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)}


# -- CTranslate2 behind the same HTTP front -------------------------------------------------------------------

class CTranslate2Backend:
    """translate_batch on our export, with the run's decoding settings as CTranslate2 names them."""

    def __init__(self, ct2_dir: str, run: str, threads: int):
        import ctranslate2

        from translator.checkpoint import load_model

        model, self.tokenizer, self.recipe = load_model(run, "cpu")
        self.translator = ctranslate2.Translator(ct2_dir, device="cpu", compute_type="float32", inter_threads=1,
                                                 intra_threads=threads)

    def translate(self, lines: list[str], beam: int) -> list[str]:
        pieces = [self.tokenizer.sp.encode(line, out_type=str) for line in lines]
        todo = [i for i, p in enumerate(pieces) if p]
        results = self.translator.translate_batch(
            [pieces[i] for i in todo], beam_size=beam, max_batch_size=4096, batch_type="tokens",
            max_decoding_length=max((len(pieces[i]) for i in todo), default=0) + 51, length_penalty=1.0,
            suppress_sequences=[["<pad>"], ["<s>"]])
        out = [""] * len(lines)
        for i, r in zip(todo, results):
            out[i] = self.tokenizer.sp.decode(r.hypotheses[0])
        return out

    def __call__(self, key, lines, prefixes):
        beam, _, _, _ = key
        return [(text, None) for text in self.translate(lines, beam)]


def serve_ctranslate2(args) -> None:
    import uvicorn

    from translator.serve import Translator, build_app

    backend = CTranslate2Backend(args.backend_ctranslate2, args.model, args.threads)
    translator = Translator(None, backend.tokenizer, backend.recipe, [args.model])
    translator.info = lambda: {"backend": "ctranslate2"}  # type: ignore[method-assign]
    app = build_app(translator, batching=not args.no_batching)
    app.state.batcher.translate = backend
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/bench_multi30k_en_de", help="a trained run directory")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--sentences", type=int, default=1000, help="how many test2016 sentences to cycle through")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=20.0, help="load time per setting")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-ctranslate2", action="store_true")
    parser.add_argument("--backend-ctranslate2", help=argparse.SUPPRESS)  # internal: serve this CT2 directory
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-batching", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend_ctranslate2:
        return serve_ctranslate2(args)

    from translator.checkpoint import load_model
    from translator.config import DecodeConfig
    from translator.data import load_corpus
    from translator.lines import translate_lines

    model, tokenizer, recipe = load_model(args.model, "cpu")
    corpus = load_corpus(recipe.data.test, recipe.data.src_lang, recipe.data.tgt_lang, args.data_dir)
    sentences = corpus.src[:args.sentences]
    # CTranslate2 knows only the 'length' penalty form: both engines decode with it, so that each is checked
    # against its own offline output and their speeds compare like for like.
    options = DecodeConfig(beam=args.beam, lenpen=1.0, lp_form="length", max_len_a=1.0, max_len_b=50)
    expected = {"translator": [t[0] for t in translate_lines(model, tokenizer, sentences, options, "beam").texts]}
    work = Path(tempfile.mkdtemp())
    engines = ["translator"]
    if not args.skip_ctranslate2:
        from translator.export import to_ctranslate2

        to_ctranslate2(args.model, work / "ct2")
        backend = CTranslate2Backend(str(work / "ct2"), args.model, args.threads)
        expected["ctranslate2"] = backend.translate(sentences, args.beam)
        backend.translator.unload_model()
        del backend
        engines.append("ctranslate2")
    del model

    rows, metrics = [], {"sentences": len(sentences), "beam": args.beam, "lenpen": 1.0, "lp_form": "length",
                         "seconds_per_setting": args.seconds}
    for engine in engines:
        for batching in (True, False):
            port = free_port()
            if engine == "translator":
                command = [sys.executable, "-m", "translator.cli", "serve", "--model", args.model, "--port", str(port),
                           "--device", "cpu", "--beam", str(args.beam), "--lenpen", "1.0", "--lp-form", "length",
                           "--max-len-a", "1", "--max-len-b", "50", "--mbr", "0",
                           *([] if batching else ["--no-batching"])]
            else:
                command = [sys.executable, __file__, "--backend-ctranslate2", str(work / "ct2"), "--model", args.model,
                           "--port", str(port), "--threads", str(args.threads)] + ([] if batching else ["--no-batching"])
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_until_up(port, server)
                load(port, sentences, expected[engine], 4, 2.0)  # warm up
                for clients in args.clients:
                    row = {"engine": engine, "dynamic_batching": batching, "clients": clients,
                           **load(port, sentences, expected[engine], clients, args.seconds)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                server.terminate()
                server.wait(30)
    for row in rows:
        key = f"{row['engine']}_{'batching' if row['dynamic_batching'] else 'one_at_a_time'}_{row['clients']}"
        metrics[f"{key}_sentences_per_second"] = row["sentences_per_second"]
        metrics[f"{key}_latency_p50_ms"] = row["latency_p50_ms"]
        metrics[f"{key}_latency_p99_ms"] = row["latency_p99_ms"]
    metrics["lost"] = sum(r["lost"] for r in rows)
    metrics["duplicated"] = sum(r["duplicated"] for r in rows)
    metrics["mismatched"] = sum(r["mismatched"] for r in rows)
    most = max(args.clients)
    for engine in engines:
        metrics[f"{engine}_batching_speedup_{most}"] = round(
            metrics[f"{engine}_batching_{most}_sentences_per_second"]
            / metrics[f"{engine}_one_at_a_time_{most}_sentences_per_second"], 2)
    metrics[f"batching_speedup_{most}"] = metrics[f"translator_batching_speedup_{most}"]
    if "ctranslate2" in engines:
        metrics[f"ratio_vs_ctranslate2_batching_{most}"] = round(
            metrics[f"translator_batching_{most}_sentences_per_second"]
            / metrics[f"ctranslate2_batching_{most}_sentences_per_second"], 2)
    save_result("serve_cpu", metrics, "cpu", extra_versions=("fastapi", "uvicorn", "ctranslate2"), rows=rows,
                model=args.model, notes="one sentence per request; every reply checked against the offline "
                                        "translation of its sentence; the server and the clients share the CPU")


if __name__ == "__main__":
    main()
