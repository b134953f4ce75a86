"""Quality metrics: VAE PSNR/SSIM."""
