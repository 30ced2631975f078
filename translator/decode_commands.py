"""The commands that decode: translate, serve and generate (and the model loading and decoding options that
evaluate shares). The parser is in cli.py."""

from __future__ import annotations

import argparse
import contextlib
import logging

from .lines import chunks, one_line, output, read_input, translate_lines

log = logging.getLogger("translator")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return name


# -- translate ---------------------------------------------------------------------------------------------------

def _decode_options(recipe, args):
    import dataclasses

    options = dataclasses.replace(recipe.decode)
    for name in ("beam", "lenpen", "lp_form", "max_len_a", "max_len_b", "batch_tokens", "beam_stop", "cuda_graphs",
                 "mbr", "mbr_utility", "mbr_weights", "speculate_rows"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(options, name, value)
    if options.beam < 1 or options.batch_tokens < 1:
        raise ValueError("--beam and --batch-tokens must be positive")
    _check_speculate_rows(options.speculate_rows)
    if options.mbr == 1 or options.mbr < 0:
        raise ValueError(f"--mbr {options.mbr}: MBR chooses among at least 2 candidates (0: off)")
    if options.max_len_a < 0 or options.max_len_b < 0 or options.max_len_a == options.max_len_b == 0:
        raise ValueError(f"--max-len-a {options.max_len_a} --max-len-b {options.max_len_b}: the output limit "
                         "a * source length + b needs a, b >= 0, not both 0 (else every output is empty)")
    if options.cuda_graphs and _device(args.device) != "cuda":
        log.warning("cuda_graphs: no CUDA device here, so the fixed-shape decoding steps run uncaptured (slower)")
    return options


def _cpu_form(model, args):
    """The model quantized with --int8 or prepacked with --prepack (both refuse a model off the CPU)."""
    from .quantize import prepack, quantize_int8

    if getattr(args, "int8", False):
        return quantize_int8(model)
    return prepack(model) if getattr(args, "prepack", False) else model


def _check_speculate_rows(rows: int) -> None:
    if rows < 0:
        raise ValueError(f"--speculate-rows {rows}: must be 0 (propose at any batch size) or more")


def _check_speculation(args) -> None:
    """--draft-k needs something to propose. Speculative decoding promises greedy's output, which int8 cannot
    keep: PyTorch's dynamic quantization rounds a call's activations with one scale for all its rows, so a
    verification pass of K + 1 rows rounds otherwise than greedy's one row (13 of 100 test2016 lines differed on
    the Multi30k run)."""
    if args.draft_k is not None and not (args.speculate or getattr(args, "draft", None)):
        raise ValueError("--draft-k sets how many tokens --speculate heads or --draft proposes; pass one of them")
    if getattr(args, "int8", False) and (getattr(args, "speculate", None) or getattr(args, "draft", None)):
        option = "--speculate heads" if getattr(args, "speculate", None) else "--draft"
        raise ValueError(f"{option} with --int8 would not give greedy's output (int8 rounds a pass's activations with "
                         f"one scale for all its rows); use --prepack, which is exact")


def _load_for_translation(args):
    """The model of --model (an Ensemble when --model is given several times), its tokenizer and recipe;
    quantized with --int8, prepacked with --prepack."""
    from .checkpoint import load_model

    paths = args.model if isinstance(args.model, list) else [args.model]
    device = _device(args.device)
    for form in ("int8", "prepack"):
        if getattr(args, form, False) and device != "cpu":  # before loading anything
            raise ValueError(f"--{form} runs on the CPU; pass --device cpu")
    loaded = [load_model(path, device) for path in paths]
    model, tokenizer, recipe = loaded[0]
    if recipe.data.task == "lm":
        raise ValueError(f"{paths[0]} is a language model; it does not translate")
    for path, (_, other_tokenizer, other_recipe) in zip(paths[1:], loaded[1:]):
        if other_tokenizer.sp.serialized_model_proto() != tokenizer.sp.serialized_model_proto():
            raise ValueError(f"{path} has another sentencepiece model than {paths[0]}; an ensemble's models must "
                             "share one")
        if other_recipe.data.task == "lm":
            raise ValueError(f"{path} is a language model; it does not translate")
    models = [m for m, _, _ in loaded]
    models = [_cpu_form(m, args) for m in models]
    if len(models) > 1:
        from .inference import Ensemble

        model = Ensemble(models)
    else:
        model = models[0]
    return model, tokenizer, recipe


def _sampling(args) -> dict:
    """--temperature, --top-k, --top-p, checked whether or not they are used."""
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p}: must lie in (0, 1]")
    if args.top_k < 0:
        raise ValueError(f"--top-k {args.top_k}: must not be negative (0: no top-k filter)")
    if args.temperature <= 0:
        raise ValueError(f"--temperature {args.temperature}: must be positive")
    if not 0 <= args.epsilon < 1:
        raise ValueError(f"--epsilon {args.epsilon}: must lie in [0, 1) (0: no epsilon filter)")
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "epsilon": args.epsilon}


def _mode(args, options) -> tuple[str, dict | None]:
    sampling = _sampling(args)
    if args.sample:
        return "sample", sampling
    return ("greedy" if options.beam == 1 and args.nbest == 1 else "beam"), None


