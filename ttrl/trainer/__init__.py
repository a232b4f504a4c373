"""Trainer workers: DeepSpeed policy (+ frozen reference) and critic, as Ray actors."""
