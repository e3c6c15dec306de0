"""Training: the SDPO loss, the teacher, the resident trainer, adapter storage and the training engines."""
