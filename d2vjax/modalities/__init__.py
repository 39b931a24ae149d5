"""Modalities: each is a feature encoder + a host masking policy + target-normalisation defaults,
registered under ``registry.get('modality', name)``."""
