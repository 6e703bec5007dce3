"""FLUX.1 Redux: a picture turned into FLUX.1 prompt tokens (SigLIP + the Redux embedder), no text encoder."""
