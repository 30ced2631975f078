"""What every benchmark records next to its numbers: the device, versions, date and the command."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def device_description(device: str = "cpu") -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from translator.training import native_bf16

    # The model name alone does not tell whether bf16 is native (AVX512-BF16, AMX): `precision: auto` hangs on it.
    bf16 = "native bf16" if native_bf16("cpu") else "no native bf16"
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {bf16}"


def versions(*extra: str) -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("translator", "torch", "lightning", "sentencepiece", "sacrebleu", *extra):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def save_result(name: str, metrics: dict, device: str, extra_versions: tuple[str, ...] = (), **fields) -> Path:
    """Write benchmarks/results/<name>.json shaped {benchmark, command, device, versions, date, metrics}."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "command": command_line(), "device": device_description(device),
              "versions": versions(*extra_versions), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "metrics": metrics, **fields}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return path
