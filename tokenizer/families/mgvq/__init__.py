"""MGVQ (DC-AE backbone, multi-group cosine quantizer): config, layers, quantizer, model."""
