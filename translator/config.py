"""Model configuration: one dataclass and named presets, `ModelConfig.from_name(name, **overrides)`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be built: unknown name or field, wrong type, impossible sizes."""


ARCHS = ("encoder_decoder", "decoder_only")
SPECIAL_IDS = (0, 1, 2, 3)  # pad, bos, eos, unk: fixed by Tokenizer.train
ACTIVATIONS = ("relu", "gelu")


@dataclass
class ModelConfig:
    arch: str = "encoder_decoder"
    vocab_size: int | None = None  # target (or shared) vocabulary; filled from the tokenizer when training
    src_vocab_size: int | None = None  # None: the same vocabulary as the target
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1  # on each sublayer output and on embeddings + positions (Section 5.4)
    attention_dropout: float = 0.0  # on attention weights (not in the paper)
    activation_dropout: float = 0.0  # inside the feed-forward, after the activation (not in the paper)
    # Whole tokens' embeddings zeroed in training, source and target (word dropout: Marian's --dropout-src and
    # --dropout-trg, Sennrich & Zhang 2019 for small data; not in the paper).
    word_dropout: float = 0.0
    activation: str = "relu"
    norm_first: bool = False  # False: the paper's post-norm LN(x + Sublayer(x)); True: pre-norm
    max_positions: int = 1024
    share_embeddings: bool = True  # one matrix for source and target embeddings (needs one vocabulary)
    tie_output: bool = True  # the pre-softmax projection is the target embedding matrix
    prefix_lm: bool = False  # decoder-only translation: the source prefix attends bidirectionally
    draft_heads: int = 0  # extra heads proposing the next tokens for self-speculative decoding (0: the paper's model)
    # False: each head reads the last hidden state (Medusa). True: head k also reads head k-1's state and the token
    # proposed before its own (Hydra), so the heads propose one after another.
    draft_chain: bool = False
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def source_vocab_size(self) -> int | None:
        return self.src_vocab_size if self.src_vocab_size is not None else self.vocab_size

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if self.arch not in ARCHS:
            raise ConfigError(f"arch={self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        for name in ("d_model", "n_heads", "d_ff", "max_positions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ConfigError(f"d_model={self.d_model} must be even for sinusoidal positions")
        for name in ("dropout", "attention_dropout", "activation_dropout", "word_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must lie in [0, 1)")
        if self.n_decoder_layers < 1:
            raise ConfigError(f"n_decoder_layers={self.n_decoder_layers}: need at least one decoder layer")
        if self.arch == "encoder_decoder" and self.n_encoder_layers < 1:
            raise ConfigError(f"n_encoder_layers={self.n_encoder_layers}: an encoder-decoder needs at least one")
        if self.arch == "decoder_only" and self.n_encoder_layers != 0:
            raise ConfigError(
                f"arch=decoder_only has no encoder but n_encoder_layers={self.n_encoder_layers}: set it to 0"
            )
        if self.draft_heads < 0:
            raise ConfigError(f"draft_heads={self.draft_heads} must not be negative (0: none)")
        for name in ("vocab_size", "src_vocab_size"):
            value = getattr(self, name)
            if value is not None and value < 4:
                raise ConfigError(f"{name}={value}: too small to hold pad/bos/eos/unk")
        if self.prefix_lm and self.arch != "decoder_only":
            raise ConfigError("prefix_lm applies to decoder-only models (arch=decoder_only)")
        if self.share_embeddings and self.arch == "encoder_decoder" and self.source_vocab_size != self.vocab_size:
            raise ConfigError(
                f"share_embeddings needs one vocabulary, got src_vocab_size={self.src_vocab_size} "
                f"and vocab_size={self.vocab_size}"
            )
        specials = [self.pad_id, self.bos_id, self.eos_id, self.unk_id]
        if len(set(specials)) != 4 or min(specials) < 0:
            raise ConfigError(f"pad/bos/eos/unk ids must be distinct and non-negative, got {specials}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(name: str, value: Any, annotation: str) -> None:
    """Reject values of the wrong type early, with the field's name (YAML makes `1e-3` a string, say)."""
    allowed = [t.strip() for t in str(annotation).split("|")]
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
              "dict": lambda v: isinstance(v, dict), "list": lambda v: isinstance(v, list),
              "None": lambda v: v is None}
    if any(checks[t](value) for t in allowed if t in checks):
        return
    raise ConfigError(f"{name}={value!r} has type {type(value).__name__}; expected {annotation}")


# Table 3 of the paper for base and big; the others are common settings or sized for this project.
PRESETS: dict[str, dict[str, Any]] = {
    "transformer_base": dict(d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1),
    "transformer_big": dict(d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3),
    # fairseq's transformer_iwslt_de_en: the usual small model for IWSLT14 de-en (dropout 0.3 in its recipe).
    "transformer_iwslt": dict(d_model=512, n_heads=4, d_ff=1024, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3),
    # Multi30k on a CPU: 29k short sentences want a narrow, shallow model.
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3, dropout=0.1,
                  max_positions=256),
    "tiny": dict(d_model=32, n_heads=2, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0,
                 max_positions=128),
    # Decoder-only language models built from the same Block.
    "lm_small": dict(arch="decoder_only", d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=0,
                     n_decoder_layers=4, dropout=0.1, max_positions=512),
    "lm_tiny": dict(arch="decoder_only", d_model=32, n_heads=2, d_ff=64, n_encoder_layers=0,
                    n_decoder_layers=2, dropout=0.0, max_positions=128),
}


