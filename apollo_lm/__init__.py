"""LLaMA pre-training stack (model, data, training) for the APOLLO runs."""
