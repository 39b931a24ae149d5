"""Labelled-data providers for the pre-training probes (``d2vjax.probe``), one module per modality,
each registered as ``('probe_data', <modality name>)``."""
