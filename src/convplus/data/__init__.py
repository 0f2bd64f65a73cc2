"""Generated datasets (``synthetic:NAME`` in the trainer)."""
