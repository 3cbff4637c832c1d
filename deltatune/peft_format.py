"""PEFT format: `adapter_config.json` + `adapter_model.safetensors`, as written and read by the peft library.

    deltatune delta ──export──> peft dir ──PeftModel.from_pretrained──> same logits
    peft dir (save_pretrained) ──import──> deltatune delta ──load_delta──> same logits

Tensor names carry peft's `base_model.model.` prefix; the trained head (and any weight newly
initialised at load) goes into `modules_to_save`, so `PeftModel.from_pretrained` restores it.
Each method with a peft counterpart provides `PEFT_TYPE` and two converters (and, when methods share a
peft type, `reads_peft(adapter_config)` to say which adapters are its own):

    to_peft(config, tensors) -> (adapter_config fields, peft tensors)
    from_peft(adapter_config, tensors) -> (Config or dict of options, deltatune tensors)

Both see tensor names without the `base_model.model.` prefix (prompt-learning methods: without
`base_model.`, their own tensor being `prompt_embeddings`); `from_peft` gets only the method's own
tensors (the head of `modules_to_save` is split off and put back here).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.backbone import ARCHITECTURES, load_task_model, resolve_model_path
from deltatune.data import CLASSIFICATION, GENERATION
from deltatune.delta import apply_delta, read_meta, read_tensors, save_delta
from deltatune.errors import UserError
from deltatune.io import atomic_directory, write_json_atomic
from deltatune.methods import REGISTRY, resolve_method
from deltatune.methods.base import Method, build_config, config_dict

PREFIX = "base_model.model."
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")
"""peft names these methods' own tensor `prompt_embeddings` (no prefix) and the head `base_model.<name>`."""
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
MODEL_CONFIG_FILE = "config.json"
"""transformers' config beside the adapter: the label names (peft ignores it)."""
POOLING_FOR_TASK_TYPE = {"SEQ_CLS": "hf", "CAUSAL_LM": "lm", "SEQ_2_SEQ_LM": "lm"}


def _task_type(meta: dict) -> str:
    if meta["backbone"]["pooling"] != "lm":
        return "SEQ_CLS"
    spec = ARCHITECTURES.get(meta["backbone"].get("model_type", ""))
    return "SEQ_2_SEQ_LM" if spec is not None and spec.decoder_layers else "CAUSAL_LM"


def export_peft(delta: str | Path, out: str | Path) -> Path:
    meta = read_meta(delta)
    tensors = read_tensors(delta)
    method, config = resolve_method(meta["method"], meta.get("method_config", {}))
    if method.to_peft is None:
        raise UserError(f"method '{meta['method']}' has no peft counterpart to export to")
    if meta["backbone"]["pooling"] not in POOLING_FOR_TASK_TYPE.values():
        raise UserError("peft export needs transformers' own head (--pooling hf); this delta uses "
                        f"--pooling {meta['backbone']['pooling']}")
    refuse_seq2seq_prompts(meta, method.PEFT_TYPE)
    refuse_conv1d_lycoris(meta, method.PEFT_TYPE)
    fields, method_tensors = method.to_peft(config, tensors)
    head_modules = sorted({name.rsplit(".", 1)[0] for name in meta.get("head_names", [])})
    adapter_config = {
        "peft_type": method.PEFT_TYPE,
        "task_type": _task_type(meta),
        "base_model_name_or_path": meta["backbone"]["path"],
        "inference_mode": True,
        "modules_to_save": head_modules or None,
        **fields,
    }
    labels = label_config(meta)
    with atomic_directory(out, "peft") as tmp:
        save_file({peft_name(method.PEFT_TYPE, k): v.contiguous() for k, v in method_tensors.items()},
                  str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json_atomic(tmp / CONFIG_FILE, adapter_config)
        if labels:
            write_json_atomic(tmp / MODEL_CONFIG_FILE, labels)
    return Path(out)


def label_config(meta: dict) -> dict | None:
    """A classifier's transformers config.json: the base model's, with the delta's id2label / label2id (what
    import reads back, and what transformers' AutoModelFor...from_pretrained of this folder uses); None for
    a language model. Only the label fields when the base model's config cannot be read."""
    names = meta.get("task", {}).get("label_names") or []
    if meta["backbone"]["pooling"] == "lm" or not names:
        return None
    try:
        base = json.loads((Path(resolve_model_path(meta["backbone"]["path"])) / MODEL_CONFIG_FILE).read_text())
    except (UserError, OSError, ValueError):
        base = {}
    return {**base, "id2label": {str(i): name for i, name in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)}}