# -- Recipes: what to train on, how, and how to decode ---------------------------------------------------------

@dataclass
class DataConfig:
    task: str = "translation"  # translation | lm (next-token prediction on tgt_lang text, decoder-only)
    src_lang: str = "en"
    tgt_lang: str = "de"
    # A corpus is a file pattern relative to the data directory, e.g. "multi30k/train.{lang}.gz" (plain, .gz,
    # IWSLT .xml or WMT .sgm), or a Hugging Face datasets spec {hub: wmt14, config: de-en, split: train}, or a
    # list of such alternatives, the first available taken (local files, else the hub).
    train: str | dict | list | None = None
    valid: str | dict | list | None = None
    test: str | dict | list | None = None
    max_len: int = 256  # training pairs with a side longer than this (in tokens) are dropped, and counted
    # Training pairs whose longer side has more than max_ratio times the tokens of the shorter are dropped and
    # counted (Moses clean-corpus-n's filter; fairseq's WMT14 script uses 1.5). 0: off.
    max_ratio: float = 0.0
    block_size: int = 128  # lm: tokens per training sequence; lines are packed into blocks
    # A token store written by `translator prepare` (train --prepared sets it); None: train prepares one into
    # the run directory.
    prepared: str | None = None


@dataclass
class TokenizerConfig:
    type: str = "bpe"  # bpe | unigram (sentencepiece), one joint model for source and target
    vocab_size: int = 8000
    character_coverage: float = 1.0
    max_sentences: int = 2_000_000  # larger corpora are sampled (seeded) for tokenizer training
    # Subword regularization of training batches: {alpha: ..., nbest: ...}. BPE: each merge is dropped with
    # probability alpha (BPE-dropout; 0.1 in its paper). Unigram: a segmentation sampled with probability
    # ~ P^alpha among the nbest best (-1: 64). Validation, test and translation keep one segmentation.
    sampling: dict | None = None


