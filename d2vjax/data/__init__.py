"""Host-side speech data: audio decoding, example sources (manifests, folders, tfds), grain pipeline.

Everything here is pure NumPy; JAX never runs on the data path (user-needs B3).
"""
