"""Host-side speech data: audio decoding, example sources (manifest, folder, tfds), grain pipeline.

Everything here is pure NumPy; JAX never runs on the data path (user-needs B3).
"""
