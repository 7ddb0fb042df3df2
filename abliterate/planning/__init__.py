"""The cost of a run before it starts (`--plan`, the pre-flight check): counts, memory, disk, time."""
