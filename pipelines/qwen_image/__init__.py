"""Qwen-Image-Edit(-2509) on EditKit's sampling core: loading, prompt encoding with pictures, the edit."""
