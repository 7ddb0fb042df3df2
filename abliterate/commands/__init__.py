"""The commands that are more than one stage: `edit`/`directions`, `crosslingual`, `optimize`, the model
organism and `demo`, and the `chat` REPL. `cli.py` parses options and calls these.
"""
