"""Model definitions: the USP pretraining ViT, DiT/SiT, and the shared transformer layers."""
