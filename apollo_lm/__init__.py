"""LLaMA-family language models on apollo_optax: model, data, training.

The Flax NNX LLaMA (also Mistral and Qwen2 checkpoints through Hugging Face
I/O), its data pipelines (local corpora, C4, supervised fine-tuning data),
and one training loop for pre-training and full-parameter fine-tuning with
APOLLO, APOLLO-Mini, AdamW, GaLore or Adafactor, plus KV-cache generation.
Entry points: ``python -m apollo_lm.train``, ``apollo_lm.finetune``,
``apollo_lm.generate`` and ``apollo_lm.demo``.
"""
