"""Training with PyTorch Lightning: a thin LightningModule around the model, a DataModule, and `fit`.

Teacher forcing (decoder input = target shifted right behind BOS), label-smoothed cross-entropy that
ignores padding, Adam (0.9, 0.98, 1e-9) with the paper's warmup / inverse square root schedule,
validation loss, perplexity and sacreBLEU. Distribution (DDP, FSDP, several nodes) is Lightning's own.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import sacrebleu
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .callbacks import LogLines, PeriodicCheckpoints, StartupReport, quiet_lightning
from .checkpoint import (CHECKPOINTS, CONFIG, TOKENIZER, AtomicCheckpointIO, CheckpointError, check_readable,
                         export_weights, load_model, read_recipe, write_recipe)
from .config import Recipe
from .data import Tokenizer
from .batching import BlockBatches, Prefetched, ResumableBatches, TokenBatches
from .store import MANIFEST, Store, StoreError, open_store, prepare, settings
from .subword import SubwordSampling
from .inference import translate_ids
from .memory import hold_freed_memory
from .model import MultiHeadAttention, build_model

log = logging.getLogger(__name__)


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    """Label-smoothed cross-entropy with its gradient written out, softmax - smoothed one-hot. The forward keeps
    the float32 log-probabilities (one fused log_softmax) and the backward exponentiates them in place: three
    passes over the (tokens x vocabulary) logits in all, where autograd's log_softmax, gather and mean take eight
    and a logsumexp-based version five; on a CPU those passes are a large part of a small model's step."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, epsilon: float, pad_id: int):
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        smooth = -logp.mean(dim=-1)
        keep = (target != pad_id).float()  # a multiplication, not boolean indexing: no host sync
        loss = ((1.0 - epsilon) * nll + epsilon * smooth) * keep
        ctx.save_for_backward(logp, target, keep)
        ctx.epsilon, ctx.dtype = epsilon, logits.dtype
        nll_sum = (nll * keep).sum()
        ctx.mark_non_differentiable(nll_sum)
        return loss.sum(), nll_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        logp, target, keep = ctx.saved_tensors
        eps, vocab = ctx.epsilon, logp.size(-1)
        scale = (grad_loss * keep).unsqueeze(-1)  # (N, 1)
        grad = logp.exp_().sub_(eps / vocab).mul_(scale)  # in place: the log-probabilities are used once
        grad.scatter_add_(-1, target.unsqueeze(-1), -(1.0 - eps) * scale)
        return grad.to(ctx.dtype), None, None, None


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over non-pad target tokens of the label-smoothed loss (Section 5.4) and of the plain NLL (not
    differentiable). Smoothing spreads epsilon uniformly over the vocabulary, as torch's cross_entropy does."""
    vocab = logits.size(-1)
    return _LabelSmoothedCrossEntropy.apply(logits.reshape(-1, vocab), target.reshape(-1), epsilon, pad_id)


