"""The `translator` command: train, prepare, translate, serve, score, evaluate, average, export, plot, generate.

Errors print as one line (`translator: error: ...`) with a non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from .config import DecodeConfig
from .decode_commands import _decode_options, _load_for_translation, cmd_generate, cmd_serve, cmd_translate
from .lines import translate_lines

log = logging.getLogger("translator")

EXAMPLES = {
    "train": "translator train --config recipes/multi30k/en_de.yaml --data-dir ../shared/data --out runs/en_de",
    "prepare": "translator prepare --config recipes/wmt14/en_de_base.yaml --data-dir data --out prepared/wmt14_en_de",
    "translate": "translator translate --model runs/en_de -i test.en -o test.hyp.de --beam 4",
    "score": "translator score --hyp test.hyp.de --ref test.de --metrics bleu chrf",
    "evaluate": "translator evaluate --model runs/en_de --split test --data-dir ../shared/data",
    "average": "translator average --model runs/en_de --last 5 -o runs/en_de/model.safetensors",
    "serve": "translator serve --model runs/en_de --port 8080",
    "export": "translator export --model runs/en_de --format ctranslate2 -o runs/en_de_ct2",
    "plot": "translator plot runs/en_de",
    "generate": "translator generate --model runs/lm_multi30k_de --prompt 'Ein Hund' --max-new-tokens 30 --top-p 0.9",
}


# -- train -------------------------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import load_recipe
    from .training import fit

    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config or "run").stem
    if args.config is None:
        if not args.resume:
            raise ValueError("train needs --config RECIPE.yaml (or --resume with --out RUN_DIR)")
        args.config = str(run_dir / "config.yaml")
    if args.prepared:
        overrides = [*overrides, f"data.prepared={args.prepared}"]
    if args.init_from:
        overrides = [*overrides, f"train.init_from={args.init_from}"]
    recipe = load_recipe(args.config, overrides)
    accelerator = {"auto": None, "cpu": "cpu", "cuda": "gpu"}[args.device]
    fit(recipe, run_dir, data_dir=args.data_dir, resume=args.resume, max_steps=args.max_steps,
        max_minutes=args.max_minutes, accelerator=accelerator, devices=args.devices, num_nodes=args.num_nodes,
        strategy=args.strategy, progress_bar=not args.no_progress and sys.stderr.isatty())
    print(f"run directory: {run_dir}")
    return 0


# -- prepare -----------------------------------------------------------------------------------------------------

def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    import time

    from .config import load_recipe
    from .store import StoreError, open_store, prepare

    recipe = load_recipe(args.config, overrides)
    out = Path(args.out)
    try:
        open_store(out, recipe, args.data_dir)
        print(f"{out}: already prepared from these corpora with these settings; nothing to do")
        return 0
    except StoreError:
        pass
    start = time.perf_counter()
    manifest = prepare(recipe, args.data_dir, out, tokenizer_file=args.tokenizer, chunk=args.chunk_pairs,
                       threads=args.threads)
    train = manifest["splits"]["train"]
    print(f"prepared {out}: {train.get('pairs', train.get('lines'))} training {'pairs' if 'pairs' in train else 'lines'} "
          f"of {train['read']} read, in {time.perf_counter() - start:.1f}s (tokenizer {manifest['seconds']['tokenizer_s']}s)")
    return 0


# -- score -------------------------------------------------------------------------------------------------------

METRICS = ("bleu", "chrf", "ter")


def score_files(hyp: str, refs: list[str], metrics: list[str]) -> list:
    """sacreBLEU scores of a hypothesis file against reference files, read as the sacrebleu CLI reads them."""
    import sacrebleu

    from .data import read_lines

    hyps = [line.rstrip() for line in read_lines(hyp, strip=False)]
    references = []
    for ref in refs:
        lines = [line.rstrip() for line in read_lines(ref, strip=False)]
        if len(lines) != len(hyps):
            raise ValueError(f"{hyp} has {len(hyps)} lines but {ref} has {len(lines)}")
        references.append(lines)
    kinds = {"bleu": sacrebleu.BLEU, "chrf": sacrebleu.CHRF, "ter": sacrebleu.TER}
    results = []
    for name in metrics:
        metric = kinds[name]()
        results.append((metric.corpus_score(hyps, references), metric.get_signature().format()))
    return results


def _print_scores(results, as_json: bool, width: int = 1) -> None:
    lines = [score.format(width, False, signature, as_json) for score, signature in results]
    if as_json and len(lines) > 1:
        print(json.dumps([json.loads(line) for line in lines], indent=1, ensure_ascii=False))
    else:
        print("\n".join(lines))


def cmd_score(args: argparse.Namespace, overrides: list[str]) -> int:
    _print_scores(score_files(args.hyp, args.ref, args.metrics), args.json, args.width)
    return 0


# -- evaluate ----------------------------------------------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    import time

    from .data import load_corpus

    model, tokenizer, recipe = _load_for_translation(args)
    spec = getattr(recipe.data, args.split)
    if spec is None:
        raise ValueError(f"the run's recipe names no {args.split} corpus (data.{args.split})")
    corpus = load_corpus(spec, recipe.data.src_lang, recipe.data.tgt_lang, args.data_dir)
    options = _decode_options(recipe, args)
    start = time.perf_counter()
    done = translate_lines(model, tokenizer, corpus.src, options, "greedy" if options.beam == 1 else "beam")
    results, truncated = done.texts, done.truncated
    seconds = time.perf_counter() - start
    run_dir = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
    out_dir = Path(args.out_dir) if args.out_dir else run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    hyp_path, ref_path = out_dir / f"{args.split}.hyp.{recipe.data.tgt_lang}", out_dir / f"{args.split}.ref.{recipe.data.tgt_lang}"
    hyp_path.write_text("".join(r[0] + "\n" for r in results), encoding="utf-8")
    ref_path.write_text("".join(t + "\n" for t in corpus.tgt), encoding="utf-8")
    scores = score_files(str(hyp_path), [str(ref_path)], args.metrics)
    _print_scores(scores, args.json, args.width)
    report = {"model": str(args.model), "split": args.split, "corpus": corpus.name, "sentences": len(corpus),
              "beam": options.beam, "lenpen": options.lenpen, "lp_form": options.lp_form,
              "mbr": options.mbr, "mbr_utility": options.mbr_utility, "mbr_weights": options.mbr_weights,
              "seconds": round(seconds, 2), "truncated": truncated,
              "scores": {s.name: {"score": s.score, "signature": sig, "text": s.format(2, False, sig)} for s, sig in scores}}
    (out_dir / f"{args.split}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    log.info("translated %d sentences in %.1fs; hypotheses in %s", len(corpus), seconds, hyp_path)
    return 0


# -- average -----------------------------------------------------------------------------------------------------

def cmd_average(args: argparse.Namespace, overrides: list[str]) -> int:
    import shutil

    from .checkpoint import (CONFIG, TOKENIZER, WEIGHTS, WEIGHTS_INFO, average_weights, check_replaceable,
                             check_weights_output, periodic_checkpoints, save_weights, write_weights_info)

    if args.last < 1:
        raise ValueError(f"--last must be at least 1 (got {args.last})")
    run_dir = Path(args.model)
    chosen = [Path(p) for p in args.checkpoints] if args.checkpoints else periodic_checkpoints(run_dir)[-args.last:]
    if not chosen:
        raise ValueError(f"{run_dir}: no periodic checkpoints (checkpoints/step*.ckpt) to average")
    if not args.checkpoints and len(chosen) < args.last:
        log.warning("translator: warning: only %d checkpoint(s) kept in %s; averaging those", len(chosen), run_dir)
    out = Path(args.output)
    new_model_dir = out.suffix != ".safetensors" and not (out.exists() and out.resolve() == run_dir.resolve())
    if new_model_dir:  # a self-contained model directory: config, tokenizer and weights
        check_replaceable(out, {CONFIG, TOKENIZER, WEIGHTS, WEIGHTS_INFO}, "a model directory written by average")
    weights_file = out if out.suffix == ".safetensors" else out / WEIGHTS
    if not new_model_dir:
        check_weights_output(weights_file, run_dir)
    weights = average_weights(chosen)
    if new_model_dir:
        out.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG, TOKENIZER):
            shutil.copyfile(run_dir / name, out / name)
    weights_file.parent.mkdir(parents=True, exist_ok=True)
    save_weights(weights, weights_file, {"averaged": ",".join(p.name for p in chosen)})
    if weights_file.name == WEIGHTS and (weights_file.parent / CONFIG).is_file():
        write_weights_info(weights_file.parent, chosen)  # the weights a model directory loads: say what they are
    print(f"averaged {len(chosen)} checkpoint(s) ({', '.join(p.name for p in chosen)}) into {weights_file}")
    return 0


# -- export ------------------------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    from . import export

    package = {"ctranslate2": "ctranslate2", "huggingface": "transformers"}[args.format]
    try:
        __import__(package)
    except ImportError:
        raise RuntimeError(f"export --format {args.format} needs the {package} package: pip install {package}") from None
    if args.format == "huggingface":
        if args.quantization:
            raise ValueError("--quantization applies to --format ctranslate2")
        out = export.to_huggingface(args.model, args.output)
        print(f"wrote a Hugging Face MarianMT model and tokenizer to {out} "
              "(transformers.pipeline('translation', model=...) loads it)")
        return 0
    out = export.to_ctranslate2(args.model, args.output, args.quantization)
    print(f"wrote a CTranslate2 model to {out} (with spm.model for tokenization)")
    return 0


# -- plot --------------------------------------------------------------------------------------------------------

def cmd_plot(args: argparse.Namespace, overrides: list[str]) -> int:
    from .plot import plot_run

    print(f"learning curves: {plot_run(args.model, args.output)}")
    return 0


# -- the parser ----------------------------------------------------------------------------------------------------

def _add_sampling(p) -> None:
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most probable tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the smallest set with this mass")
    p.add_argument("--epsilon", type=float, default=0.0,
                   help="sample among tokens of probability at least this (epsilon sampling; 0: all)")
    p.add_argument("--seed", type=int, default=0)


def _add_models(p: argparse.ArgumentParser) -> None:
    """--model (repeatable: an ensemble), --int8 and --prepack, as translate and serve load models."""
    p.add_argument("--model", required=True, action="append",
                   help="run directory, or a .safetensors/.ckpt file inside one; given several times, an ensemble "
                        "(the models' log-probabilities averaged at every step; one sentencepiece model)")
    _add_cpu_forms(p)


def _add_cpu_forms(p: argparse.ArgumentParser) -> None:
    forms = p.add_mutually_exclusive_group()
    forms.add_argument("--int8", action="store_true", help="CPU: linear layers in int8 (PyTorch dynamic quantization)")
    forms.add_argument("--prepack", action="store_true",
                       help="CPU: float32 linear layers prepacked for oneDNN (faster where MKL is slow on the few rows "
                            "of a decoding step, e.g. AMD CPUs; the same results up to rounding)")


def _add_decoding(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (defaults: the run's recipe, decode section)")
    g.add_argument("--beam", type=int, help="beam size; 1 is greedy (paper: 4)")
    g.add_argument("--lenpen", type=float, help="length penalty alpha (paper: 0.6)")
    g.add_argument("--lp-form", dest="lp_form", choices=["gnmt", "length"],
                   help="gnmt: ((5+|Y|)/6)^alpha as in the paper; length: |Y|^alpha as fairseq/HF/CTranslate2")
    g.add_argument("--max-len-a", dest="max_len_a", type=float, help="output limit a * source length + b: a")
    g.add_argument("--max-len-b", dest="max_len_b", type=int, help="output limit a * source length + b: b")
    g.add_argument("--batch-tokens", dest="batch_tokens", type=int, help="source tokens per batch")
    g.add_argument("--beam-stop", dest="beam_stop", choices=["early", "optimal"],
                   help="early: a sentence stops with beam finished hypotheses (fairseq); optimal: once no live beam "
                        "can beat them (the paper's tensor2tensor search)")
    g.add_argument("--mbr", type=int, help="minimum Bayes risk: of beam search's N best (a beam of N), output the one "
                   "with the highest expected sentence BLEU (or chrF) against them all; 0: off")
    g.add_argument("--mbr-utility", dest="mbr_utility", choices=["bleu", "chrf"], help="MBR's utility (default bleu)")
    g.add_argument("--mbr-weights", dest="mbr_weights", choices=["model", "uniform"],
                   help="weigh each candidate as a reference by the model (softmax of the search scores; default) or "
                        "uniformly")
    g.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_true", default=None,
                   help="replay each decoding step from a CUDA graph (fixed shapes; GPU only, slower on CPU)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="translator", description="The 2017 Transformer for machine translation: train, translate, score.",
        epilog="Run 'translator COMMAND --help' for each command's options.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, epilog=f"example:\n  {EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")
        return p

    p = command("train", "train a model from a recipe",
                "Train a recipe (recipes/*.yaml) into a run directory: config.yaml, spm.model, checkpoints/,\n"
                "logs/, and model.safetensors (the average of the last checkpoints) at the end. Any recipe value\n"
                "can be overridden as --section.key=value, e.g. --train.max_tokens=8192 --model.dropout=0.2.")
    p.add_argument("--config", help="recipe YAML (see recipes/)")
    p.add_argument("--data-dir", help="directory that the recipe's corpus paths are relative to")
    p.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides the recipe)")
    p.add_argument("--max-minutes", type=float, help="stop after this much wall time; the run directory stays usable")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--devices", help="devices per node, e.g. 2 or auto (Lightning)")
    p.add_argument("--num-nodes", type=int, help="number of nodes (Lightning)")
    p.add_argument("--strategy", help="Lightning strategy: auto, ddp, fsdp, ...")
    p.add_argument("--prepared", help="a token store written by translator prepare (default: train prepares one "
                                      "into RUN/data, or reuses it there)")
    p.add_argument("--init-from", help="fine-tune: start from this run's weights and tokenizer (same model settings; "
                                       "new data and schedule)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true",
                   help="log lines instead of a progress bar (the default when stderr is not a terminal)")
    p.set_defaults(func=cmd_train)

    p = command("prepare", "tokenize a recipe's corpora once into a memory-mapped token store",
                "Read the recipe's training and validation corpora as streams, train the sentencepiece model on a\n"
                "bounded sample, tokenize in chunks, apply the length filters, and write a token store that every\n"
                "rank of a run memory-maps (train --prepared). Recipe values can be overridden as in train.")
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("--data-dir", help="directory that the recipe's corpus paths are relative to")
    p.add_argument("--out", required=True, help="the store directory (replaced only if it holds a store)")
    p.add_argument("--tokenizer", help="use this sentencepiece model instead of training one")
    p.add_argument("--chunk-pairs", type=int, default=50_000, help="pairs tokenized at a time (bounds memory)")
    p.add_argument("--threads", type=int, help="sentencepiece encoding threads (default: every core)")
    p.set_defaults(func=cmd_prepare)

    p = command("translate", "translate a file (or stdin) line by line",
                "Translate one sentence per line. Writes exactly one line per input line, in input order\n"
                "(empty in, empty out), or with --nbest K > 1 the Moses n-best format 'i ||| text ||| rank'.")
    _add_models(p)
    p.add_argument("-i", "--input", help="input file (default: stdin)")
    p.add_argument("-o", "--output", help="output file, written when complete (default: stdout)")
    p.add_argument("--nbest", type=int, default=1, help="hypotheses per sentence (at most --beam)")
    p.add_argument("--prefix", help="target prefixes, one per input line (empty: none): each translation starts "
                                    "with its prefix, then the search continues")
    p.add_argument("--alignments", metavar="FILE", help="also write source-target word links per line, in the "
                                                          "Pharaoh format (0-0 1-2 ...), from cross-attention")
    p.add_argument("--alignment-layer", type=int, default=-2,
                   help="the decoder layer whose cross-attention (heads averaged) gives the links (default: the "
                        "penultimate; negative counts from the last)")
    p.add_argument("--chunk-lines", type=int, default=10000, help="lines read, translated and written at a time")
    _add_decoding(p)
    g = p.add_argument_group("sampling (instead of beam search)")
    g.add_argument("--sample", action="store_true", help="sample translations instead of searching")
    _add_sampling(g)
    g = p.add_argument_group("speculative decoding (greedy or sampling; the greedy output is exactly the model's)")
    g.add_argument("--speculate", choices=["heads"],
                   help="heads: the model's own draft heads (model.draft_heads) propose, the model verifies, in batches")
    g.add_argument("--draft", help="a smaller model (run directory) with the same architecture and vocabulary that "
                                   "proposes tokens; greedy output is unchanged, only faster when the draft agrees")
    g.add_argument("--draft-k", type=int, help="tokens proposed per round: by the --draft model (default 4), or by "
                                               "the first K draft heads (default: all the model has)")
    g.add_argument("--speculate-rows", dest="speculate_rows", type=int,
                   help="propose only while a batch has at most N unfinished sentences, plain steps before (default "
                        "4: verifying K proposals costs K + 1 steps' arithmetic, which large batches pay); 0: always")
    p.set_defaults(func=cmd_translate)

    p = command("serve", "serve a model over HTTP, with a page to try it",
                "An HTTP JSON API (POST /translate, GET /health, GET /info) and a page at /. Requests arriving "
                "together are translated in one batch; each reply equals translate's for that sentence.")
    _add_models(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="stop gathering requests into a batch at this many source tokens")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others to join it")
    p.add_argument("--no-batching", action="store_true", help="translate one request at a time, as it arrives")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger request bodies get 413")
    p.add_argument("--max-sentences", type=int, default=256, help="sentences per request")
    p.add_argument("--max-chars", type=int, default=2000, help="characters per sentence")
    p.add_argument("--max-beam", type=int, default=16, help="the largest beam (and n-best) a request may ask")
    p.add_argument("--alignment-layer", type=int, default=-2, help="decoder layer for alignments (default: penultimate)")
    _add_decoding(p)
    p.set_defaults(func=cmd_serve)

    p = command("export", "export a model to another runtime (CTranslate2, Hugging Face transformers)",
                "Write a model directory for another runtime: CTranslate2 (ctranslate2.Translator; tokenize with\n"
                "the spm.model written beside it), or Hugging Face transformers (a MarianMT model with its\n"
                "tokenizer: from_pretrained and pipeline('translation') load it).")
    p.add_argument("--model", required=True, help="run directory, or a .safetensors/.ckpt file inside one")
    p.add_argument("--format", choices=["ctranslate2", "huggingface"], default="ctranslate2")
    p.add_argument("-o", "--output", required=True,
                   help="output directory; an earlier export there is replaced once the new one is complete, any "
                        "other existing path refused")
    p.add_argument("--quantization", choices=["float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16"],
                   help="weight type in the exported model (default: as trained, float32)")
    p.set_defaults(func=cmd_export)

    p = command("generate", "continue prompts with a language model (sampling with the KV cache)",
                "Generate a continuation for each prompt (--prompt, or one per line of -i / stdin) with a\n"
                "decoder-only language model; one output line per prompt, in order. Sampling is seeded.")
    p.add_argument("--model", required=True, help="run directory of a language model (recipe data.task: lm)")
    _add_cpu_forms(p)
    p.add_argument("--prompt", help="one prompt (otherwise prompts are read from -i or stdin)")
    p.add_argument("-i", "--input", help="prompts, one per line (default: stdin)")
    p.add_argument("-o", "--output", help="output file, written when complete (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--greedy", action="store_true", help="the most probable token each step instead of sampling")
    _add_sampling(p)
    p.add_argument("--echo", action="store_true", help="write the prompt before its continuation")
    p.add_argument("--speculate", choices=["heads"],
                   help="heads: the model's draft heads propose, the model verifies (greedy output unchanged)")
    p.add_argument("--draft-k", type=int, help="with --speculate heads, propose with the first K heads (default: all)")
    p.add_argument("--speculate-rows", type=int, default=DecodeConfig.speculate_rows,
                   help="with --speculate heads, propose only while a batch has at most N unfinished prompts (0: always)")
    p.add_argument("--chunk-lines", type=int, default=10000, help="prompts read, generated and written at a time")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=cmd_generate)

    p = command("plot", "draw a run's learning curves as a PNG",
                "Loss, validation BLEU (or perplexity) and tokens/s against steps and wall time, from the run's\n"
                "logs (all its restarts), drawn into RUN/curves.png or -o FILE.")
    p.add_argument("model", metavar="RUN", help="run directory")
    p.add_argument("-o", "--output", help="the PNG to write (default: RUN/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = command("score", "score translations with sacreBLEU",
                "sacreBLEU (BLEU, chrF, TER) of a hypothesis file against one or more reference files,\n"
                "each with its signature; the same numbers as the sacrebleu command on the same files.")
    p.add_argument("--hyp", required=True, help="hypotheses, one per line")
    p.add_argument("--ref", required=True, nargs="+", help="reference file(s), line-aligned with --hyp")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=["bleu"])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--width", type=int, default=1, help="decimals printed (sacrebleu's default: 1)")
    p.set_defaults(func=cmd_score)

    p = command("evaluate", "translate a data split of the run's recipe and score it",
                "Translate the source side of the recipe's valid or test corpus with the run's model, score it\n"
                "with sacreBLEU, and save hypotheses and a JSON report under RUN_DIR/eval/.")
    p.add_argument("--model", required=True, help="run directory, or a .safetensors/.ckpt file inside one")
    p.add_argument("--split", choices=["test", "valid"], default="test")
    p.add_argument("--data-dir", help="directory that the recipe's corpus paths are relative to")
    p.add_argument("--out-dir", help="where to write hypotheses and the report (default: RUN_DIR/eval)")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=["bleu", "chrf"])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--width", type=int, default=2, help="decimals printed")
    _add_decoding(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("average", "average the last checkpoints of a run (the paper's checkpoint averaging)",
                "Average the weights of the last N periodic checkpoints of a run (or the given ones). With -o\n"
                "FILE.safetensors inside the run directory, translate --model FILE uses it; with -o DIR, DIR\n"
                "becomes a self-contained model directory (config, tokenizer, weights).")
    p.add_argument("--model", required=True, help="run directory")
    p.add_argument("--last", type=int, default=5, help="how many of the latest checkpoints (paper: 5 base, 20 big)")
    p.add_argument("--checkpoints", nargs="+", help="average exactly these .ckpt/.safetensors files instead")
    p.add_argument("-o", "--output", required=True, help="a .safetensors file, or a directory")
    p.set_defaults(func=cmd_average)
    return parser


def split_overrides(extra: list[str]) -> tuple[list[str], list[str]]:
    """Arguments argparse did not know: recipe overrides (--section.key=value) and the rest (errors)."""
    overrides = [a for a in extra if a.startswith("--") and "." in a.split("=")[0]]
    return overrides, [a for a in extra if a not in overrides]


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a handler holding the stream it was made with
    writes to a closed one once the caller swaps it, as a test harness does)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(debug: bool) -> None:
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides, unknown = split_overrides(extra)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and args.command not in ("train", "prepare"):
        parser.error(f"recipe overrides ({overrides[0]}) only apply to train and prepare")
    if getattr(args, "devices", None) not in (None, "auto"):
        try:
            args.devices = int(args.devices)
        except ValueError:
            parser.error(f"--devices {args.devices!r}: expected a number or auto")
    _setup_logging(args.debug)
    if not args.debug:
        warnings.filterwarnings("ignore", category=UserWarning)
    try:
        return args.func(args, overrides)
    except KeyboardInterrupt:
        print("translator: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except Exception as e:  # one clear line; --debug for the trace
        if args.debug:
            raise
        print(f"translator: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
