"""Finding the refusal direction: difference-of-means candidates, their scores and the selection
(`search.find_direction`), the chosen vector and its file, and the record of the run that made it.
"""
