"""Training throughput and model FLOPs utilisation for transformer_base and transformer_big on real Multi30k
batches, side by side with a same-size Hugging Face MarianMT model (random init) on the same batches, with the
same loss and optimizer.

    python benchmarks/train_throughput.py --data-dir ../shared/data --device cuda      # H100: bf16
    python benchmarks/train_throughput.py --data-dir ../shared/data --device cpu --steps 3

FLOPs per step = 6 * (encoder params * source tokens + decoder and output params * target tokens)
               + 12 * d_model * (layers' attended pairs): QK^T and AV, forward and backward (x3), counting
                 every (query, key) pair of the padded batch (encoder: S^2, decoder: T^2 + T*S per sentence).
MFU = FLOPs per second / peak: the H100 SXM's dense bf16 989 TFLOP/s, or on a CPU a measured large fp32 matmul
rate (there is no published peak for a rented CPU; the number is labelled as such).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
from common import save_result  # noqa: E402
from hf_marian import marian_config  # noqa: E402

from translator import ModelConfig, build_model, count_parameters  # noqa: E402
from translator.config import load_recipe  # noqa: E402
from translator.data import PAD_ID, Tokenizer  # noqa: E402
from translator.batching import TokenBatches  # noqa: E402
from translator.store import StoreError, open_store, prepare  # noqa: E402
from translator.training import label_smoothed_loss  # noqa: E402

H100_BF16_PEAK = 989e12


def measured_cpu_peak() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 2048 ** 3 / (time.perf_counter() - start)


def step_flops(cfg: ModelConfig, batch: dict) -> float:
    d, V = cfg.d_model, cfg.vocab_size
    src_tokens, tgt_tokens = batch["src"].numel(), batch["tgt_in"].numel()
    enc_layer = 4 * d * d + 2 * d * cfg.d_ff
    dec_layer = 8 * d * d + 2 * d * cfg.d_ff
    S, T, B = batch["src"].shape[1], batch["tgt_in"].shape[1], batch["src"].shape[0]
    matmul = 6 * (cfg.n_encoder_layers * enc_layer * src_tokens + (cfg.n_decoder_layers * dec_layer + d * V) * tgt_tokens)
    attention = 12 * d * B * (cfg.n_encoder_layers * S * S + cfg.n_decoder_layers * (T * T + T * S))
    return matmul + attention


def pad_to_multiple(batch: dict, multiple: int) -> dict:
    """Widths of src, tgt_in and tgt_out rounded up to a multiple, with padding (which the masks and the loss skip)."""
    if multiple <= 1:
        return batch
    padded = dict(batch)
    for key in ("src", "tgt_in", "tgt_out"):
        width = batch[key].size(1)
        padded[key] = torch.nn.functional.pad(batch[key], (0, -width % multiple), value=PAD_ID)
    return padded


def set_inductor_options(options: list[str]) -> None:
    """KEY=VALUE pairs into torch._inductor.config (dotted keys reach sub-configs, e.g. triton.divisible_by_16)."""
    import ast

    import torch._inductor.config as config

    for option in options:
        key, _, value = option.partition("=")
        *path, name = key.split(".")
        target = config
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, name):
            raise SystemExit(f"--inductor {option}: torch._inductor.config has no {key}")
        setattr(target, name, ast.literal_eval(value))


def make_batches(data_dir: str, max_tokens: int, n: int, vocab_size: int, device: str) -> tuple[list[dict], int]:
    """The first n training batches of Multi30k en-de through the token store (prepared once per vocabulary)."""
    recipe = load_recipe(ROOT / "recipes/multi30k/en_de.yaml", [f"tokenizer.vocab_size={vocab_size}"])
    directory = Path(f"runs/throughput_store_{vocab_size}")
    try:
        store = open_store(directory, recipe, data_dir)
    except StoreError:
        prepare(recipe, data_dir, directory)
        store = open_store(directory, recipe, data_dir)
    batches = TokenBatches(store.pairs("train"), max_tokens, shuffle=True, seed=1)
    chosen = []
    for batch in batches:
        chosen.append({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
        if len(chosen) == n:
            break
    return chosen, Tokenizer(store.tokenizer_file).vocab_size


def time_training(forward, parameters, batches, device: str, dtype) -> list[float]:
    optimizer = torch.optim.Adam(parameters, lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)  # as training does
    times = []
    for batch in batches:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = label_smoothed_loss(forward(batch), batch["tgt_out"], 0.1, 0)
        (loss / batch["ntokens"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["transformer_base", "transformer_big"])
    parser.add_argument("--max-tokens", type=int, help="tokens per batch (default: 25000 on cuda, 4096 on cpu)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8000, help="joint BPE on Multi30k")
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile (dynamic shapes, "
                                                                "as `train.compile: true` does), after --warmup steps")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--pad-to-multiple", type=int, default=1,
                        help="round batch widths up to this multiple (fewer distinct shapes for --compile)")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="a torch._inductor.config setting for --compile, e.g. triton.divisible_by_16=False")
    args = parser.parse_args()
    set_inductor_options(args.inductor)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 matmuls are slower than fp32 on our CPU
    max_tokens = args.max_tokens or (25000 if device == "cuda" else 4096)
    batches, vocab = make_batches(args.data_dir, max_tokens, args.warmup + args.steps, args.vocab_size, device)
    timed = batches[args.warmup:]  # FLOPs count the batches as made, without --pad-to-multiple's extra padding
    batches = [pad_to_multiple(b, args.pad_to_multiple) for b in batches]
    peak = H100_BF16_PEAK if device == "cuda" else measured_cpu_peak()
    metrics: dict = {"max_tokens": max_tokens, "dtype": str(dtype).removeprefix("torch."), "vocab_size": vocab,
                     "steps": args.steps, "peak_flops": peak, "compiled": args.compile,
                     "pad_to_multiple": args.pad_to_multiple, "inductor_options": args.inductor,
                     "peak_source": "H100 SXM dense bf16" if device == "cuda" else "measured 2048^3 fp32 matmul"}
    tokens = sum(b["ntokens"] for b in timed)

    def measure(network, parameters, batches) -> float:  # seconds over the timed batches
        return sum(time_training(network, parameters, batches, device, dtype)[args.warmup:])

    for name in args.models:
        torch.manual_seed(0)
        cfg = ModelConfig.from_name(name, vocab_size=vocab, max_positions=512)
        model = build_model(cfg).to(device).train()
        flops = sum(step_flops(cfg, b) for b in timed)
        seconds = measure(lambda b: model(b["src"], b["tgt_in"]), model.parameters(), batches)
        row = {"parameters": count_parameters(model), "tokens_per_second": round(tokens / seconds, 1),
               "tflops_per_second": round(flops / seconds / 1e12, 3), "mfu": round(flops / seconds / peak, 4)}
        compiled_seconds = None
        if args.compile:  # dynamic shapes, as training compiles: one graph for all batch shapes
            compiled = torch.compile(model, dynamic=True)
            try:
                start = time.perf_counter()
                time_training(lambda b: compiled(b["src"], b["tgt_in"]), model.parameters(), batches[:args.warmup],
                              device, dtype)
                row["compile_warmup_seconds"] = round(time.perf_counter() - start, 1)
                step_times = time_training(lambda b: compiled(b["src"], b["tgt_in"]), model.parameters(), batches,
                                           device, dtype)[args.warmup:]
                compiled_seconds = sum(step_times)
                row.update(compiled_tokens_per_second=round(tokens / compiled_seconds, 1),
                           compiled_mfu=round(flops / compiled_seconds / peak, 4),
                           compiled_step_ms_median=round(1000 * sorted(step_times)[len(step_times) // 2], 1),
                           compiled_step_ms_max=round(1000 * max(step_times), 1))
            except Exception as error:  # an experiment (e.g. an --inductor setting) failing must not cost the run
                print(f"{name} compiled: failed: {error}", flush=True)
                row["compile_error"] = f"{type(error).__name__}: {error}"[:500]
            del compiled
            torch._dynamo.reset()
        del model
        if not args.skip_hf:
            from transformers import MarianMTModel

            torch.manual_seed(0)
            hf = MarianMTModel(marian_config(cfg)).to(device).train()
            forward = lambda b: hf(input_ids=b["src"], attention_mask=(b["src"] != 0).long(),
                                   decoder_input_ids=b["tgt_in"]).logits
            hf_seconds = measure(forward, hf.parameters(), batches)
            row["hf_tokens_per_second"] = round(tokens / hf_seconds, 1)
            row["speedup_vs_hf"] = round(hf_seconds / seconds, 3)
            if compiled_seconds:
                row["compiled_speedup_vs_hf"] = round(hf_seconds / compiled_seconds, 3)
            del hf
        metrics[name] = row
        print(name, row, flush=True)
    first = metrics[args.models[-1]]
    metrics.update(mfu=first["mfu"], tokens_per_second=first["tokens_per_second"],
                   speedup_vs_hf=first.get("speedup_vs_hf"), headline_model=args.models[-1])
    if args.compile:
        metrics.update(compiled_mfu=first.get("compiled_mfu"), compiled_tokens_per_second=first.get("compiled_tokens_per_second"),
                       compiled_speedup_vs_hf=first.get("compiled_speedup_vs_hf"))
    save_result(f"train_throughput_{device}", metrics, device, extra_versions=("transformers",))


if __name__ == "__main__":
    main()