CONV1D_MODEL_TYPES = ("gpt2",)
"""Models whose projections are transformers' Conv1D (weight stored (in, out))."""


def refuse_conv1d_lycoris(meta: dict, peft_type: str) -> None:
    """peft's LoHa and LoKr wrap nn.Linear / Conv1d / Conv2d only: on GPT-2's Conv1D projections its loader
    raises TypeError, so such an adapter is refused here instead of written unloadable."""
    model_type = meta["backbone"].get("model_type", "")
    if peft_type in ("LOHA", "LOKR") and model_type in CONV1D_MODEL_TYPES:
        raise UserError(f"peft's {peft_type} has no layer for {model_type}'s Conv1D projections (peft would refuse "
                        "the adapter on load): use the deltatune delta itself, or `export --format merged`")


def refuse_seq2seq_prompts(meta: dict, peft_type: str) -> None:
    """On an encoder-decoder model, peft runs prompt tuning / P-tuning only for SEQ_2_SEQ_LM (its
    SEQ_CLS path feeds inputs_embeds, which T5ForSequenceClassification refuses), and its prefix goes into
    the decoder, where deltatune's is in the encoder."""
    spec = ARCHITECTURES.get(meta["backbone"].get("model_type", ""))
    if spec is None or spec.decoder_layers is None or peft_type not in PROMPT_LEARNING:
        return
    if peft_type == "PREFIX_TUNING":
        from deltatune.methods.prefix import SEQ2SEQ_PEFT

        raise UserError(SEQ2SEQ_PEFT)
    if _task_type(meta) != "SEQ_2_SEQ_LM":
        raise UserError("peft cannot run soft tokens on an encoder-decoder classifier "
                        "(T5ForSequenceClassification refuses inputs_embeds): only --pooling lm deltas export")


def peft_name(peft_type: str, key: str) -> str:
    if peft_type in PROMPT_LEARNING:
        return key if key == "prompt_embeddings" else "base_model." + key
    return PREFIX + key


def own_name(peft_type: str, key: str) -> str:
    """The inverse of peft_name."""
    return key.removeprefix("base_model." if peft_type in PROMPT_LEARNING else PREFIX)


def method_for_peft(adapter_config: dict) -> Method:
    """The registered method that reads this adapter (`reads_peft`: by peft_type, and by the config's own
    fields where methods share a type: LoRA and DoRA are both "LORA", DoRA with use_dora)."""
    readers = [m for m in REGISTRY.values() if m.from_peft is not None and m.reads_peft(adapter_config)]
    if len(readers) > 1:
        raise TypeError(f"methods {', '.join(m.NAME for m in readers)} all claim this peft adapter")
    if not readers:
        supported = sorted({m.PEFT_TYPE for m in REGISTRY.values() if m.PEFT_TYPE and m.from_peft is not None})
        raise UserError(f"cannot import peft type '{adapter_config.get('peft_type', '')}': "
                        f"supported: {', '.join(supported)}")
    return readers[0]


