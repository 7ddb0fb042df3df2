"""The model organism (SmolLM2-135M-Instruct, safety-tuned here) and `abliterate demo`, which abliterates it."""
