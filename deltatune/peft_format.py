"""PEFT-format export: `adapter_config.json` + `adapter_model.safetensors`, loadable by the peft library.

Tensor names gain peft's `base_model.model.` prefix; the trained head (and any weight that was newly
initialised at load) goes into `modules_to_save`, so `PeftModel.from_pretrained` restores it.
Each method that has a peft counterpart provides `PEFT_TYPE` and `to_peft(config, tensors)`.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from deltatune.delta import read_meta, read_tensors
from deltatune.errors import UserError
from deltatune.io import atomic_directory, write_json_atomic
from deltatune.methods import resolve_method

PREFIX = "base_model.model."


def export_peft(delta: str | Path, out: str | Path) -> Path:
    meta = read_meta(delta)
    tensors = read_tensors(delta)
    method, config = resolve_method(meta["method"], meta.get("method_config", {}))
    if not hasattr(method, "to_peft"):
        raise UserError(f"method '{meta['method']}' has no peft counterpart to export to")
    if meta["backbone"]["pooling"] != "hf":
        raise UserError("peft export needs transformers' own head (--pooling hf); this delta uses "
                        f"--pooling {meta['backbone']['pooling']}")
    fields, method_tensors = method.to_peft(config, tensors)
    head_modules = sorted({name.rsplit(".", 1)[0] for name in meta.get("head_names", [])})
    adapter_config = {
        "peft_type": method.PEFT_TYPE,
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": meta["backbone"]["path"],
        "inference_mode": True,
        "modules_to_save": head_modules or None,
        **fields,
    }
    with atomic_directory(out) as tmp:
        save_file({PREFIX + k: v.contiguous() for k, v in method_tensors.items()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / "adapter_config.json", adapter_config)
    return Path(out)