def symmetric_kl(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum over the kept positions of KL(p||q) + KL(q||p), where p and q are the output distributions of the
    first and second half of the batch (R-Drop's two passes over the same sentences)."""
    logp, logq = torch.log_softmax(logits.float(), dim=-1).chunk(2)
    return (((logp.exp() - logq.exp()) * (logp - logq)).sum(-1) * keep).sum()


def inverse_sqrt_lr(d_model: int, warmup: int, scale: float = 1.0, cooldown: int = 0, max_steps: int = 0,
                    hold: bool = False):
    """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step counting from 1 (Section 5.3).
    With cooldown > 0 (not in the paper), the rate also falls linearly to zero over the last `cooldown` of
    `max_steps`, so a fixed-budget run ends converged rather than mid-stride. With `hold` (not in the paper), the
    rate stays at its peak from the end of the warmup until the cooldown instead of falling as step^-0.5
    (warmup-stable-decay: Zhai et al. 2022, Hägele et al. 2024)."""
    def lr(step: int) -> float:
        step = max(step, 1)
        rate = scale * d_model ** -0.5 * min(warmup ** -0.5 if hold else step ** -0.5, step * warmup ** -1.5)
        if cooldown > 0 and max_steps > 0:
            rate *= min(1.0, max(0.0, (max_steps - step + 1) / cooldown))
        return rate
    return lr


def native_bf16(accelerator: str | None) -> bool:
    """Whether the device training runs on multiplies bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16
    or AMX. Other CPUs emulate bf16 matmuls, slower than float32 ones."""
    if accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:  # private helpers, the ones torch's own CPU autocast checks use
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except AttributeError:
        return False


def resolve_precision(precision: str, accelerator: str | None) -> str:
    """train.precision as Lightning takes it: `auto` is bf16-mixed where bf16 is native (a Multi30k step on a
    2-core CPU with AVX512-BF16: 1.46x float32's speed, benchmarks/train_precision.py), else 32."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16(accelerator) else "32"


def dropout_rates(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, float]]:
    """Every non-zero dropout rate of the model as (module, attribute, set value): the dropout modules' p and the
    rate attention passes to its kernel."""
    rates = []
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            rates.append((module, "p", module.p))
        elif isinstance(module, MultiHeadAttention):
            rates.append((module, "dropout", module.dropout))
    return [entry for entry in rates if entry[2] > 0]


def rng_states() -> dict[str, Any]:
    """This process's random generators: the CPU's and every visible CUDA device's."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if states.get("cuda") and torch.cuda.is_available():
        if len(states["cuda"]) != torch.cuda.device_count():
            log.warning("resuming on %d CUDA device(s) with the random state of %d: dropout will not repeat exactly",
                        torch.cuda.device_count(), len(states["cuda"]))
        else:
            torch.cuda.set_rng_state_all(states["cuda"])


class TranslationModule(L.LightningModule):
    """The model, its loss and optimizer, and validation with BLEU. Holds no data logic."""

    def __init__(self, recipe: dict[str, Any], tokenizer_file: str | None = None,
                 references: list[str] | None = None):
        super().__init__()
        self.save_hyperparameters({"recipe": recipe})
        self.recipe = Recipe.from_dict(recipe)
        self.model = build_model(self.recipe.model)
        if self.recipe.train.freeze == "base":  # train the draft heads alone
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(name.startswith("draft_heads."))
        if self.recipe.train.compile:  # in place: the state dict keeps its keys (torch.compile's wrapper would
            self.model.compile()       # prefix them with _orig_mod., which nothing could load)
        self.dropout_rates = dropout_rates(self.model)  # the set values, which train.dropout_ramp scales
        self.tokenizer = Tokenizer(tokenizer_file) if tokenizer_file else None
        self.references = references or []  # validation targets, by line
        self._last_step_time: float | None = None  # for tokens/s; None after validation and at the start
        self._update_tokens = 0  # target tokens of this rank's micro-batches since the last optimizer step
        self._val: dict[str, Any] = {}
        self.data_position: tuple[int, int] | None = None  # (epoch, index) of the last batch trained
        self.tokens_seen = 0  # target tokens trained on, across resumes
        self._fit_start = time.perf_counter()
        self.resume_position: tuple[int, int] | None = None  # where a resumed run's data continues

    # -- training ------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last hidden states, teacher-forced (model.logits makes them logits)."""
        if self.recipe.model.arch == "encoder_decoder":  # translation, teacher-forced
            return self.model.states(batch["src"], batch["tgt_in"])
        # Next-token prediction: a language model, or translation as one sequence (loss on the target only).
        return self.model.states(batch["tgt_in"], batch.get("prefix_len") if self.recipe.model.prefix_lm else None)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        cfg, t = self.recipe.model, self.recipe.train
        if t.freeze == "base":  # the heads learn from the features they will read when decoding: no dropout
            self.model.eval()
        if t.dropout_ramp:  # curriculum dropout: the rates of this step, a function of the step alone (exact resume)
            scale = min(1.0, (self.global_step + 1) / t.dropout_ramp)
            for module, name, rate in self.dropout_rates:
                setattr(module, name, rate * scale)
            self.log("dropout_scale", scale)
        if t.rdrop:  # both copies in one pass: dropout draws its masks independently per row
            batch = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        h = self(batch)
        logits = self.model.logits(h)
        loss_sum, nll_sum = label_smoothed_loss(logits, batch["tgt_out"], t.label_smoothing, cfg.pad_id)
        if cfg.draft_heads:  # multi-token prediction: head k at position i learns target i + k
            targets = batch["tgt_out"]
            heads = [label_smoothed_loss(self.model.logits(g), targets[:, k:], t.label_smoothing, cfg.pad_id)[0]
                     for k, g in enumerate(self.model.draft_states(h, targets), 1)]
            # Targets too short for a head: no loss, but a graph (a frozen base has no other).
            heads += [sum(p.sum() for p in head.parameters()) * 0.0 for head in self.model.draft_heads[len(heads):]]
            head_loss = torch.stack(heads).mean()
            self.log("train/draft_loss", head_loss / batch["ntokens"] / (2 if t.rdrop else 1))
            loss_sum = head_loss if t.freeze == "base" else loss_sum + t.draft_weight * head_loss
        if t.rdrop:  # the paper's loss, CE1 + CE2 + alpha/2 (KL(p1||p2) + KL(p2||p1)), halved: one batch's worth
            keep = (batch["tgt_out"] != cfg.pad_id).chunk(2)[0]
            loss_sum, nll_sum = loss_sum / 2 + t.rdrop / 4 * symmetric_kl(logits, keep), nll_sum / 2
        ntokens = batch["ntokens"]
        loss = loss_sum / ntokens  # this batch's mean, for the log
        if not torch.isfinite(loss):  # before any optimizer step: the weights and checkpoints stay good
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.global_step + 1}; stopped. "
                                     f"The last good checkpoint is kept; lower train.lr_scale or raise train.warmup.")
        self.data_position = batch.get("position")
        self.tokens_seen += ntokens * self.trainer.world_size
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("tok_s", ntokens * self.trainer.world_size / (now - self._last_step_time), prog_bar=True)
        self._last_step_time = now
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/nll", nll_sum / ntokens)
        self.log("global_step", float(self.global_step))
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        self._update_tokens += ntokens
        # The sum, scaled by a constant; on_before_optimizer_step divides by the update's target tokens.
        return loss_sum / self.recipe.train.max_tokens

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Normalise the update by its target tokens over every micro-batch and rank, as fairseq does: Lightning
        averages micro-batches and DDP averages ranks, which would give the tokens of a small or heavily padded
        batch more weight than the others. Runs before gradient clipping."""
        tokens = torch.tensor(float(self._update_tokens), device=self.device)
        if self.trainer.world_size > 1:
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        scale = self.recipe.train.max_tokens * self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
        self._update_tokens = 0

    def configure_optimizers(self):
        t = self.recipe.train
        betas = tuple(t.adam_betas) if t.adam_betas else (0.9, 0.98)
        # The fused kernel: on a CPU it takes 5.5 ms of a `small` step's 434 against 13.3 for the default
        # (benchmarks/train_optimizer.py); the same update up to rounding.
        fused = self.device.type in ("cuda", "cpu")
        cls = torch.optim.AdamW if t.weight_decay else torch.optim.Adam
        optimizer = cls(self.parameters(), lr=1.0, betas=betas, eps=t.adam_eps, weight_decay=t.weight_decay,
                        fused=fused or None)
        lr = inverse_sqrt_lr(self.recipe.model.d_model, t.warmup, t.lr_scale, t.cooldown, self.trainer.max_steps,
                             hold=t.schedule == "hold")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr(step + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- exact resume ----------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout masks continue where they stopped, on every rank and device: each rank's generators.
        states = [rng_states()]
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():  # every rank saves (Lightning
            states = [None] * self.trainer.world_size                           # writes rank 0's copy)
            torch.distributed.all_gather_object(states, rng_states())
        checkpoint["rng_states"] = states
        if self.data_position is not None:  # the next batch to train
            checkpoint["data_position"] = [self.data_position[0], self.data_position[1] + 1]
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            states = checkpoint["rng_states"]
            restore_rng_states(states[self.global_rank] if self.global_rank < len(states) else states[0])
        elif "torch_rng_state" in checkpoint:  # checkpoints of earlier versions kept the CPU generator only
            torch.set_rng_state(checkpoint["torch_rng_state"])
        if "data_position" in checkpoint:
            self.resume_position = tuple(checkpoint["data_position"])
        self.tokens_seen = checkpoint.get("tokens_seen", 0)

    # -- validation --------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val = {"nll": torch.zeros((), device=self.device), "tokens": 0, "hyps": {}}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        cfg = self.recipe.model
        _, nll_sum = label_smoothed_loss(self.model.logits(self(batch)), batch["tgt_out"], 0.0, cfg.pad_id)
        self._val["nll"] += nll_sum
        self._val["tokens"] += batch["ntokens"]
        mode = self.recipe.train.val_bleu
        if mode != "none" and "src" in batch and self.tokenizer is not None and self.references:
            src = [row[row != cfg.pad_id][:-1].tolist() for row in batch["src"]]  # drop padding and EOS
            out = translate_ids(self.model, src, self.recipe.decode, mode=mode)
            texts = self.tokenizer.decode([o[0] for o in out])
            self._val["hyps"].update(zip(batch["index"].tolist(), texts))

    def on_train_start(self) -> None:
        self._fit_start = time.perf_counter()

    def on_validation_end(self) -> None:
        self._last_step_time = None  # the next step's tokens/s must not include validation

    def on_validation_epoch_end(self) -> None:
        totals = torch.stack([self._val["nll"].float(), torch.tensor(float(self._val["tokens"]), device=self.device)])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        self.log("val/elapsed_s", time.perf_counter() - self._fit_start, sync_dist=False)  # for learning curves
        if totals[1] > 0:
            loss = (totals[0] / totals[1]).item()
            self.log("val/loss", loss, prog_bar=True, sync_dist=False)
            self.log("val/ppl", math.exp(min(loss, 50.0)), sync_dist=False)
        hyps = self._val["hyps"]
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[dict[int, str]] = [{} for _ in range(self.trainer.world_size)]
            torch.distributed.all_gather_object(gathered, hyps)
            hyps = {k: v for part in gathered for k, v in part.items()}
        if hyps:
            lines = sorted(hyps)
            bleu = sacrebleu.corpus_bleu([hyps[i] for i in lines], [[self.references[i] for i in lines]])
            self.log("val/bleu", bleu.score, prog_bar=True, sync_dist=False)


class RunData(L.LightningDataModule):
    """Loaders built once Lightning knows this process's rank; the training loader resumes mid-epoch."""

    def __init__(self, make_train: Callable[[int, int], ResumableBatches],
                 make_valid: Callable[[int, int], ResumableBatches] | None, workers: int = 0):
        super().__init__()
        self.make_train, self.make_valid, self.workers = make_train, make_valid, workers

    def train_dataloader(self) -> ResumableBatches | Prefetched:
        loader = self.make_train(self.trainer.global_rank, self.trainer.world_size)
        loader.resume_at = self.trainer.lightning_module.resume_position  # restored before loaders are built
        return Prefetched(loader, self.workers) if self.workers else loader

    def val_dataloader(self) -> ResumableBatches | list:
        return [] if self.make_valid is None else self.make_valid(self.trainer.global_rank, self.trainer.world_size)


