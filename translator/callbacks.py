"""Lightning callbacks for `translator train`: plain log lines, the start-up report, and checkpoints that a
kill at any moment leaves resumable."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from .memory import peak_memory_mb

log = logging.getLogger(__name__)


class LogLines(Callback):
    """Plain progress lines for logs (a progress bar is for terminals): every log_every steps, and after
    each validation."""

    def __init__(self, every: int):
        self.every = every
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step % self.every == 0 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            m = trainer.callback_metrics
            log.info("step %d  loss %.3f  %s tok/s  lr %.2e  %.0fs", step, float(m.get("train/loss", float("nan"))),
                     f"{float(m['tok_s']):.0f}" if "tok_s" in m else "-", float(m.get("lr", float("nan"))),
                     time.perf_counter() - self.start)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        if trainer.is_global_zero and "val/loss" in m:
            bleu = f"  BLEU {float(m['val/bleu']):.2f}" if "val/bleu" in m else ""
            log.info("step %d  validation loss %.3f  ppl %.2f%s", trainer.global_step, float(m["val/loss"]),
                     float(m["val/ppl"]), bleu)


class StartupReport(Callback):
    """One line per rank at its first training step: how long the start took and the memory it holds, the two
    costs that grow with the corpus when data is not memory-mapped, and the precision it trains in."""

    def __init__(self) -> None:
        self.start, self.done = time.perf_counter(), False

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.done:
            self.done = True
            # The precision too: `auto` picks float32 on a CPU without native bf16, where the recipes' bf16 step
            # times do not hold.
            log.info("rank %d: first training step %.1fs after the start of training; peak memory %.0f MB; "
                     "precision %s", trainer.global_rank, time.perf_counter() - self.start, peak_memory_mb(),
                     trainer.precision)


class PeriodicCheckpoints(ModelCheckpoint):
    """step{N}.ckpt every `every` steps, the newest `keep` kept, last.ckpt a link to the newest; at the end of
    training last.ckpt saved as it is then (also when stopped mid-interval by max_steps or max_minutes).
    last.ckpt is never versioned (Lightning would write last-v1.ckpt beside a last.ckpt it did not write
    itself, and after a resume link that instead, leaving last.ckpt behind for the next resume)."""

    def __init__(self, directory: Path, every: int, keep: int):
        super().__init__(dirpath=directory, filename="step{step:07d}", auto_insert_metric_name=False,
                         every_n_train_steps=every, save_top_k=keep, monitor="step", mode="max", save_last="link",
                         enable_version_counter=False)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.last_model_path = str(Path(self.dirpath) / "last.ckpt")
        trainer.save_checkpoint(self.last_model_path, weights_only=False)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        """Point last.ckpt at the newest checkpoint atomically: the new link is made beside it and renamed over
        it. (Lightning deletes, then links: a kill between the two left no last.ckpt to resume from.)"""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            directory, name = os.path.split(linkpath)
            temporary = os.path.join(directory, f".{name}.link{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
            try:
                os.symlink(os.path.relpath(filepath, directory), temporary)
            except OSError:  # no symbolic links here (Windows without the privilege): a copy instead
                shutil.copyfile(filepath, temporary)
            os.replace(temporary, linkpath)
        trainer.strategy.barrier()


def quiet_lightning() -> None:
    """Lightning's banners and tips are noise for this CLI; its warnings and errors still show."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        if logging.getLogger(name).level < logging.WARNING:
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Our loader resumes by itself (TokenBatches.resume_at), which Lightning cannot see.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")

