"""A model and its checkpoint: the architecture registry (one YAML per family), finding and loading a model,
its chat template, the checkpoint on disk (quantized ones dequantized), forward hooks and batch sizes.
"""