def _check_new_run_dir(run_dir: Path) -> None:
    """A new run goes into a new or empty directory, or one left by a start that wrote no checkpoint yet:
    never over another run, nor over files it did not write (a recipe of the same name, say)."""
    if not run_dir.exists():
        return
    if any(run_dir.glob(f"{CHECKPOINTS}/*.ckpt")):
        raise CheckpointError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --out")
    ours = {CONFIG, TOKENIZER, CHECKPOINTS, DATA, "logs", "tensorboard"}
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in ours)
    config = run_dir / CONFIG
    if config.is_file() and "format_version:" not in config.read_text(encoding="utf-8", errors="replace"):
        foreign.insert(0, CONFIG)  # not a recipe as a run writes it: the user's own file
    if foreign:
        raise CheckpointError(f"{run_dir}: holds files a run did not write ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}); train into a new or empty --out directory")


def _rank() -> int:
    """This process's global rank as set by a launcher (Lightning's, torchrun, SLURM), before Lightning runs."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return int(os.environ.get("NODE_RANK", 0)) * int(os.environ.get("LOCAL_WORLD_SIZE", 1)) + int(os.environ.get("LOCAL_RANK", 0))


def _wait_for(opened: Callable[[], Store], seconds: float = 3 * 3600) -> Store:
    """What `opened` gives once it stops raising StoreError (rank 0 preparing), or a timeout naming why."""
    deadline = time.time() + seconds
    while True:
        try:
            return opened()
        except StoreError as e:
            if time.time() > deadline:
                raise TimeoutError(f"waited {seconds:.0f}s for rank 0 to prepare the data: {e}") from None
            time.sleep(1)


DATA = "data"  # the store a run prepares for itself, inside its directory


# Model settings --init-from may change; draft heads missing from the source start fresh.
FINE_TUNABLE = {"dropout", "attention_dropout", "activation_dropout", "word_dropout", "draft_heads", "draft_chain"}


def _check_init_from(recipe: Recipe, source: Recipe, source_dir: str) -> None:
    ours, theirs = recipe.model.to_dict(), source.model.to_dict()
    differ = [f"{k}={ours[k]!r} (its {theirs[k]!r})" for k in ours if k not in FINE_TUNABLE and ours[k] != theirs[k]]
    if differ:
        raise CheckpointError(f"--init-from {source_dir}: the recipe's model differs from that run's: "
                              f"{', '.join(differ[:4])}; fine-tuning keeps the model")


def open_run_data(recipe: Recipe, run_dir: Path, data_dir: str | None, resume: bool,
                  tokenizer_from: str | None = None) -> tuple[Recipe, Store]:
    """The run's token store, prepared if need be, and its tokenizer in the run directory; fills the
    vocabulary size and writes config.yaml. With data.prepared, every rank memory-maps that store. Without,
    rank 0 prepares one into RUN/data (a resume reuses it) while the other ranks wait for its manifest. With
    `tokenizer_from` (fine-tuning), the data is tokenized with that sentencepiece model."""
    d = recipe.data
    if d.train is None:
        raise ValueError("the recipe names no training corpus (data.train)")
    first = _rank() == 0
    if resume:
        saved = read_recipe(run_dir)
        recipe.model.vocab_size = saved.model.vocab_size
        if saved.model != recipe.model:
            raise CheckpointError(f"{run_dir}: the recipe's model differs from the run's {run_dir / 'config.yaml'}; "
                                  "resume with the same model settings")
    if d.prepared is not None:
        d.prepared = str(Path(d.prepared).resolve())
        store = open_store(d.prepared, recipe, data_dir)
    else:
        own = run_dir / DATA
        # A resumed run that has a tokenizer but no store (from before runs kept one) prepares with its tokenizer.
        tokenizer = str(run_dir / TOKENIZER) if resume and (run_dir / TOKENIZER).is_file() else tokenizer_from
        if first and not resume and (own / MANIFEST).is_file():
            try:  # left by a start that wrote no checkpoint: reused if it still fits the recipe and corpora
                open_store(own, recipe, data_dir)
            except StoreError as e:
                log.info("preparing the data again: %s", e)
                prepare(recipe, data_dir, own, tokenizer_file=tokenizer)
        elif first and not (own / MANIFEST).is_file():
            prepare(recipe, data_dir, own, tokenizer_file=tokenizer)
        # A resumed run reads the store it trained on, even without the corpus files (no --data-dir). The other
        # ranks wait until rank 0's store opens.
        store = open_store(own, recipe, data_dir) if first else _wait_for(lambda: open_store(own, recipe, data_dir))
    if tokenizer_from and Path(tokenizer_from).read_bytes() != store.tokenizer_file.read_bytes():
        raise StoreError(f"{store.directory}: prepared with another sentencepiece model than {tokenizer_from}; "
                         "fine-tuning needs the data tokenized with the run's own (prepare --tokenizer)")
    tokenizer_file = run_dir / TOKENIZER
    if first and (not resume or not tokenizer_file.is_file()):
        shutil.copyfile(store.tokenizer_file, tokenizer_file)
    elif first and tokenizer_file.read_bytes() != store.tokenizer_file.read_bytes():
        raise CheckpointError(f"{tokenizer_file}: not the sentencepiece model of the store {store.directory}")
    recipe.model.vocab_size = Tokenizer(store.tokenizer_file).vocab_size
    recipe.model.validate()
    if first:
        write_recipe(recipe, run_dir)
    return recipe, store


def _loaders(recipe: Recipe, store: Store):
    """Factories (rank, world) -> loader for training and validation over the memory-mapped store, and the
    validation references (translation) for BLEU."""
    t, d = recipe.train, recipe.data
    if d.task == "lm":
        train = store.stream("train")
        make_train = lambda rank, world: BlockBatches(train, d.block_size, t.max_tokens, True, t.seed, rank, world)
        if not store.has("valid"):
            return make_train, None, []
        valid = store.stream("valid")
        return make_train, (lambda rank, world: BlockBatches(valid, d.block_size, t.max_tokens, False, rank=rank,
                                                             world=world)), []
    joint = recipe.model.arch == "decoder_only"  # translation as one sequence: source EOS target
    train = store.pairs("train")
    sampling = None
    if recipe.tokenizer.sampling is not None:
        sampling = SubwordSampling(store.tokenizer_file, recipe.tokenizer.sampling["alpha"],
                                   recipe.tokenizer.sampling.get("nbest", -1), t.seed, settings(recipe)["max_len"])
    make_train = lambda rank, world: TokenBatches(train, t.max_tokens, True, t.seed, rank, world, joint, sampling)
    if not store.has("valid"):
        return make_train, None, []
    valid = store.pairs("valid")
    n = t.val_max_sentences or len(valid)
    valid = valid.head(n)
    make_valid = lambda rank, world: TokenBatches(valid, t.max_tokens, False, rank=rank, world=world, joint=joint)
    return make_train, make_valid, store.references()[:n]


def fit(recipe: Recipe, run_dir: str | os.PathLike, data_dir: str | None = None, resume: bool = False,
        max_steps: int | None = None, max_minutes: float | None = None, accelerator: str | None = None,
        devices: int | str | None = None, num_nodes: int | None = None, strategy: str | None = None,
        progress_bar: bool = True) -> Path:
    """Train a recipe into run_dir (created, or resumed from its last.ckpt). Returns the run directory."""
    hold_freed_memory()  # a quarter of a CPU step's time otherwise goes to page faults (translator/memory.py)
    startup = StartupReport()
    run_dir = Path(run_dir)
    t = recipe.train
    if (accelerator or t.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError("a GPU was asked for (--device cuda or train.accelerator), but no CUDA device is available")
    quiet_lightning()
    last = run_dir / CHECKPOINTS / "last.ckpt"
    if resume and not last.is_file():
        raise CheckpointError(f"{run_dir}: nothing to resume (no {CHECKPOINTS}/last.ckpt)")
    if resume:
        check_readable(last)
    if not resume and _rank() == 0:
        _check_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(t.seed, workers=True, verbose=False)
    if (num_nodes or t.num_nodes) > 1 and recipe.data.prepared is None:
        raise ValueError("training on several nodes reads a prepared store: run translator prepare onto a "
                         "filesystem every node sees (or at the same path on each node), then train --prepared")
    source = None
    if t.init_from and not resume:  # fine-tuning: another run's weights and tokenizer
        t.init_from = str(Path(t.init_from).resolve())
        source = load_model(t.init_from)
        recipe.model.vocab_size = source[2].model.vocab_size  # its tokenizer's
        _check_init_from(recipe, source[2], t.init_from)
    recipe, store = open_run_data(recipe, run_dir, data_dir, resume, source[1].path if source else None)
    make_train, make_valid, references = _loaders(recipe, store)
    module = TranslationModule(recipe.to_dict(), str(store.tokenizer_file), references)  # every rank has it
    if source is not None:
        # The source's heads are kept where they are of the same kind (parallel or chained); others start fresh.
        source_heads = source[2].model.draft_heads if source[2].model.draft_chain == recipe.model.draft_chain else 0
        state = {k: v for k, v in source[0].state_dict().items()  # heads beyond ours are dropped
                 if not k.startswith("draft_heads.") or int(k.split(".")[1]) < min(source_heads, recipe.model.draft_heads)}
        missing, _ = module.model.load_state_dict(state, strict=False)
        unexpected_missing = [k for k in missing if not (k.startswith("draft_heads.") and int(k.split(".")[1]) >= source_heads)]
        if unexpected_missing:
            raise CheckpointError(f"--init-from {t.init_from}: weights missing for {unexpected_missing[:3]}")

    bleu = references and t.val_bleu != "none"
    monitor = ("val/bleu", "max") if bleu else ("val/loss", "min")
    callbacks: list[Callback] = [PeriodicCheckpoints(run_dir / CHECKPOINTS, t.save_every, t.keep_last), startup]
    if not progress_bar:
        callbacks.append(LogLines(t.log_every))
    if make_valid is not None and t.patience:
        callbacks.append(EarlyStopping(monitor=monitor[0], mode=monitor[1], patience=t.patience,
                                       check_on_train_epoch_end=False, verbose=False))
    if make_valid is not None:
        callbacks.append(ModelCheckpoint(dirpath=run_dir / CHECKPOINTS, filename="best", monitor=monitor[0],
                                         mode=monitor[1], save_top_k=1, auto_insert_metric_name=False,
                                         enable_version_counter=False))
    trainer = L.Trainer(
        default_root_dir=run_dir, max_steps=max_steps if max_steps is not None else t.max_steps,
        max_epochs=t.max_epochs if t.max_epochs is not None else -1,
        max_time={"minutes": max_minutes} if max_minutes else None,
        accelerator=accelerator or t.accelerator, devices=devices if devices is not None else t.devices,
        num_nodes=num_nodes or t.num_nodes, strategy=strategy or t.strategy,
        precision=resolve_precision(t.precision, accelerator or t.accelerator),
        accumulate_grad_batches=t.accumulate, gradient_clip_val=t.clip_norm or None,
        val_check_interval=t.val_every * t.accumulate if t.val_every else None,
        check_val_every_n_epoch=None if t.val_every else 1, num_sanity_val_steps=0,
        log_every_n_steps=t.log_every, callbacks=callbacks, enable_progress_bar=progress_bar,
        # One version_N folder per (re)start, so a resume never overwrites earlier logs.
        logger=[CSVLogger(run_dir, name="logs"), TensorBoardLogger(run_dir, name="tensorboard")],
        plugins=[AtomicCheckpointIO()], use_distributed_sampler=False, enable_model_summary=False,
    )
    data = RunData(make_train, make_valid, t.loader_workers)
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if resume else None)
    if trainer.is_global_zero:
        export_weights(run_dir, recipe.decode.average_last)
    return run_dir
