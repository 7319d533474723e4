"""Compute engines, one module each: llamacpp (whole-model replicas), ggml + stage (layer ranges)."""
