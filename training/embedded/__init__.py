"""The embedded default: a generated preference task, an offline tokenizer and a warmed-up tiny model."""
