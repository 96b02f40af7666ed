"""The model families autobuster runs, one object each, read from a checkpoint's config.json: what loading, the
engine, the frame cache and the fixed evaluation ask of a family. Qwen2.5-VL carries the 2025 BusterX++ recipe,
Qwen3.5 (a hybrid of Gated DeltaNet and full attention) the 2026 one."""
from dataclasses import dataclass

from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3_5ForConditionalGeneration

from .errors import UserError
from .prompt import ANSWER, BOXED, Format


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json's model_type for this family
    model_class: type
    unquantised: tuple[str, ...]  # modules NF4 leaves in bf16: the vision tower and the head
    norm_offset: float  # the RMSNorm scales by weight + this (Qwen3.5 stores the weight around 0)
    factor: int  # frame sides are multiples of this: vision patch x spatial merge
    format: Format  # the BusterX++ edition's prompt and reply format on this family
    default_model: str  # the hub base model prepare fetches for this family when no --model is given


QWEN2_5_VL = Family("Qwen2.5-VL", ("qwen2_5_vl",), Qwen2_5_VLForConditionalGeneration, ("model.visual", "lm_head"),
                    norm_offset=0.0, factor=28, format=ANSWER, default_model="Qwen/Qwen2.5-VL-7B-Instruct")
QWEN3_5 = Family("Qwen3.5", ("qwen3_5",), Qwen3_5ForConditionalGeneration, ("model.visual", "lm_head"),
                 norm_offset=1.0, factor=32, format=BOXED, default_model="Qwen/Qwen3.5-4B")
FAMILIES = (QWEN2_5_VL, QWEN3_5)
OTHERS = {"qwen2_vl": "Qwen2-VL", "qwen3_vl": "Qwen3-VL"}  # met on the hub, by model_type


def family_of(config: dict, model: str) -> Family:
    """The family of the checkpoint `model` whose config.json is `config`, or one line saying what is supported."""
    model_type = config.get("model_type", "")
    found = next((f for f in FAMILIES if model_type in f.model_types), None)
    if found:
        return found
    what = OTHERS.get(model_type) or (f"model_type {model_type!r}" if model_type else "checkpoint without a model_type")
    raise UserError(f"{model} is a {what} checkpoint: autobuster runs {' and '.join(f.name for f in FAMILIES)} "
                    "models (BusterX++: l8cv/BusterX_plusplus on Qwen2.5-VL-7B, l8cv/BusterX-plusplus on Qwen3.5-4B)")


def family_named(name: str) -> Family:
    """The family called `name` (any case: qwen3.5 on the command line, Qwen3.5 in a setup), or one line."""
    found = next((f for f in FAMILIES if f.name.lower() == name.lower()), None)
    if found is None:
        raise UserError(f"unknown --family {name!r}: use {' or '.join(f.name.lower() for f in FAMILIES)}")
    return found


def family_of_model(model) -> Family:
    """The family of a loaded model (peft's wrapper or not)."""
    model_type = getattr(model, "get_base_model", lambda: model)().config.model_type
    return next(f for f in FAMILIES if model_type in f.model_types)
