"""Torch and diffusers work of EditKit: loading, sampling, training, background removal.

Nothing under ``pipelines`` imports ComfyUI. ComfyUI-specific behaviour (devices, memory
management, progress, interruption) reaches this code through the small ``Runtime``
interface in :mod:`.runtime`, which ``nodes.comfy_bridge`` implements.
"""
