"""Training: the encoder (``modeling``), the DeepSpeed loop (``engine``, plain Python without Ray), the
losses, the distillation trainer, the stage runner (``stages``: Ray Train or one process) and pretraining."""
