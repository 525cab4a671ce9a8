"""The VQGAN backbone of LlamaGen VQ and IBQ: config and model, and the reader of both official layouts."""