def read_peft_dir(peft_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors with the `base_model.model.` prefix removed) of a peft adapter directory."""
    folder = Path(peft_dir)
    if not (folder / CONFIG_FILE).exists():
        raise UserError(f"not a peft adapter directory (no {CONFIG_FILE}): {peft_dir}")
    try:
        adapter_config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"corrupt {folder / CONFIG_FILE}: {exc.msg} at line {exc.lineno}") from exc
    if (folder / WEIGHTS_FILE).exists():
        try:
            tensors = load_file(str(folder / WEIGHTS_FILE))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"corrupt {folder / WEIGHTS_FILE}: {str(exc).splitlines()[0]}") from exc
    elif (folder / "adapter_model.bin").exists():
        tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"peft adapter directory has no {WEIGHTS_FILE}: {peft_dir}")
    peft_type = str(adapter_config.get("peft_type", ""))
    return adapter_config, {own_name(peft_type, k): v for k, v in tensors.items()}


def _split_head(tensors: dict[str, torch.Tensor], modules_to_save: list[str] | None):
    """(head tensors, method tensors): a head tensor belongs to a module named in modules_to_save."""
    saved = modules_to_save or []

    def in_head(key: str) -> bool:
        module = key.rsplit(".", 1)[0]
        return any(module == m or module.endswith("." + m) for m in saved)

    head = {k: v for k, v in tensors.items() if in_head(k)}
    return head, {k: v for k, v in tensors.items() if k not in head}


def _label_names(peft_dir: Path, labels: str | None, head: dict[str, torch.Tensor]) -> list[str]:
    """From the peft dir's config.json (id2label), else --labels, else label_0..K-1 by the head's size."""
    given = [s.strip() for s in labels.split(",") if s.strip()] if labels else None
    config_file = peft_dir / MODEL_CONFIG_FILE
    if given is None and config_file.exists():
        id2label = json.loads(config_file.read_text()).get("id2label") or {}
        if id2label:
            given = [id2label[k] for k in sorted(id2label, key=int)]
    # the head's output size: the smallest first dimension of its matrices (classifier / score / out_proj)
    sizes = [t.shape[0] for t in head.values() if t.ndim == 2]
    size = min(sizes) if sizes else None
    if given is not None:
        if size is not None and len(given) != size:
            raise UserError(f"{len(given)} label names given, but the adapter's head has {size} outputs")
        return given
    if size is None:
        raise UserError("cannot tell the labels: the adapter saves no classification head; pass --labels a,b,c")
    return [f"label_{i}" for i in range(size)]


def import_peft(peft_dir: str | Path, out: str | Path, model: str | None = None,
                labels: str | None = None, quantize: str | None = None) -> Path:
    """Write a deltatune delta with the same outputs as a peft adapter directory. `quantize` (nf4, fp4, int8,
    ...): the adapter was trained on a quantised base (QLoRA: transformers' BitsAndBytesConfig at load
    time, which neither adapter_config.json nor the base's own config.json records), so the delta is
    applied to, and records, that quantised backbone and its fingerprint (`quantize.check_delta`)."""
    folder = Path(peft_dir)
    adapter_config, tensors = read_peft_dir(folder)
    peft_type = str(adapter_config.get("peft_type", ""))
    method = method_for_peft(adapter_config)
    task_type = adapter_config.get("task_type")
    if task_type not in POOLING_FOR_TASK_TYPE:
        raise UserError(f"cannot import a peft adapter of task_type '{task_type}' (a classifier or a language "
                        f"model is needed): supported: {', '.join(POOLING_FOR_TASK_TYPE)}")
    pooling = POOLING_FOR_TASK_TYPE[task_type]
    head, method_tensors = _split_head(tensors, adapter_config.get("modules_to_save"))
    label_names = _label_names(folder, labels, head) if pooling == "hf" else []
    config, converted = method.from_peft(adapter_config, method_tensors)
    if isinstance(config, dict):
        config = build_config(method.Config, config)
    base = model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise UserError("the adapter names no base model: pass --model PATH")
    try:
        model_path = resolve_model_path(base)
    except UserError as exc:
        raise UserError(f"{exc} (the adapter's base model; pass --model PATH)") from exc
    task_model = load_task_model(model_path, num_labels=len(label_names), pooling=pooling, quantize=quantize)
    # weights the adapter does not carry (e.g. no head saved) keep their seeded initial values
    current = task_model.module.state_dict()
    all_tensors = {**{n: current[n].clone() for n in task_model.head_names}, **head, **converted}
    meta = {"method": method.NAME, "method_config": config_dict(config),
            "backbone": {"fingerprint": task_model.fingerprint, "path": task_model.model_path,
                         "quantization": task_model.quantization}}
    apply_delta(task_model, meta, all_tensors, method, config)
    kind = CLASSIFICATION if pooling == "hf" else GENERATION
    return save_delta(out, task_model, method, config, {
        "task": {"name": folder.resolve().name, "kind": kind, "label_names": label_names,
                 "description": f"imported from the peft adapter {folder}", "text_pair": False},
        "train_config": {},
        "head_names": task_model.head_names,
        "imported_from": {"peft_dir": str(folder.resolve()), "peft_type": peft_type, "task_type": task_type},
    })
