"""Editing weights: the projection of one tensor, the streaming edit of a checkpoint, and the other output
formats (GGUF, LoRA adapter).
"""
