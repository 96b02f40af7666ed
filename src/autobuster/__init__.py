"""autobuster: LoRA + DAPO fine-tuning of Qwen2.5-VL to detect AI-generated video, run as autoresearch."""