@dataclass
class TrainConfig:
    seed: int = 1
    max_tokens: int = 4096  # per batch and device, padding included
    loader_workers: int = 0  # processes collating batches ahead of the step (0: in the training process)
    accumulate: int = 1  # batches per optimizer step: max_tokens x devices x accumulate ~ the paper's 25k
    max_steps: int = 100_000
    max_epochs: int | None = None
    # lr = lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)  (Section 5.3)
    lr_scale: float = 1.0
    warmup: int = 4000
    cooldown: int = 0  # last steps over which lr falls linearly to 0 (not in the paper; 0: its schedule)
    # inverse_sqrt: the paper's fall after the warmup | hold: the peak held until the cooldown (warmup-stable-decay,
    # not in the paper)
    schedule: str = "inverse_sqrt"
    adam_betas: list | None = None  # None: the paper's (0.9, 0.98)
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    # R-Drop (Liang et al. 2021, not in the paper): each batch runs twice under different dropout and the two
    # output distributions are pulled together by this weight times their symmetric KL (the paper's alpha;
    # 5 for its translation runs). Costs a second forward and backward per step. 0: off.
    rdrop: float = 0.0
    # Curriculum dropout (Morerio et al. 2017; not in the paper): every dropout rate of the model rises linearly
    # from 0 to its set value over the first this many steps, so the start, where the model underfits, runs
    # without the noise. 0: off (the rates hold from the first step).
    dropout_ramp: int = 0
    clip_norm: float = 0.0  # 0: no gradient clipping
    # 32 | bf16-mixed | 16-mixed (Lightning's names) | auto: bf16-mixed where the device multiplies bf16 natively
    # (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else 32.
    precision: str = "32"
    val_every: int = 1000  # steps between validations (0: once per epoch)
    val_bleu: str = "greedy"  # greedy | beam | none: how validation BLEU decodes
    val_max_sentences: int = 0  # 0: the whole validation set
    save_every: int = 1000  # steps between the checkpoints kept for averaging
    keep_last: int = 5  # how many of those to keep
    log_every: int = 50
    # Fine-tuning: start from this run's weights and tokenizer (its model settings must match; the optimizer
    # and schedule start anew). None: from scratch.
    init_from: str | None = None
    # Stop when validation BLEU (or loss, without BLEU) has not improved for this many validations; 0: never.
    # checkpoints/best.ckpt keeps the best.
    patience: int = 0
    compile: bool = False  # torch.compile: pays on fixed shapes (decoder-only blocks); batches by tokens recompile
    # Draft heads (model.draft_heads): their losses' weight beside the main loss (multi-token prediction), and
    # freeze: base trains the heads alone onto a trained model (with init_from), its weights unchanged.
    draft_weight: float = 0.3
    freeze: str = "none"  # none | base
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"


@dataclass
class DecodeConfig:
    beam: int = 4
    lenpen: float = 0.6
    lp_form: str = "gnmt"  # gnmt: ((5+|Y|)/6)^a as in the paper; length: |Y|^a as fairseq/HF/CTranslate2
    max_len_a: float = 1.0
    max_len_b: int = 50
    average_last: int = 5  # checkpoints averaged for the final model (the paper: 5 base, 20 big)
    batch_tokens: int = 8192
    # When a sentence's search stops. early: once it holds `beam` finished hypotheses (fairseq, Hugging Face,
    # CTranslate2). optimal: once no live beam can still beat the worst of them, whatever its length (the
    # paper's tensor2tensor search): never misses a better hypothesis the beam holds, and costs more steps.
    beam_stop: str = "early"
    # Decoding steps replayed from CUDA graphs (translator/cuda_graphs.py): one launch per step instead of one per
    # operation. On CPU the same fixed-shape steps run uncaptured, slower than the default.
    cuda_graphs: bool = False
    # Minimum Bayes risk decoding (translator/mbr.py; not in the paper): beam search (beam > 1) keeps its `mbr` best,
    # and the one with the highest expected utility (sentence BLEU or chrF) against them all is output. 0: off.
    # mbr_weights: each candidate's weight as a pseudo-reference, "model" (the softmax of the search's scores over
    # the N best, as N-best MBR in Kumar & Byrne 2004) or "uniform".
    mbr: int = 0
    mbr_utility: str = "bleu"
    mbr_weights: str = "model"
    # Speculative decoding (--speculate heads, --draft) proposes only while a batch has at most this many unfinished
    # sentences, and takes plain steps before: verifying K proposals multiplies a step's arithmetic by K + 1,
    # which small batches hide (their steps are bound by per-step overhead) and large ones pay. 0: at any size.
    # On a 2-core CPU, 4096-token batches ran at 0.46x greedy's speed with 0, 0.78x with 64, 0.87x with 16 and
    # 0.98x with 4 (benchmarks/README.md); a GPU, where arithmetic is cheaper, may gain from more (unmeasured).
    speculate_rows: int = 4


SECTIONS = {"data": DataConfig, "tokenizer": TokenizerConfig, "train": TrainConfig, "decode": DecodeConfig}
FORMAT_VERSION = 1  # of config.yaml in a run directory


@dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    tokenizer: TokenizerConfig
    train: TrainConfig
    decode: DecodeConfig

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "recipe") -> "Recipe":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
        raw = {k: v for k, v in raw.items() if k != "format_version"}
        unknown = sorted(set(raw) - {"model", *SECTIONS})
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; valid sections: model, "
                              f"{', '.join(SECTIONS)}")
        model = dict(raw.get("model") or {})
        preset = model.pop("preset", None)
        try:
            model_cfg = ModelConfig.from_name(preset, **model) if preset else ModelConfig.from_dict(model)
        except ConfigError as e:
            raise ConfigError(f"{source}: model: {e}") from None
        sections = {name: _section(kind, raw.get(name) or {}, f"{source}: {name}") for name, kind in SECTIONS.items()}
        recipe = cls(model=model_cfg, **sections)
        recipe.validate(source)
        return recipe

    def validate(self, source: str = "recipe") -> None:
        t, d, m = self.train, self.decode, self.model
        checks = [
            (self.data.task in ("translation", "lm"), f"data.task={self.data.task!r}: expected translation or lm"),
            (self.data.task != "lm" or self.model.arch == "decoder_only",
             "data.task=lm needs a decoder-only model (model.arch: decoder_only, e.g. preset lm_small)"),
            (self.data.task != "lm" or 1 < self.data.block_size < self.model.max_positions,
             f"data.block_size={self.data.block_size} must lie below model.max_positions={self.model.max_positions}"),
            (self.tokenizer.type in ("bpe", "unigram"), f"tokenizer.type={self.tokenizer.type!r}: expected bpe or unigram"),
            (t.precision in ("32", "bf16-mixed", "16-mixed", "bf16-true", "auto"), f"train.precision={t.precision!r}: "
             "expected 32, bf16-mixed, 16-mixed or auto"),
            (t.val_bleu in ("greedy", "beam", "none"), f"train.val_bleu={t.val_bleu!r}: expected greedy, beam or none"),
            (d.lp_form in ("gnmt", "length"), f"decode.lp_form={d.lp_form!r}: expected gnmt or length"),
            (d.beam_stop in ("early", "optimal"), f"decode.beam_stop={d.beam_stop!r}: expected early or optimal"),
            (d.mbr == 0 or d.mbr >= 2, f"decode.mbr={d.mbr}: expected 0 (off) or at least 2 candidates"),
            (d.mbr_utility in ("bleu", "chrf"), f"decode.mbr_utility={d.mbr_utility!r}: expected bleu or chrf"),
            (d.mbr_weights in ("model", "uniform"), f"decode.mbr_weights={d.mbr_weights!r}: expected model or uniform"),
            (self.data.task != "translation" or self.data.src_lang != self.data.tgt_lang,
             f"data.src_lang and data.tgt_lang are both {self.data.tgt_lang!r}: a translation needs two languages"),
            (not (self.data.task == "lm" and self.model.prefix_lm), "model.prefix_lm applies to translation "
             "(data.task: translation); a language model (data.task: lm) has no source prefix"),
            ((m.pad_id, m.bos_id, m.eos_id, m.unk_id) == SPECIAL_IDS, f"model.pad_id/bos_id/eos_id/unk_id are "
             f"{m.pad_id}/{m.bos_id}/{m.eos_id}/{m.unk_id}; the sentencepiece model fixes them at 0/1/2/3"),
            (t.max_tokens > 0 and t.accumulate > 0 and t.warmup > 0 and t.max_steps > 0,
             "train.max_tokens, accumulate, warmup and max_steps must be positive"),
            (0 <= t.cooldown < t.max_steps, f"train.cooldown={t.cooldown} must lie in [0, max_steps)"),
            (t.schedule in ("inverse_sqrt", "hold"), f"train.schedule={t.schedule!r}: expected inverse_sqrt or hold"),
            (0 <= t.label_smoothing < 1, f"train.label_smoothing={t.label_smoothing} must lie in [0, 1)"),
            (d.beam >= 1, f"decode.beam={d.beam} must be at least 1"),
            (d.max_len_a >= 0 and d.max_len_b >= 0 and (d.max_len_a, d.max_len_b) != (0, 0),
             f"decode.max_len_a={d.max_len_a}, max_len_b={d.max_len_b}: the output limit a * source length + b "
             "needs a, b >= 0, not both 0"),
            (self.data.max_ratio == 0 or self.data.max_ratio >= 1,
             f"data.max_ratio={self.data.max_ratio}: must be at least 1 (or 0: no ratio filter)"),
            (t.loader_workers >= 0, f"train.loader_workers={t.loader_workers} must not be negative"),
            (t.patience >= 0, f"train.patience={t.patience} must not be negative (0: no early stopping)"),
            (t.val_every >= 0, f"train.val_every={t.val_every} must not be negative (0: once per epoch)"),
            (t.freeze in ("none", "base"), f"train.freeze={t.freeze!r}: expected none or base"),
            (t.freeze == "none" or (m.draft_heads > 0 and t.init_from),
             "train.freeze=base trains draft heads onto a trained run: needs model.draft_heads > 0 and "
             "train.init_from (--init-from RUN)"),
            (t.draft_weight >= 0, f"train.draft_weight={t.draft_weight} must not be negative"),
            (t.rdrop >= 0, f"train.rdrop={t.rdrop} must not be negative (0: off)"),
            (t.dropout_ramp >= 0, f"train.dropout_ramp={t.dropout_ramp} must not be negative (0: off)"),
            (not (t.dropout_ramp and t.compile), "train.dropout_ramp changes the dropout rates every step, which "
             "would recompile a train.compile model each time: use one or the other"),
            (t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must not be negative"),
            (t.rdrop == 0 or t.freeze == "none", "train.rdrop needs dropout, which train.freeze=base turns off"),
            (self.tokenizer.vocab_size >= 8, f"tokenizer.vocab_size={self.tokenizer.vocab_size} is too small"),
            _sampling_check(self.tokenizer.sampling),
            (t.adam_betas is None or (len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas)),
             f"train.adam_betas={t.adam_betas}: expected two numbers in [0, 1)"),
        ]
        positive = [("data.max_len", self.data.max_len), ("train.log_every", t.log_every),
                    ("train.save_every", t.save_every), ("train.keep_last", t.keep_last),
                    ("decode.average_last", d.average_last), ("decode.batch_tokens", d.batch_tokens)]
        checks += [(value > 0, f"{name}={value} must be positive") for name, value in positive]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{source}: {message}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format_version": FORMAT_VERSION, "model": self.model.to_dict()}
        out.update({name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS})
        return out


