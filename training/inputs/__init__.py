"""A run's inputs: rows and the tokenized data module, model loading (LoRA, 4-bit), the reference precomputation."""
