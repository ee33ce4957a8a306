"""The demo model: a small Llama the project trains on its own synthetic corpus and ships in the package.

- ``corpus``/``words``: the seeded generator of chat examples (train and held-out splits share no names
  or values);
- ``template``/``tokenizer``: the chat template (ChatML with Hermes tool calls) and the BPE trained on
  the corpus;
- ``data``/``train``: batches with the loss on replies only, and the training command
  (``python -m kvloom.demo_model.train``);
- ``evaluate``: the held-out evaluation through the engine (``python -m kvloom eval-demo-model``);
- ``agreement``: a quantized model (int8 weights, an int8 KV cache) against float32, teacher-forced;
- ``shipped``: where the trained checkpoint lives in the installed package.

Importing this package loads nothing heavy; torch and transformers load inside the functions that need them.
"""
