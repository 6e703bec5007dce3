"""FLUX.1: loading (folder, BFL file, GGUF), key layouts, text encoders, the VAE latent format, Fill,
the FLUX.1-dev sampler and Kontext-inpaint."""
