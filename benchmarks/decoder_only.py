"""Decoder-only vs encoder-decoder translation at (about) equal parameter count on Multi30k en->de, and
speculative decoding for both with a small draft model on the same vocabulary.

    python benchmarks/decoder_only.py --data-dir ../shared/data --steps 1800 [--device cuda]

Both translation models train with the same settings (recipes/multi30k/en_de.yaml and en_de_decoder_only.yaml:
same tokenizer, and the decoder-only recipe's batches, steps and schedule); the decoder-only model reads `BOS source EOS target EOS` with a bidirectional (prefix-LM) source.
Speculative decoding is timed one sentence at a time, greedy, against the target model's own greedy
decoding on the same sentences; its output must be identical.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_result  # noqa: E402

from translator import count_parameters  # noqa: E402
from translator.checkpoint import TOKENIZER, load_model, read_recipe  # noqa: E402
from translator.cli import score_files, translate_lines  # noqa: E402
from translator.config import DecodeConfig, load_recipe  # noqa: E402
from translator.data import load_corpus  # noqa: E402
from translator.inference import speculative_ids, translate_ids  # noqa: E402
from translator.training import fit  # noqa: E402

ENCODER_DECODER, DECODER_ONLY = "recipes/multi30k/en_de.yaml", "recipes/multi30k/en_de_decoder_only.yaml"
MODELS = {
    # name: (recipe, overrides). The encoder-decoder is the `small` preset (3+3 layers); the decoder-only recipe
    # has 7 layers, about as many parameters (a decoder layer without cross-attention is an encoder-sized layer).
    "encoder_decoder": (ENCODER_DECODER, []),
    "decoder_only": (DECODER_ONLY, []),
    "draft_encoder_decoder": (ENCODER_DECODER, ["model.d_model=128", "model.d_ff=512", "model.n_encoder_layers=2",
                                                "model.n_decoder_layers=1"]),
    "draft_decoder_only": (DECODER_ONLY, ["model.d_model=128", "model.d_ff=512", "model.n_decoder_layers=2"]),
}


def train(name: str, args, tokenizer_from: Path | None) -> Path:
    run = Path(args.out) / name
    if (run / "model.safetensors").exists() and read_recipe(run).train.max_steps == args.steps:
        return run  # trained by an earlier run of this benchmark with the same settings
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    if tokenizer_from is not None:  # one vocabulary for all: drafts must share the target's
        shutil.copyfile(tokenizer_from, run / TOKENIZER)
    path, overrides = MODELS[name]
    if path == ENCODER_DECODER:
        # The decoder-only recipe's batches, schedule, precision and dropout for both: en_de.yaml has since moved
        # to 2048-token batches, bf16 and more dropout; this comparison keeps the settings it was measured with.
        shared = load_recipe(DECODER_ONLY)
        overrides = overrides + [f"train.{key}={getattr(shared.train, key)}"
                                 for key in ("max_tokens", "max_steps", "warmup", "lr_scale", "cooldown", "precision")] \
            + [f"model.{key}={getattr(shared.model, key)}" for key in ("dropout", "word_dropout")]
    recipe = load_recipe(path, overrides)
    # The recipe's schedule shrunk to --steps: warmup and cooldown in proportion, and the same peak learning
    # rate (the inverse-sqrt peak grows as warmup^-0.5, so lr_scale shrinks with it).
    t, scale = recipe.train, args.steps / recipe.train.max_steps
    warmup = max(1, round(t.warmup * scale))
    overrides = overrides + [f"train.max_steps={args.steps}", f"train.warmup={warmup}",
                             f"train.lr_scale={t.lr_scale * (warmup / t.warmup) ** 0.5:.4f}",
                             f"train.cooldown={round(t.cooldown * scale)}", f"train.val_every={args.steps}",
                             "train.val_bleu=none", f"train.save_every={args.steps}"]
    if args.device == "cuda":
        overrides.append("train.precision=bf16-mixed")
    start = time.perf_counter()
    fit(load_recipe(path, overrides), run, data_dir=args.data_dir, progress_bar=False,
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1)
    (run / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return run


@torch.no_grad()
def speculative_run(target, draft, sources: list[list[int]], k: int) -> dict:
    """Greedy, one sentence at a time: the target alone, then with the draft (the outputs must be identical)."""
    options = DecodeConfig(beam=1)
    start = time.perf_counter()
    plain = [translate_ids(target, [s], options, mode="greedy")[0][0] for s in sources]
    plain_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fast, acceptance = speculative_ids(target, draft, sources, options, k=k)
    fast_seconds = time.perf_counter() - start
    return {"k": k, "sentences": len(sources), "greedy_seconds": round(plain_seconds, 2),
            "speculative_seconds": round(fast_seconds, 2), "speedup": round(plain_seconds / fast_seconds, 3),
            "acceptance_rate": round(acceptance, 3),
            "identical_outputs": sum(a == b for a, b in zip(plain, fast)) / len(sources)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", help="where the four runs go (default: runs/bench_decoder_only[_cuda])")
    parser.add_argument("--steps", type=int, default=600, help="training steps for each model")
    parser.add_argument("--speculative-sentences", type=int, default=200)
    parser.add_argument("-k", type=int, default=4, help="draft tokens per speculation round")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda trains in bf16-mixed")
    args = parser.parse_args()
    args.out = args.out or "runs/bench_decoder_only" + ("_cuda" if args.device == "cuda" else "")

    # The drafts first: the first run trains the tokenizer that all share.
    runs = {"draft_encoder_decoder": train("draft_encoder_decoder", args, None)}
    tokenizer_file = runs["draft_encoder_decoder"] / TOKENIZER
    for name in ("draft_decoder_only", "encoder_decoder", "decoder_only"):
        runs[name] = train(name, args, tokenizer_file)

    recipe = load_recipe(ENCODER_DECODER)
    test = load_corpus(recipe.data.test, recipe.data.src_lang, recipe.data.tgt_lang, args.data_dir)
    metrics: dict = {"steps": args.steps}
    models = {}
    for name, run in runs.items():
        model, tokenizer, run_recipe = load_model(run, args.device)
        models[name] = model
        row = {"parameters": count_parameters(model), "train_seconds": float((run / "train_seconds.txt").read_text())}
        if not name.startswith("draft"):
            for mode in ("greedy", "beam"):
                start = time.perf_counter()
                hyps = translate_lines(model, tokenizer, test.src, run_recipe.decode, mode).texts
                row[f"{mode}_sentences_per_second"] = round(len(test) / (time.perf_counter() - start), 1)
                hyp_file = run / f"test.{mode}.hyp"
                hyp_file.write_text("".join(h[0] + "\n" for h in hyps))
                ref_file = run / "test.ref"
                ref_file.write_text("".join(t + "\n" for t in test.tgt))
                (bleu, signature), = score_files(str(hyp_file), [str(ref_file)], ["bleu"])
                row[f"{mode}_bleu"] = round(bleu.score, 2)
                row["bleu_signature"] = signature
        metrics[name] = row
        print(name, row, flush=True)

    sources = tokenizer.encode(test.src[: args.speculative_sentences])  # all runs share one tokenizer
    for arch in ("encoder_decoder", "decoder_only"):
        metrics[f"speculative_{arch}"] = speculative_run(models[arch], models[f"draft_{arch}"], sources, args.k)
        print(f"speculative {arch}", metrics[f"speculative_{arch}"], flush=True)
    save_result(f"decoder_only_vs_encoder_decoder_{args.device}", metrics, args.device,
                recipes=[ENCODER_DECODER, DECODER_ONLY])


if __name__ == "__main__":
    main()
