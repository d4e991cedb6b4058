"""dpo_core: Direct Preference Optimization as pure functions on tensors.

Modules, in the order one batch meets them:

- ``data``      rows (explicit / conversational / implicit prompt) -> token ids -> ``PreferenceBatch``
- ``batch``     the ``PreferenceBatch`` container the collator returns
- ``logps``     per-sequence log-probs of completions, chunked over tokens
- ``reference`` where the reference log-probs come from (frozen copy, adapters off, cache on disk)
- ``settings``  ``LossSettings``: the objective's knobs, trl's names and defaults, declared once
- ``losses``    every DPO loss variant, ``dpo_loss`` and the weighted combination
- ``metrics``   the numbers trl logs, with trl's names
- ``evaluation`` before vs after: preference accuracy (ties 1/2), margins, sequence-level KL

``dpo_core`` imports torch (and transformers' tokenizers for chat templates) and nothing of ours
above it: read it alone to learn the math. ``README.md`` beside this file derives it.
"""
