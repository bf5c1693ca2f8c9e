"""Learning-rate schedule: linear warmup, then cosine decay from `lr` to `lr * min_ratio`."""
import math


def lr_at(step, total_steps, warmup_steps, lr, min_ratio):
    """Learning rate for optimizer step `step` (0-based: the rate used by the step-th update)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
