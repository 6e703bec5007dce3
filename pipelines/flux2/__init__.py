"""FLUX.2 [klein]: text-to-image, editing with reference pictures and inpainting on the shared sampling core."""
