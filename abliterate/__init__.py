"""abliterate: find a chat model's refusal direction and project it out of the weights."""

__version__ = "0.1.0"
