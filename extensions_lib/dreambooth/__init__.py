"""DreamBooth: fine-tune the UNet (or a LoRA on it) on a subject's images with prior preservation."""
