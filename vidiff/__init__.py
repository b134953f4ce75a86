"""vidiff: latent video diffusion at cluster scale."""
