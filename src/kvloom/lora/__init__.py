"""Multi-LoRA: PEFT adapters, device slots, shrink/expand ops.

``adapter`` (+ ``peft_config``) reads a PEFT directory into host tensors; ``slots`` keeps
``max_loras`` of them on the device and attaches them to the model's projections;
``mapping`` routes a step's tokens to slots; ``ops`` runs the grouped shrink/expand.
"""
