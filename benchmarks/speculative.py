"""Self-speculative decoding with draft heads against plain greedy, on Multi30k test2016.

    python benchmarks/speculative.py --model runs/bench_multi30k_en_de --data-dir ../shared/data

Trains K draft heads onto the run with its weights frozen (`translator train --init-from RUN
--model.draft_heads=K --train.freeze=base`, into RUN_heads<K> unless it exists; chained heads with --chain, into
RUN_chain<K>). With --distill, the heads learn the model's own greedy translations of the training sources
(`translator translate --beam 1` into RUN_distilled_corpus first, then `--data.train` on those files:
self-distillation, into ..._distilled): they are to predict what the model will say, not the references.
Then decodes the same sentences with plain greedy and with `--speculate heads`, one sentence at a time
(latency) and in 4096-token batches (throughput), with float32 linear layers as trained and (on the CPU)
prepacked for oneDNN (`--prepack`), taking turns within each repeat.
Counts lines that differ from plain greedy (must be 0), mean tokens per verification pass, acceptance, and BLEU.
With --draft RUN, also the draft-model path (a separate small model on the same tokenizer proposing --draft-k
tokens), one sentence at a time and batched; with --hf as well, the outside reference where it applies: the
same weights copied into Hugging Face MarianMT (translator.export.to_marian), `generate` greedy against
`generate(assistant_model=the draft)` one sentence at a time (assisted generation takes one sentence per call),
with the draft's default generation settings and with a constant --draft-k tokens per pass. With --fewer-heads K
..., also with only the first K heads proposing; with --rows N ..., also proposing only while a batch has at most
N unfinished sentences (--speculate-rows; the heads system uses the default). Results in
benchmarks/results/speculative_<device>.json; speedup_batch1 and speedup_batched are heads over plain greedy
with float32 layers, the _prepacked ones with prepacked layers, from the fastest repeat of each; _per_repeat and
_median give the ratio within each repeat and its median (steadier where the machine's speed drifts).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from translator.checkpoint import load_model  # noqa: E402
from translator.config import DecodeConfig  # noqa: E402
from translator.data import load_corpus  # noqa: E402
from translator.inference import self_speculative_ids, speculative_ids, translate_ids  # noqa: E402
from translator.quantize import prepack  # noqa: E402


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "translator.cli", *args], check=True)


def distill(run: str, out: Path, data_dir: str, device: str) -> Path:
    """The run's greedy translations of its training sources, as a corpus out/train.{src,tgt}."""
    recipe = load_model(run)[2]
    src, tgt = recipe.data.src_lang, recipe.data.tgt_lang
    corpus = load_corpus(recipe.data.train, src, tgt, data_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train.{src}").write_text("".join(line + "\n" for line in corpus.src), encoding="utf-8")
    cli("translate", "--model", run, "-i", str(out / f"train.{src}"), "-o", str(out / f"train.{tgt}"), "--beam", "1",
        "--device", device, *(["--prepack"] if device == "cpu" else []))
    return out / "train.{lang}"


def train_heads(run: str, out: Path, heads: int, steps: int, data_dir: str, device: str,
                train_files: Path | None, chain: bool) -> float:
    start = time.perf_counter()
    cli("train", "--config", str(Path(run) / "config.yaml"), "--init-from", run, "--out", str(out),
        "--data-dir", data_dir, "--device", device, f"--model.draft_heads={heads}", "--train.freeze=base",
        f"--train.max_steps={steps}", "--train.warmup=100", f"--train.cooldown={steps // 3}",
        f"--train.val_every={steps}", f"--train.save_every={steps}", "--no-progress",
        *([f"--data.train={train_files.resolve()}"] if train_files else []),
        *(["--model.draft_chain=true"] if chain else []))
    return time.perf_counter() - start


def hf_reference(model, draft, sources: list[list[int]], args, best: dict, outputs: dict, metrics: dict) -> None:
    """Hugging Face's assisted generation on the same weights, one sentence at a time: greedy alone, then with
    the draft as `assistant_model`, under the draft's default generation settings (recorded in the metrics; in
    transformers 4.57 up to 20 tokens a pass, the draft stopping early where its confidence falls under an
    adaptive threshold) and with a constant --draft-k tokens a pass and no early stop, as translator's draft does."""
    from decode_speed import run_hf
    from hf_marian import to_marian

    hf, hf_draft = to_marian(model).to(args.device), to_marian(draft).to(args.device)
    default = hf_draft.generation_config
    constant = copy.deepcopy(default)
    constant.num_assistant_tokens, constant.num_assistant_tokens_schedule = args.draft_k, "constant"
    constant.assistant_confidence_threshold = 0.0
    systems = {"hf_greedy": None, "hf_assisted": default, "hf_assisted_constant": constant}  # the draft's settings
    for _ in range(args.repeats):
        for name, config in systems.items():
            assisted = {}
            if config is not None:
                hf_draft.generation_config = copy.deepcopy(config)  # assisted generation adapts it as it runs
                assisted = {"assistant_model": hf_draft}
            start = time.perf_counter()
            out = run_hf(hf, sources, 1, 1, model.cfg, args.device, **assisted)
            seconds = time.perf_counter() - start
            best[name, "batch1"] = min(seconds, best.get((name, "batch1"), float("inf")))
            outputs[name, "batch1"] = out
            print(f"batch1   {name:20s} {seconds:7.2f}s  {len(sources) / seconds:7.1f} sent/s", flush=True)
    metrics["hf_draft_num_assistant_tokens_default"] = default.num_assistant_tokens
    metrics["hf_draft_schedule_default"] = default.num_assistant_tokens_schedule
    metrics["hf_draft_confidence_threshold_default"] = default.assistant_confidence_threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/bench_multi30k_en_de", help="a trained run directory")
    parser.add_argument("--heads-run", help="a run with draft heads (default: train them onto --model)")
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head-steps", type=int, default=600, help="training steps for the heads")
    parser.add_argument("--chain", action="store_true", help="chained heads (model.draft_chain)")
    parser.add_argument("--distill", action="store_true",
                        help="train the heads on the model's own greedy translations of the training sources")
    parser.add_argument("--fewer-heads", type=int, nargs="*", default=[],
                        help="also propose with only the first K heads (translate --speculate heads --draft-k K), "
                             "for each K given: a pass with fewer rows costs less")
    parser.add_argument("--rows", type=int, nargs="*", default=[],
                        help="also with --speculate-rows N for each N given (proposals only while a batch has at most N "
                             "unfinished sentences; 0: always); the default is DecodeConfig's")
    parser.add_argument("--draft", help="also a separate draft model (run directory) on the same tokenizer")
    parser.add_argument("--draft-k", type=int, default=4, help="tokens the draft model proposes per pass")
    parser.add_argument("--hf", action="store_true",
                        help="with --draft: Hugging Face greedy and assisted generation on the copied weights")
    parser.add_argument("--forms", nargs="+", choices=["float32", "prepacked"], default=["float32", "prepacked"],
                        help="linear layers as trained, and (on the CPU) prepacked for oneDNN")
    parser.add_argument("--settings", nargs="+", choices=["batch1", "batched"], default=["batch1", "batched"],
                        help="one sentence at a time, and 4096-token batches")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", help="result name (default: speculative_<device>)")
    args = parser.parse_args()
    if args.hf and not args.draft:
        parser.error("--hf compares assisted generation with a draft model: give --draft RUN")

    metrics: dict = {}
    heads_run = args.heads_run
    if heads_run is None:
        heads_run = f"{args.model.rstrip('/')}_{'chain' if args.chain else 'heads'}{args.heads}" + \
            ("_distilled" if args.distill else "")
        if not (Path(heads_run) / "model.safetensors").is_file():
            start = time.perf_counter()
            corpus = Path(f"{args.model.rstrip('/')}_distilled_corpus")  # shared by the kinds of heads
            train_files = distill(args.model, corpus, args.data_dir, args.device) if args.distill else None
            if args.distill:
                metrics["distill_seconds"] = round(time.perf_counter() - start, 1)
            metrics["head_training_seconds"] = round(train_heads(args.model, Path(heads_run), args.heads,
                                                                 args.head_steps, args.data_dir, args.device,
                                                                 train_files, args.chain), 1)
    model, tokenizer, recipe = load_model(heads_run, args.device)
    models = {"float32": model} if "float32" in args.forms else {}
    if args.device == "cpu" and "prepacked" in args.forms:
        models["prepacked"] = prepack(load_model(heads_run, args.device)[0])
    corpus = load_corpus(recipe.data.test, recipe.data.src_lang, recipe.data.tgt_lang, args.data_dir)
    lines, refs = corpus.src[:args.sentences], corpus.tgt[:args.sentences]
    sources = tokenizer.encode(lines)
    metrics.update({"sentences": len(lines), "draft_heads": model.cfg.draft_heads, "heads_run": heads_run,
                    "threads": torch.get_num_threads(), "speculate_rows_default": DecodeConfig.speculate_rows})

    settings = {"batch1": DecodeConfig(beam=1, batch_tokens=1), "batched": DecodeConfig(beam=1, batch_tokens=4096)}
    settings = {name: options for name, options in settings.items() if name in args.settings}
    systems = {}
    variants = {"": {}}  # how each heads system differs from the default, by its name after "heads"
    variants.update({f"_k{k}": {"k": k} for k in args.fewer_heads})
    variants.update({f"_rows{n}": {"rows": n} for n in args.rows})
    for form, m in models.items():
        suffix = "" if form == "float32" else f"_{form}"
        systems["greedy" + suffix] = lambda options, m=m: ([o[0] for o in translate_ids(m, sources, options, mode="greedy")], None)
        for key, change in variants.items():
            systems[f"heads{key}{suffix}"] = lambda options, m=m, change=change: self_speculative_ids(
                m, sources, dataclasses.replace(options, speculate_rows=change.get("rows", options.speculate_rows)),
                k=change.get("k"))
    if args.draft:
        draft = load_model(args.draft, args.device)[0]
        systems["draft_model"] = lambda options: speculative_ids(model, draft, sources, options, k=args.draft_k)
    best: dict = {}
    each: dict = {}  # every repeat's seconds
    outputs: dict = {}
    for _ in range(args.repeats):  # turns within each repeat: a slow spell of the machine falls on all alike
        for setting, options in settings.items():
            for name, run in systems.items():
                if "_rows" in name and setting == "batch1":  # one sentence is below any row limit: as "heads"
                    continue
                start = time.perf_counter()
                out, stats = run(options)
                seconds = time.perf_counter() - start
                best[name, setting] = min(seconds, best.get((name, setting), float("inf")))
                each.setdefault((name, setting), []).append(seconds)
                outputs[name, setting] = out
                if stats is not None and name.startswith("heads"):
                    k = name.removeprefix("heads")  # "" (the defaults), "_k<K>" or "_rows<N>", then "_prepacked"
                    metrics[f"tokens_per_pass{k}_{setting}"] = round(stats.tokens_per_pass, 3)
                    metrics[f"acceptance{k}_{setting}"] = round(stats.accepted / max(stats.proposed, 1), 3)
                if name == "draft_model":
                    metrics[f"draft_model_acceptance_{setting}"] = round(stats, 3)
                print(f"{setting:8s} {name:16s} {seconds:7.2f}s  {len(lines) / seconds:7.1f} sent/s", flush=True)
    if args.hf:
        hf_reference(model, draft, sources, args, best, outputs, metrics)

    import sacrebleu

    bleu = sacrebleu.BLEU()
    for (name, setting), seconds in best.items():
        metrics[f"{name}_{setting}_seconds"] = round(seconds, 3)
        metrics[f"{name}_{setting}_sentences_per_second"] = round(len(lines) / seconds, 1)
        out = outputs[name, setting]
        # Speculation against greedy with the same layers in the same library; each greedy against float32
        # greedy in translator (prepacking rounds differently; Hugging Face computes the same function).
        greedy = "greedy_prepacked" if name.endswith("_prepacked") and not name.startswith("greedy") else \
            "hf_greedy" if name.startswith("hf_assisted") else "greedy"
        if name != greedy and ((greedy, setting) in outputs or (greedy, "batch1") in outputs):
            metrics[f"{name}_{setting}_lines_differing_from_{greedy}"] = sum(
                a != b for a, b in zip(out, outputs[greedy, setting if (greedy, setting) in outputs else "batch1"]))
        metrics[f"{name}_{setting}_bleu"] = round(bleu.corpus_score(tokenizer.decode(out), [refs]).score, 2)
    metrics["bleu_signature"] = bleu.get_signature().format()
    for form in models:
        suffix = "" if form == "float32" else f"_{form}"
        for setting in settings:
            for key in variants:
                name = "heads" + key
                if (name + suffix, setting) not in each:
                    continue
                greedy, heads = each["greedy" + suffix, setting], each[name + suffix, setting]
                metrics[f"speedup_{setting}{suffix}{key}"] = round(min(greedy) / min(heads), 2)
                # On a machine whose speed drifts, the ratio within each repeat (the two ran minutes apart)
                # varies less than the ratio of the fastest repeats.
                metrics[f"speedup_{setting}{suffix}{key}_per_repeat"] = [round(g / h, 2) for g, h in zip(greedy, heads)]
                metrics[f"speedup_{setting}{suffix}{key}_median"] = round(statistics.median(
                    g / h for g, h in zip(greedy, heads)), 2)
    for (name, setting), seconds in each.items():
        metrics[f"{name}_{setting}_seconds_per_repeat"] = [round(t, 2) for t in seconds]
    for setting in settings if args.draft else ():
        metrics[f"speedup_draft_model_{setting}"] = round(best["greedy", setting] / best["draft_model", setting], 2)
    for name in ("hf_assisted", "hf_assisted_constant") if args.hf else ():
        metrics[f"speedup_{name}_batch1"] = round(best["hf_greedy", "batch1"] / best[name, "batch1"], 2)
    save_result(args.name or f"speculative_{args.device}", metrics, args.device, model=args.model,
                extra_versions=("transformers",) if args.hf else (),
                notes="greedy and heads decode the same sentences in turn within each repeat; the fastest repeat "
                      "counts; " + ("the heads trained with the model from the start (multi-token prediction)"
                                    if recipe.train.freeze == "none" else
                                    "the main head's weights are the model's own (heads trained with the base frozen"
                                    + (", on its own greedy translations)" if args.distill else ")")))


if __name__ == "__main__":
    main()
