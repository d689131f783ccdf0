"""Text-to-image: MMDiT (joint text-image attention), caption encoders, the T2I task and its entry point."""
