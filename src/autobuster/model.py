"""Loading the policy: a checkpoint of a family that runs (families.py), a directory or hub id (from the Hugging Face
cache), bf16 or 4-bit NF4, an optional peft adapter; and turning clips into model inputs (one video per clip, 4 fps
metadata)."""
import logging

import numpy as np
import torch
import transformers
from packaging.version import Version
from transformers import AutoProcessor, BitsAndBytesConfig

from .errors import UserError
from .families import QWEN2_5_VL, Family, family_of
from .hub import model_config, resolve_model
from .profiles import FRAMES, SAMPLE_FPS
from .prompt import Format, messages
from .video import resize_frames

MIN_TRANSFORMERS = "5.18"
# bitsandbytes warns at import that the optional `kernels` package is missing; its built-in CPU path is used instead
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def check_transformers() -> None:
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise UserError(f"transformers {transformers.__version__} is too old: versions before {MIN_TRANSFORMERS} "
                        "give every frame the same temporal position at 4 fps; run `uv sync` to get the pinned one")


def default_device() -> torch.device:
    """The current GPU (under torchrun, the one of this rank's LOCAL_RANK), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def nf4(dtype: torch.dtype, family: Family = QWEN2_5_VL) -> BitsAndBytesConfig:
    """QLoRA's NF4 with double quantisation; the family's vision tower and head stay unquantised."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=list(family.unquantised))


def load(path: str, adapter: str | None = None, four_bit: bool = False, device: torch.device | None = None):
    """(model, processor). bf16 on GPU, fp32 on CPU, NF4 base weights with `four_bit`."""
    check_transformers()
    path = resolve_model(path)  # a hub id comes from the Hugging Face cache that prepare filled: no network
    family = family_of(model_config(path), path)
    device = device or default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quant = nf4(dtype, family) if four_bit else None
    try:
        model = family.model_class.from_pretrained(
            path, dtype=dtype, quantization_config=quant, use_safetensors=True, device_map={"": device})
        processor = AutoProcessor.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load the model {path!r}: {e}".splitlines()[0]) from None
    if four_bit and device.type == "cpu":
        # bitsandbytes repacks 4-bit weights for a CPU inference kernel at the first eval forward and keeps that
        # layout, so later training forwards run a kernel without autograd: keep the trainable layout
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
        if not four_bit:
            model = model.merge_and_unload()  # plain weights decode faster
    model.eval()
    return model, processor


def lora_targets(modules) -> str:
    """A peft target regex for the language model's layers only: the short names (q_proj, up_proj, ...) alone
    would also hit the vision tower's."""
    return rf".*language_model\.layers\.\d+\..*\.({'|'.join(modules)})"


def unwrap(model):
    """The model under a peft wrapper (LoRA layers stay live inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chat_text(processor, fmt: Format, mode: str | None = None, prompt: str | None = None) -> str:
    """The chat turn as text: the format's fixed prompt in `mode` (see Format.prompt_for), or another `prompt`."""
    return processor.apply_chat_template(messages(prompt or fmt.prompt_for(mode)), add_generation_prompt=True,
                                         tokenize=False, **fmt.template_kwargs(mode))


def encode(processor, clips: list[np.ndarray], pixel_cap: int, text: str | list[str]):
    """A left-padded batch for clips of uint8 [16, H, W, 3] frames, each passed as ONE video at 4 fps; `text` is
    the chat text for every clip or one per clip. Frames are resized here, by the per-frame rule the frame cache
    uses (a no-op on cached frames): Qwen3.5's processor would spread `pixel_cap` over all 16 frames."""
    vp = processor.video_processor
    factor = vp.patch_size * vp.merge_size
    texts = text if isinstance(text, list) else [text] * len(clips)
    return processor(text=texts, videos=[resize_frames(c, pixel_cap, factor) for c in clips], padding=True,
                     padding_side="left", do_resize=False, do_sample_frames=False, cap_pixels_per_frame=False,
                     video_metadata=[{"fps": SAMPLE_FPS, "total_num_frames": FRAMES,
                                     "frames_indices": list(range(FRAMES))}] * len(clips),  # Qwen3.5: timestamps
                     return_tensors="pt")
