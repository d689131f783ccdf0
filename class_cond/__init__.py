"""Class-conditional ImageNet: SiT/DiT models and presets, the task, data and the train entry point."""
