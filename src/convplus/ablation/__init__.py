"""Ablations: Conv+ against conv-only and attention-only at matched parameters (``convplus ablate``)."""
