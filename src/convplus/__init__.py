"""Conv+: one primitive that generalizes convolution and self-attention."""
