"""What leaves the machine: the one write path of an edited model (`write_edited`), its provenance and
model card, `verify`, and the push to the Hugging Face hub.
"""