def _sampling_check(sampling: dict | None) -> tuple[bool, str]:
    """tokenizer.sampling: None, or {alpha: a number in (0, 1], nbest: -1 (64) or a positive integer}."""
    if sampling is None:
        return True, ""
    unknown = sorted(set(sampling) - {"alpha", "nbest"})
    alpha, nbest = sampling.get("alpha"), sampling.get("nbest", -1)
    ok = (not unknown and isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha <= 1
          and isinstance(nbest, int) and not isinstance(nbest, bool) and (nbest == -1 or nbest >= 1))
    return ok, (f"tokenizer.sampling={sampling}: expected {{alpha: a number in (0, 1], nbest: a positive integer "
                f"(unigram only; -1: 64)}}" + (f"; unknown key(s) {', '.join(unknown)}" if unknown else ""))


def _section(kind: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
    for name, value in values.items():
        try:
            _check_type(name, value, known[name].type)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return kind(**values)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply 'section.key=value' strings (values parsed as YAML) to a raw recipe mapping."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().lstrip("-").split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.max_tokens=8192")
        section, name = parts
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override {item!r}: section {section!r} is not a mapping")
        raw[section][name] = yaml.safe_load(value)
    return raw


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.MarkedYAMLError as e:  # its message spans several lines, quoting the text: keep where and what
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({e.problem or e.context})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    version = raw.get("format_version", FORMAT_VERSION) if isinstance(raw, dict) else FORMAT_VERSION
    if version != FORMAT_VERSION:
        raise ConfigError(f"{path}: written by a translator with config format {version}; this one reads "
                          f"format {FORMAT_VERSION}")
    return Recipe.from_dict(apply_overrides(raw, list(overrides)), source=str(path))
