"""Prompt sets: the `Prompt` record, every `--prompts` source (built-in, files, hf:, polyrefuse), the 14
languages, and how refusals begin in each language.
"""