def cmd_translate(args: argparse.Namespace, overrides: list[str]) -> int:
    import itertools

    import torch

    _check_speculation(args)
    model, tokenizer, recipe = _load_for_translation(args)
    options = _decode_options(recipe, args)
    if args.mbr and (args.sample or args.speculate or args.draft or options.beam == 1):
        raise ValueError("--mbr chooses among beam search's candidates; drop --sample, --speculate, --draft and "
                         "--beam 1")
    if args.nbest > options.beam and not args.sample and not (options.mbr and options.beam > 1):
        raise ValueError(f"--nbest {args.nbest} exceeds --beam {options.beam}")
    if args.alignments and args.nbest > 1:
        raise ValueError("--alignments links the best translation only; drop --nbest")
    mode, sampling = _mode(args, options)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed) if args.sample else None
    draft = None
    if args.speculate == "heads":
        from .inference import check_draft_heads

        if mode == "beam":
            raise ValueError("--speculate heads decodes greedily or by sampling: pass --beam 1 or --sample")
        if args.draft or len(args.model) > 1 or args.prefix:
            raise ValueError("--speculate heads speeds up one model with its own heads: drop --draft, the extra "
                             "--model or --prefix")
        check_draft_heads(model, args.draft_k)
    if args.draft:
        from .checkpoint import load_model

        if mode == "beam":
            raise ValueError("--draft decodes greedily or by sampling: pass --beam 1 or --sample")
        if args.draft_k is not None and args.draft_k < 1:
            raise ValueError("--draft-k must be positive")
        if len(args.model) > 1 or args.prefix:
            raise ValueError("--draft speeds up one model without target prefixes; drop the extra --model or --prefix")
        draft, draft_tokenizer, _ = load_model(args.draft, next(model.parameters()).device)
        draft = _cpu_form(draft, args)
        if draft_tokenizer.sp.serialized_model_proto() != tokenizer.sp.serialized_model_proto():
            raise ValueError(f"{args.draft} has another sentencepiece model than {args.model[0]}; a draft must share it")
    lines = read_input(args.input)
    prefixes = read_input(args.prefix) if args.prefix else None
    count = truncated = 0
    with output(args.output) as out, (output(args.alignments) if args.alignments else _nothing()) as links:
        for chunk in chunks(lines, args.chunk_lines):
            prefix_chunk = None
            if prefixes is not None:
                prefix_chunk = list(itertools.islice(prefixes, len(chunk)))
                if len(prefix_chunk) < len(chunk):
                    raise ValueError(f"--prefix {args.prefix} has {count + len(prefix_chunk)} lines, fewer than the input")
            done = translate_lines(model, tokenizer, chunk, options, mode, 1 if args.sample else args.nbest, sampling,
                                   generator, draft, args.draft_k, prefix_chunk,
                                   args.alignment_layer if args.alignments else None, args.speculate == "heads")
            for i, hyps in enumerate(done.texts, count):
                if args.nbest > 1 and not args.sample:  # Moses n-best format: id ||| text ||| rank
                    out.writelines(f"{i} ||| {h} ||| {rank}\n" for rank, h in enumerate(hyps))
                else:
                    out.write(hyps[0] + "\n")
            if links is not None:
                links.writelines(line + "\n" for line in done.alignments)
            out.flush()
            count += len(chunk)
            truncated += done.truncated
        if prefixes is not None and next(prefixes, None) is not None:
            raise ValueError(f"--prefix {args.prefix} has more lines than the input ({count})")
    if truncated:
        from .inference import source_limit

        log.warning("translator: warning: %d of %d line(s) were longer than %d tokens and were truncated",
                    truncated, count, source_limit(model))
    return 0


@contextlib.contextmanager
def _nothing():
    yield None


# -- serve -------------------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    from .serve import Limits, Translator, serve

    model, tokenizer, recipe = _load_for_translation(args)
    recipe.decode = _decode_options(recipe, args)
    limits = Limits(args.max_body_bytes, args.max_sentences, args.max_chars, args.max_beam)
    if min(args.max_body_bytes, args.max_sentences, args.max_chars, args.max_beam, args.max_batch_tokens) < 1 \
            or args.max_wait_ms < 0:
        raise ValueError("serve's limits must be positive and --max-wait-ms not negative")
    if args.int8:
        log.warning("--int8: a reply can depend on the sentences batched with it (int8 rounds a batch's activations "
                    "with one scale); float32 and --prepack replies do not")
    serve(Translator(model, tokenizer, recipe, [str(m) for m in args.model], args.alignment_layer), args.host,
          args.port, limits=limits, batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
          batching=not args.no_batching)
    return 0


# -- generate ----------------------------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from .checkpoint import load_model
    from .inference import generate_ids

    _check_speculation(args)
    model, tokenizer, recipe = load_model(args.model, _device(args.device))
    model = _cpu_form(model, args)
    if recipe.data.task != "lm":
        raise ValueError(f"{args.model} is a translation model; generate needs a language model (data.task: lm); "
                         "use translate")
    if args.speculate == "heads":
        from .inference import check_draft_heads

        check_draft_heads(model, args.draft_k)
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be positive")
    _check_speculate_rows(args.speculate_rows)
    prompts = iter([args.prompt]) if args.prompt is not None else read_input(args.input)
    mode = "greedy" if args.greedy else "sample"
    sampling = _sampling(args)
    sampling = None if args.greedy else sampling
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    with output(args.output) as out:
        for chunk in chunks(prompts, args.chunk_lines):
            texts = [line.strip() for line in chunk]
            ids = [x if text else [] for x, text in zip(tokenizer.encode(texts), texts)]
            continuations = generate_ids(model, ids, args.max_new_tokens, mode, sampling, generator,
                                         speculate_heads=args.speculate == "heads", draft_k=args.draft_k,
                                         speculate_rows=args.speculate_rows)
            for text, cont in zip(texts, tokenizer.decode(continuations)):
                line = f"{text} {cont}".strip() if args.echo else cont
                out.write(one_line(line) + "\n")
            out.flush()
    return 0
