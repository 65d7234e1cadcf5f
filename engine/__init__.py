"""The fast paths of grpo.py's sampler and log-probs, tested equal to the plain ones (train.py --engine fast)."""
